"""`tessera demo`: the shipped tiny model, evaluated on held-out scenes, then answering fresh ones."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

SHIPPED = [Path("checkpoints/tiny"), Path("checkpoints/tiny-sft")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="default: the shipped checkpoints/tiny (or tiny-sft)")
    p.add_argument("--n", type=int, default=120, help="held-out scenes to evaluate")
    p.add_argument("--questions", type=int, default=6, help="fresh scenes to answer, one line each")
    p.add_argument("--seed", type=int, default=20261124)


def find_checkpoint(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    root = Path(__file__).resolve().parents[2]
    for rel in SHIPPED:
        for base in (Path.cwd(), root):
            if (base / rel / "model.safetensors").exists():
                return base / rel
    return None


def run(args: argparse.Namespace) -> int:
    # imports stay in functions here: `tessera demo --help` builds its parser without them
    import tessera
    from tessera.evaluate import evaluate, format_report
    from tessera.world import FAMILIES, make_sample, verify

    ckpt = find_checkpoint(args.checkpoint)
    if ckpt is None:
        from tessera.train.recipe import run_recipe

        out = Path(tempfile.mkdtemp(prefix="tessera-demo-"))
        print(
            f"no shipped checkpoint found: training a quick one in {out} (toy scale, so expect low accuracy)"
        )
        ckpt = run_recipe("tiny", out, quick=True).final_checkpoint
    print(f"checkpoint: {ckpt}\n")
    model = tessera.load(ckpt)
    result = evaluate(model, seed=args.seed, n=args.n)
    print(format_report(result))

    pipe = tessera.Pipeline(model)
    print("\nfresh scenes:")
    for i in range(args.questions):
        sample = make_sample(
            args.seed + 10_000 + i, family=FAMILIES[i % len(FAMILIES)], split="eval"
        )
        answer = pipe.chat(
            sample.image, sample.question, thinking=sample.thinking_answer is not None
        )
        mark = "✓" if verify(sample.family, answer.text, sample.answer) else "✗"
        print(
            f"  {mark} [{sample.family}] {sample.question}\n      expected {sample.answer!r}, got {answer.final!r}"
            f"  ({answer.tiles} tiles, {answer.visual_tokens} visual tokens)"
        )
    return 0
