"""`tessera vision-server CKPT --bind tcp://HOST:PORT`: a standalone DvD vision server (ViT + router + projector)."""

from __future__ import annotations

import argparse

from tessera.device import add_device_arguments, devices_from_args
from tessera.serve.vision import MAX_BATCH_TILES, MAX_WAIT_MS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument(
        "--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ address; port * picks a free one"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--max-batch-tiles", type=int, default=MAX_BATCH_TILES, help="tiles per ViT batch"
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=MAX_WAIT_MS, help="longest wait for a batch to fill"
    )
    p.add_argument(
        "--cache-entries", type=int, default=256, help="LRU feature cache size (0 disables)"
    )
    p.add_argument(
        "--max-pixels", type=int, default=None, help="pixels per image (decompression-bomb guard)"
    )
    p.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit when the process that started this one exits",
    )
    add_device_arguments(
        p
    )  # --dtype: the ViT, router and projectors (features are always sent as bf16)


def run(args: argparse.Namespace) -> int:
    # imports stay in functions here: `tessera vision-server --help` builds its parser without them
    import torch

    from tessera.serve.vision_server import run_vision_server

    devices = devices_from_args(args)
    dtype = "bfloat16" if devices.dtype == torch.bfloat16 else "float32"
    if devices.dtype not in (None, torch.float32, torch.bfloat16):
        raise SystemExit(
            f"vision-server: --dtype {args.dtype} is not supported; use float32 or bfloat16"
        )
    return run_vision_server(
        args.checkpoint,
        args.bind,
        args.threads,
        args.max_batch_tiles,
        args.max_wait_ms,
        args.cache_entries,
        args.max_pixels,
        args.exit_with_parent,
        dtype,
        device=devices.device,
    )
