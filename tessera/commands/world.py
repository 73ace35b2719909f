"""`tessera world sample --n 8 --out DIR [--seed S] [--family F] [--split SPLIT] [--difficulty D]`: render scenes
and their questions for a person to look at (PNG files plus samples.jsonl).

`tessera world export --format internvl --n N --out DIR [--seed S] [--family F] [--split SPLIT]`: the world as
files in InternVL's fine-tuning format (images/*.png, annotation.jsonl, meta.json), for `train sft --data`.

`tessera world probe [--steps N]`: the learnability probe (tessera/bench/probe.py): glyph geometry per patch
and token, and a short training run comparing how well 16 (1/4) and 4 (1/16) tokens per tile carry a document.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tessera.bench import probe
from tessera.world import ALL_FAMILIES, make_sample


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("sample", help="render samples to PNG + samples.jsonl")
    p.add_argument("--n", type=int, default=8, help="number of samples")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="first seed (samples use seed, seed+1, ...)")
    p.add_argument("--family", default=None, help="one family (default: drawn from each seed)")
    p.add_argument("--split", default="train", choices=["train", "eval", "test"])
    p.add_argument(
        "--difficulty", type=float, default=1.0, help="curriculum level in [0, 1] (1 = evaluation)"
    )
    e = sub.add_parser("export", help="write world samples as an InternVL-format dataset")
    e.add_argument("--format", default="internvl", choices=["internvl"])
    e.add_argument("--n", type=int, required=True, help="number of samples")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument(
        "--seed", type=int, default=0, help="world seed offset (samples use seed+0, seed+1, ...)"
    )
    e.add_argument("--family", default=None, help="one family (default: the world's own pick)")
    e.add_argument("--split", default="train", choices=["train", "eval", "test"])
    e.add_argument(
        "--thinking-prob",
        type=float,
        default=0.0,
        help="share of reasoning samples written thinking",
    )
    q = sub.add_parser("probe", help="measure what 1/4 and 1/16 tokens of a text tile can carry")
    probe.add_arguments(q)


def run(args: argparse.Namespace) -> int:
    if args.action == "probe":
        return probe.run(args)
    if args.action == "export":
        return export_run(args)

    if args.family is not None and args.family not in ALL_FAMILIES:
        raise SystemExit(f"unknown family {args.family!r}; choose from {', '.join(ALL_FAMILIES)}")
    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    if not 0.0 <= args.difficulty <= 1.0:
        raise SystemExit(f"--difficulty must lie in [0, 1], got {args.difficulty}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:
        for seed in range(args.seed, args.seed + args.n):
            s = make_sample(seed, args.family, args.split, args.difficulty)
            name = f"{args.split}_{seed:06d}_{s.family}.png"
            s.image.save(out / name)
            record = {
                "image": name,
                "family": s.family,
                "question": s.question,
                "answer": s.answer,
                "thinking_answer": s.thinking_answer,
                **s.meta,
            }
            f.write(json.dumps(record) + "\n")
            print(
                f"{name}  {s.meta['grid'][0]}x{s.meta['grid'][1]} tiles  Q: {s.question}  A: {s.answer}"
            )
    print(f"wrote {args.n} samples to {out}")
    return 0


def export_run(args: argparse.Namespace) -> int:
    # imports stay in functions here: `tessera world --help` builds its parser without them
    from tessera.data.world import WorldSource, export
    from tessera.world import ALL_FAMILIES

    if args.family is not None and args.family not in ALL_FAMILIES:
        raise SystemExit(f"unknown family {args.family!r}; choose from {', '.join(ALL_FAMILIES)}")
    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    source = WorldSource(
        {args.family: 1.0} if args.family else None, args.thinking_prob, args.seed, args.split
    )
    meta = export(source, args.n, args.out)
    print(f"wrote {args.n} samples to {args.out} ({meta.name}, annotation.jsonl, images/)")
    return 0
