"""What a second question about an image costs the vision side with question routing.

A serving vision side (tessera.serve.vision.VisionEncoder) keeps each image's ViT tokens, so a question about an
image it has seen runs only the question-aware router and the chosen projector per tile: no decoding, tiling
or ViT. `cached_question_cost` times that path against the ViT alone on the same image (and reports the first,
cold question, which pays for everything), so the ratio says how much of the vision cost a cached image
saves. The question embeddings are computed beforehand (the language side's work, not the vision side's).

    python -m tessera.bench.question_cache CKPT [--images 4] [--questions 3] [--rounds 5]

adds a question router (copied from the released one) when the checkpoint has none: the cost is the same.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Sequence

import torch

import tessera
from tessera.image import ImageProcessor
from tessera.routing import RoutingPolicy
from tessera.serve.language_server import embed_question
from tessera.serve.vision import VisionEncoder, VisionLimits
from tessera.world import make_sample


def _timed(fn, device: torch.device) -> float:
    """Milliseconds of fn() (the device synchronised around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) * 1000.0


@torch.inference_mode()
def cached_question_cost(
    model, images: Sequence[bytes], questions: Sequence[str], rounds: int = 3
) -> dict:
    """Per image: the ViT alone (median of `rounds`), the first question through a fresh VisionEncoder (decode,
    tile, ViT, router, projector) and every later question (`rounds` × all `questions`, the ViT tokens
    cached: router + projector). Returns milliseconds per image / per question and
    ratio = cached_question_ms / vit_ms."""
    if not images or not questions or rounds < 1:
        raise ValueError("cached_question_cost needs images, questions and rounds >= 1")
    cfg = model.config
    encoder = VisionEncoder(model, VisionLimits(token_cache_entries=len(images)))
    device, dtype = encoder.device, encoder.dtype
    processor = ImageProcessor(cfg.tile_size, cfg.min_tiles, cfg.max_tiles, cfg.use_thumbnail)
    policy = RoutingPolicy("question")
    embeddings = [embed_question(model, q) for q in questions]  # [Dl] each (language side)
    vit, cold, cached, tiles = [], [], [], 0
    for image in images:
        pixels = processor([image]).pixel_values.to(device, dtype)  # [N, 3, S, S]
        tiles += pixels.shape[0]
        model.vision_tokens(pixels)  # warm-up
        vit.append(
            statistics.median(
                _timed(lambda: model.vision_tokens(pixels), device) for _ in range(rounds)
            )
        )
        cold.append(_timed(lambda: encoder.encode([image], policy, None, embeddings[0]), device))
        for _ in range(rounds):
            for q in embeddings:
                cached.append(_timed(lambda: encoder.encode([image], policy, None, q), device))
    if encoder.vit_tiles != tiles:
        raise RuntimeError(
            f"the ViT ran on {encoder.vit_tiles} tiles for {tiles}: the token cache missed"
        )
    vit_ms, cached_ms = statistics.mean(vit), statistics.median(cached)
    return {
        "images": len(images),
        "questions": len(questions),
        "rounds": rounds,
        "tiles": tiles,
        "device": str(device),
        "vit_ms": vit_ms,  # per image, ViT alone
        "cold_question_ms": statistics.mean(cold),  # per image, first question: everything
        "cached_question_ms": cached_ms,  # per question about a cached image
        "ratio": cached_ms / vit_ms,
    }


def world_inputs(n_images: int, n_questions: int) -> tuple[list[bytes], list[str]]:
    """PNG bytes of `n_images` held-out world scenes and the questions of `n_questions` samples."""
    images, questions = [], []
    for seed in range(max(n_images, n_questions)):
        sample = make_sample(seed, split="eval")
        if len(images) < n_images:
            buf = io.BytesIO()
            sample.image.save(buf, format="PNG")
            images.append(buf.getvalue())
        if len(questions) < n_questions:
            questions.append(sample.question)
    return images, questions


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    model = tessera.load(args.checkpoint, device=args.device).eval()
    if not model.config.flash.question_router:
        model.add_question_router()
    images, questions = world_inputs(args.images, args.questions)
    print(json.dumps(cached_question_cost(model, images, questions, args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
