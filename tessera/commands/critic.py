"""`tessera critic CKPT [--out DIR] [--queries N] [--group-size G] ...`: train the Best-of-N critic.

The checkpoint answers `--queries` training questions `--group-size` times each; the world's verifiers label
the answers; a small head on the frozen model's features learns P(correct) (see tessera.best_of_n). The critic is
written to CKPT/critic unless `--out` says otherwise, which is where `eval --best-of` and `chat --best-of` look.
With `--data FILE` the questions are your prompts (image, question, answer) and `--reward` labels the answers.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tessera.device import add_device_arguments, devices_from_args
from tessera.seeds import CRITIC_SEED_OFFSET


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", help="checkpoint folder (the policy whose answers the critic will judge)"
    )
    p.add_argument("--out", help="critic folder (default CHECKPOINT/critic)")
    p.add_argument("--queries", type=int, default=400, help="training questions rolled out")
    p.add_argument("--group-size", type=int, default=8, help="answers sampled per question")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="sampling temperature (use the one Best-of-N uses)",
    )
    p.add_argument("--families", help="JSON {family: weight}; default: every family, reasoning 4x")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data",
        help="your prompts (.jsonl/.json/.parquet: image, question, answer) instead of the world",
    )
    p.add_argument(
        "--reward",
        default="exact",
        help="with --data: exact, numeric, choice, boxed or module:function",
    )
    p.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="with --data: drop bad rows instead of stopping",
    )
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    # imports stay in functions here: `tessera critic --help` builds its parser without them
    import tessera
    from tessera.answers import SamplingConfig
    from tessera.best_of_n import CRITIC_DIR, CriticTrainConfig, fit_critic
    from tessera.train.rollout import training_queries

    devices = devices_from_args(args)
    model = tessera.load(args.checkpoint, device=devices.device, dtype=devices.dtype)
    families = json.loads(args.families) if args.families else None
    sampling = SamplingConfig(
        temperature=args.temperature, group_size=args.group_size, seed=args.seed
    )
    extra = {}
    if args.data:
        from tessera.data import DataError
        from tessera.train.records_rl import gspo_inputs

        try:
            queries, prepared, verify, _ = gspo_inputs(
                model, args.data, args.reward, args.skip_bad_records
            )
        except (DataError, ValueError) as e:
            raise SystemExit(str(e))
        extra = {"verify": verify, "prepared": prepared}
    else:
        queries = training_queries(
            args.queries, families, seed=args.seed, seed_offset=CRITIC_SEED_OFFSET
        )
    torch.manual_seed(args.seed)
    critic, report = fit_critic(
        model, queries, sampling, CriticTrainConfig(epochs=args.epochs, seed=args.seed), **extra
    )
    out = Path(args.out) if args.out else Path(args.checkpoint) / CRITIC_DIR
    critic.save(out)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(
        f"critic written to {out}: held-out accuracy {report.val_accuracy:.3f}, AUC {report.val_auc:.3f}"
    )
    return 0
