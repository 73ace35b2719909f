"""`tessera eval CKPT [--routing full|compressed|router|random|question] [--seed S --n N] [--best-of N] [--json]`

`tessera eval CKPT --data FILE [--reward exact|numeric|choice|boxed|module:function] [--json]` scores your own
questions instead of the world's (tessera.evaluate_records): `--json` prints overall, n and categories.
"""

from __future__ import annotations

import argparse
import json

from tessera.device import add_device_arguments, devices_from_args
from tessera.routing import MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument(
        "--routing", default="full", choices=MODES, help="which tiles use the 1/16 branch"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="offset of the held-out set (the world's eval split)"
    )
    p.add_argument("--n", type=int, default=140, help="questions, interleaved over the families")
    p.add_argument(
        "--best-of", type=int, default=1, help="sample N answers and keep the critic's best"
    )
    p.add_argument("--critic", help="critic folder for --best-of (default: CHECKPOINT/critic)")
    p.add_argument(
        "--thinking",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: thinking for the reasoning family only",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--records", action="store_true", help="with --json: include every question and prediction"
    )
    p.add_argument(
        "--data",
        help="your questions (.jsonl/.json/.parquet or InternVL meta JSON) instead of the world",
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
    # imports stay in functions here: `tessera eval --help` builds its parser without them
    import tessera
    from tessera.evaluate import evaluate, format_report

    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    devices = devices_from_args(args)
    model = tessera.load(args.checkpoint, device=devices.device, dtype=devices.dtype)
    if args.data:
        return run_on_data(model, args)
    if args.best_of > 1:
        from tessera.best_of_n import Critic

        model.critic = Critic.load(args.critic or args.checkpoint).to(devices.device)
    result = evaluate(
        model,
        seed=args.seed,
        n=args.n,
        routing=args.routing,
        batch_size=args.batch_size,
        thinking=args.thinking,
        best_of=args.best_of,
    )
    if args.json:
        print(json.dumps(result.to_json(records=args.records)))
    else:
        print(format_report(result))
    return 0


def run_on_data(model, args: argparse.Namespace) -> int:
    from tessera.data import DataError
    from tessera.evaluate_records import evaluate_records, format_records_report

    try:
        result = evaluate_records(
            model,
            args.data,
            reward=args.reward,
            batch_size=args.batch_size,
            thinking=args.thinking == "on",
            routing=args.routing,
            skip_bad=args.skip_bad_records,
        )
    except (DataError, ValueError) as e:
        raise SystemExit(str(e))
    print(
        json.dumps(result.to_json(records=args.records))
        if args.json
        else format_records_report(result)
    )
    return 0
