"""`tessera merge RUN --out CKPT [--layout tessera|official|hf] [--base CKPT]`

Folds the LoRA adapter of a `tessera train ... --lora` run (RUN/adapter, or an adapter folder
itself) into the
base checkpoint it was trained on (recorded in the adapter; --base overrides) and writes the merged
weights in
any layout the checkpoint savers know.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tessera.model.checkpoint import LAYOUTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder of a --lora training (or its adapter folder)")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint")
    p.add_argument("--layout", default="tessera", choices=LAYOUTS)
    p.add_argument("--base", help="base checkpoint (default: the one the adapter records)")


def run(args: argparse.Namespace) -> int:
    # imports stay in functions here: `tessera merge --help` builds its parser without them
    import tessera
    from tessera.model.checkpoint import save_checkpoint
    from tessera.train.lora import ADAPTER_DIR, CONFIG_FILE, load_adapter, merge_into, read_adapter

    adapter = Path(args.run)
    if not (adapter / CONFIG_FILE).exists():
        adapter = adapter / ADAPTER_DIR
    try:
        config, _ = read_adapter(adapter)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}; was {args.run} trained with --lora?")
    base = args.base or config.get("base")
    if not base:
        raise SystemExit(f"{adapter} records no base checkpoint; pass --base")
    model = tessera.load(base)
    model.float()
    load_adapter(model, adapter)
    save_checkpoint(merge_into(model), args.out, layout=args.layout)
    print(f"merged {adapter} into {base}: {args.out} ({args.layout} layout)")
    return 0
