"""`tessera critic CKPT [--out DIR] [--queries N] [--group-size G] ...`: train the Best-of-N critic.

The checkpoint answers `--queries` training questions `--group-size` times each; the world's verifiers label
the answers; a small head on the frozen model's features learns P(correct) (see tessera.tts). The critic is
written to CKPT/critic unless `--out` says otherwise, which is where `eval --best-of` and `chat --best-of` look.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tessera.device import add_device_arguments, devices_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (the policy whose answers the critic will judge)")
    p.add_argument("--out", help="critic folder (default CHECKPOINT/critic)")
    p.add_argument("--queries", type=int, default=400, help="training questions rolled out")
    p.add_argument("--group-size", type=int, default=8, help="answers sampled per question")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (use the one Best-of-N uses)")
    p.add_argument("--families", help='JSON {family: weight}; default: every family, reasoning 4x')
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    import tessera
    from tessera.train.rollout import CRITIC_SEED_OFFSET, SamplingConfig, training_queries
    from tessera.tts import CRITIC_DIR, CriticTrainConfig, fit_critic

    devices = devices_from_args(args)
    model = tessera.load(args.checkpoint, device=devices.device, dtype=devices.dtype)
    families = json.loads(args.families) if args.families else None
    queries = training_queries(args.queries, families, seed=args.seed, seed_offset=CRITIC_SEED_OFFSET)
    sampling = SamplingConfig(temperature=args.temperature, group_size=args.group_size, seed=args.seed)
    torch.manual_seed(args.seed)
    critic, report = fit_critic(model, queries, sampling, CriticTrainConfig(epochs=args.epochs, seed=args.seed))
    out = Path(args.out) if args.out else Path(args.checkpoint) / CRITIC_DIR
    critic.save(out)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"critic written to {out}: held-out accuracy {report.val_accuracy:.3f}, AUC {report.val_auc:.3f}")
    return 0
