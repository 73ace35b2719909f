"""`tessera recipe --preset tiny --out DIR [--quick]`: init → pretrain → sft → mpo → gspo → vico → router → eval →
report (markdown, PNG, JSON)."""

from __future__ import annotations

import argparse

from tessera.device import add_device_arguments, devices_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny"],
        help="model preset (the recipe's schedule is for tiny)",
    )
    p.add_argument(
        "--out", required=True, help="run folder; rerunning with the same folder resumes"
    )
    p.add_argument(
        "--quick", action="store_true", help="every stage at toy scale (under two minutes)"
    )
    p.add_argument("--no-progress", action="store_true")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    # imports stay in functions here: `tessera recipe --help` builds its parser without them
    from tessera.train.recipe import run_recipe

    devices = devices_from_args(args)
    if devices.dtype is not None:
        raise SystemExit(
            "recipe: --dtype must be auto (each stage keeps fp32 master weights and sets its "
            "own compute precision)"
        )
    result = run_recipe(
        args.preset,
        args.out,
        quick=args.quick,
        progress=not args.no_progress,
        device=devices.device,
    )
    ev = result.summary["eval"]
    print(
        f"overall {ev['overall']:.1%} on {ev['n']} held-out questions; "
        f"final checkpoint {result.final_checkpoint}; report {result.out / 'report.md'}"
    )
    flash = result.summary.get("flash")
    if flash:
        import math

        kept = flash["accuracy_kept"]  # NaN when full scores 0 (a quick run)
        kept_text = (
            "no accuracy ratio (full scores 0)"
            if math.isnan(kept)
            else f"{kept:.1f} % of full's accuracy"
        )
        print(f"router: {flash['tokens_saved']:.1f} % fewer visual tokens, {kept_text}")
    return 0
