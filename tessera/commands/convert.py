"""`tessera convert SRC DST --to hf|tessera|official`: rewrite a checkpoint folder in another layout.

The source layout (tessera, official InternVL3.5, transformers) is detected from its config.json; tensors
are copied bit for bit and tokenizer.json is copied along, and so is the Best-of-N critic (critic/, tessera.best_of_n)
when the source has one. `--to hf` also writes what transformers and vLLM read (tessera.model.hf_export) and,
for a Flash model, leaves out the router and mlp2 they do not have, and the question-aware router
with them (one line says so; `--keep-flash` keeps them all, the question router under Tessera's
own names, `model.question_router.*`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint folder to read (any layout)")
    p.add_argument("dst", help="folder to write")
    p.add_argument(
        "--to",
        choices=["hf", "tessera", "official"],
        default="hf",
        help="target layout: hf = transformers InternVLForConditionalGeneration (default)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="cast every tensor (default: keep the stored dtypes)",
    )
    p.add_argument(
        "--keep-flash",
        action="store_true",
        help="--to hf: keep a Flash model's router and mlp2, and its question-aware router "
        "(Tessera reads them; transformers and vLLM refuse them)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite a destination that already holds a checkpoint",
    )


def run(args: argparse.Namespace) -> int:
    # imports stay in functions here: `tessera convert --help` builds its parser without them
    from tessera.config import ConfigError
    from tessera.model.checkpoint import CheckpointError, convert, load_config

    dst = Path(args.dst)
    if (dst / "config.json").exists() and not args.force:
        print(f"error: {dst} already holds a checkpoint (use --force to overwrite)")
        return 2
    try:
        _, layout = load_config(args.src)
        import torch

        convert(
            args.src,
            dst,
            to=args.to,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            drop_flash=args.to == "hf" and not args.keep_flash,
        )
        from tessera.best_of_n import CRITIC_DIR

        if (Path(args.src) / CRITIC_DIR).is_dir():
            import shutil

            shutil.copytree(Path(args.src) / CRITIC_DIR, dst / CRITIC_DIR, dirs_exist_ok=True)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}")
        return 1
    print(f"converted {args.src} ({layout} layout) -> {dst} ({args.to} layout)")
    return 0
