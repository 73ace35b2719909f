"""`tessera init --preset P --out DIR [--seed S]`: a random-initialised checkpoint with a locally built tokenizer."""

from __future__ import annotations

import argparse

import torch

from tessera.config import PRESETS
from tessera.model.init import init_checkpoint
from tessera.world import corpus


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the stored weights (bfloat16: half the size, as the released checkpoints)",
    )


def run(args: argparse.Namespace) -> int:
    path = init_checkpoint(
        args.preset, args.out, seed=args.seed, corpus=corpus(600), dtype=getattr(torch, args.dtype)
    )
    print(f"wrote a random {args.preset} checkpoint ({args.dtype}) to {path}")
    return 0
