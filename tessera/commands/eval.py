"""`tessera eval CKPT [--routing full|compressed|router|random] [--seed S --n N] [--best-of N] [--json]`"""

from __future__ import annotations

import argparse
import json

from tessera.device import add_device_arguments, devices_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tessera.evaluate import ROUTINGS

    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--routing", default="full", choices=ROUTINGS, help="which tiles use the 1/16 branch")
    p.add_argument("--seed", type=int, default=0, help="offset of the held-out set (the world's eval split)")
    p.add_argument("--n", type=int, default=140, help="questions, interleaved over the families")
    p.add_argument("--best-of", type=int, default=1, help="sample N answers and keep the critic's best")
    p.add_argument("--critic", help="critic folder for --best-of (default: CHECKPOINT/critic)")
    p.add_argument("--thinking", choices=["auto", "on", "off"], default="auto",
                   help="auto: thinking for the reasoning family only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--records", action="store_true", help="with --json: include every question and prediction")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    import tessera
    from tessera.evaluate import evaluate, format_report

    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    devices = devices_from_args(args)
    model = tessera.load(args.checkpoint, device=devices.device, dtype=devices.dtype)
    if args.best_of > 1:
        from tessera.tts import Critic

        model.critic = Critic.load(args.critic or args.checkpoint).to(devices.device)
    result = evaluate(model, seed=args.seed, n=args.n, routing=args.routing, batch_size=args.batch_size,
                      thinking=args.thinking, best_of=args.best_of)
    if args.json:
        print(json.dumps(result.to_json(records=args.records)))
    else:
        print(format_report(result))
    return 0
