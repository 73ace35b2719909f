"""`tessera init --preset P --out DIR [--seed S]`: a random-initialised checkpoint with a locally built tokenizer."""

from __future__ import annotations

import argparse

from tessera.config import PRESETS
from tessera.model.init import init_checkpoint
from tessera.world import corpus


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    path = init_checkpoint(args.preset, args.out, seed=args.seed, corpus=corpus(600))
    print(f"wrote a random {args.preset} checkpoint to {path}")
    return 0
