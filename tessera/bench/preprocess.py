"""`tessera bench preprocess`: our image preprocessing vs transformers' InternVL image processor.

Both sides start from the same encoded bytes (decoding is part of the cost a server pays) and produce the
same float32 tiles: transformers' `GotOcr2ImageProcessorPil` configured as InternVL's checkpoints configure
it (crop_to_patches, 448 px, ImageNet mean/std) — the backend transformers selects when torchvision is
absent — against `tessera.image.ImageProcessor` in exact mode, in `fast` mode and, with `--threads N > 1`,
with N worker threads. Measurements are interleaved round by round so load from other processes hits all
sides alike; the median round is reported. The images are photo-like (smooth random fields plus grain),
deterministic by seed, so JPEG sizes and decode costs resemble real photos.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from tessera.image import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor

DEFAULT_SIZES = "640x480,1920x1080,4000x3000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        default=DEFAULT_SIZES,
        help=f"comma-separated WxH image sizes (default {DEFAULT_SIZES})",
    )
    parser.add_argument(
        "--images", type=int, default=4, help="distinct images per size (default 4)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="timed rounds per side; the median is reported (default 5)",
    )
    parser.add_argument(
        "--format", choices=["jpeg", "png"], default="jpeg", help="encoding of the input bytes"
    )
    parser.add_argument("--tile-size", type=int, default=448)
    parser.add_argument("--max-tiles", type=int, default=12)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both sides; >1 also times our processor with that many workers",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-transformers", action="store_true", help="time only our processor")
    parser.add_argument(
        "--json", action="store_true", help="print JSON instead of a markdown table"
    )


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A smooth random colour field (bicubic-upsampled noise) with grain: compresses and decodes like a photo."""
    coarse = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    field = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16
    )
    grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90) if fmt == "jpeg" else img.save(buf, "PNG")
    return buf.getvalue()


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    info = {
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": Image.__version__,
        "numpy": np.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def transformers_processor(tile_size: int, max_tiles: int):
    """InternVL's image processor in transformers, configured like the InternVL3.5 checkpoints (None if missing)."""
    try:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            GotOcr2ImageProcessorPil,
        )
    except ImportError:
        return None
    return GotOcr2ImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def _median_seconds(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Warm each side up once, then time all sides round-robin; the median round per side."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(args: argparse.Namespace) -> dict:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    hf = None if args.no_transformers else transformers_processor(args.tile_size, args.max_tiles)
    ours = {
        "ours": ImageProcessor(args.tile_size, 1, args.max_tiles),
        "ours_fast": ImageProcessor(args.tile_size, 1, args.max_tiles, fast=True),
    }
    if args.threads > 1:
        ours[f"ours_{args.threads}threads"] = ImageProcessor(
            args.tile_size, 1, args.max_tiles, num_threads=args.threads
        )
    rows = []
    for spec in args.sizes.split(","):
        width, height = (int(v) for v in spec.lower().split("x"))
        blobs = [encode(photo_like(width, height, rng), args.format) for _ in range(args.images)]
        fns: dict[str, Callable[[], object]] = {
            name: (lambda p=p: p(blobs)) for name, p in ours.items()
        }
        if hf is not None:
            fns["transformers"] = lambda: hf(
                images=[Image.open(io.BytesIO(b)) for b in blobs], return_tensors="pt"
            )
        seconds = _median_seconds(fns, args.rounds)
        batch = ours["ours"](blobs)
        row = {
            "size": f"{width}x{height}",
            "grid": "{}x{}".format(*batch.grids[0]),
            "tiles": batch.tiles_per_image[0],
            "bytes_per_image": sum(map(len, blobs)) // len(blobs),
            "images_per_s": {name: args.images / s for name, s in seconds.items()},
        }
        if hf is not None:
            reference = fns["transformers"]()
            ref = reference["pixel_values"]
            assert reference["num_patches"].tolist() == batch.tiles_per_image, (
                "tile counts differ from transformers"
            )
            row["max_abs_diff"] = {
                "ours": (batch.pixel_values - ref).abs().max().item(),
                "ours_fast": (ours["ours_fast"](blobs).pixel_values - ref).abs().max().item(),
            }
            row["speedup_vs_transformers"] = {
                name: seconds["transformers"] / seconds[name] for name in ours
            }
        rows.append(row)
    settings = {
        k: getattr(args, k)
        for k in (
            "sizes",
            "images",
            "rounds",
            "format",
            "tile_size",
            "max_tiles",
            "threads",
            "seed",
        )
    }
    return {"machine": machine(), "settings": settings, "rows": rows}


def markdown(result: dict) -> str:
    rows = result["rows"]
    names = [n for n in rows[0]["images_per_s"] if n != "transformers"]
    has_hf = "transformers" in rows[0]["images_per_s"]
    head = ["image", "grid", "tiles"] + (["transformers img/s"] if has_hf else [])
    for n in names:
        head += [f"{n} img/s"] + ([f"{n} ×"] if has_hf else [])
    head += ["max abs diff (exact / fast)"] if has_hf else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["size"], r["grid"], str(r["tiles"])]
        if has_hf:
            cells.append(f"{r['images_per_s']['transformers']:.1f}")
        for n in names:
            cells.append(f"{r['images_per_s'][n]:.1f}")
            if has_hf:
                cells.append(f"{r['speedup_vs_transformers'][n]:.2f}")
        if has_hf:
            cells.append(f"{r['max_abs_diff']['ours']:.2g} / {r['max_abs_diff']['ours_fast']:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    lines.append("")
    lines.append(
        f"machine: {m['nproc']} CPU(s), {m['cpu']}; torch {m['torch']}, Pillow {m['pillow']}"
        + (f", transformers {m['transformers']}" if "transformers" in m else "")
    )
    s = result["settings"]
    lines.append(
        f"settings: {s['images']} {s['format']} images per size, median of {s['rounds']} rounds, "
        f"tile {s['tile_size']}, max_tiles {s['max_tiles']}, torch threads {s['threads']}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0
