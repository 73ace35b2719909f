"""`tessera bench router CKPT`: the Flash table — what the two routers buy, measured.

A miniature of the paper's Table 17, for the released Visual Resolution Router and for Tessera's
question-aware router. In one run:
1. thresholds are chosen on the *training* split (`--tune-n` questions): the released router's relative
   threshold is the most accurate one that saves >= 90 % of the world bound's savings (else the one saving
   most); the question router's absolute threshold is the one saving most while keeping >= 98 % of full's
   accuracy (else the most accurate);
2. every routing (tessera.flash_table: full, compressed, router, random, question, router@question,
   random@question and the world's two oracles) is evaluated on the same held-out questions (`--seeds`,
   eval split, `--n` per seed) with those thresholds;
3. the vision side is timed: full (ViT + mlp1) vs router (ViT + router + chosen branch), and per question on an
   image whose ViT tokens are cached (question router + chosen branch) vs the ViT alone;
4. each router is scored against exact loss-ratio labels on held-out tiles.
`--docs docs/BENCHMARKS.md` rewrites that file's "## Flash" section; `--out DIR` writes flash.json, an
accuracy-vs-tokens plot and the routing pictures; `--save-thresholds` writes the chosen thresholds into CKPT.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import tessera
from tessera.bench.docs import machine, replace_section
from tessera.bench.question_cache import cached_question_cost, world_inputs
from tessera.bench.router_report import markdown, plot
from tessera.config import ModelConfig
from tessera.evaluate import evaluate
from tessera.flash_table import TARGETS, evaluate_modes, merge, reading_accuracy, summarise
from tessera.image import ImageProcessor
from tessera.routing import RoutingPolicy, draw_routing, encode_routed
from tessera.train.question_router_stage import (
    build_stage as build_question_stage,
)
from tessera.train.question_router_stage import (
    evaluate_question_router,
    heldout_stream_samples,
)
from tessera.train.router_stage import evaluate_router, heldout_samples
from tessera.world import (
    FAMILIES,
    READING_FAMILIES,
    eval_items,
    text_free_token_savings,
    tuning_items,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a Flash checkpoint (trained: ViCO, router, question_router)")
    p.add_argument(
        "--n", type=int, default=350, help="held-out questions per routing and seed (eval split)"
    )
    p.add_argument(
        "--seeds",
        default="0,50000",
        help="comma-separated held-out set offsets; the table pools them",
    )
    p.add_argument(
        "--tune-n",
        type=int,
        default=350,
        help="training-split questions on which the thresholds are chosen (0: keep the checkpoint's)",
    )
    p.add_argument(
        "--relative-grid",
        default="0.3,0.4,0.5,0.55,0.6,0.65,0.7,0.8,0.9",
        help="released router: relative thresholds tried on the training split",
    )
    p.add_argument(
        "--question-grid",
        default="0.3,0.4,0.5,0.6,0.7,0.75,0.8,0.85,0.9,0.95",
        help="question router: absolute thresholds tried on the training split",
    )
    p.add_argument(
        "--save-thresholds", action="store_true", help="write the chosen thresholds into CKPT"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--router-samples",
        type=int,
        default=32,
        help="held-out conversations for each router's tile accuracy (0: skip)",
    )
    p.add_argument(
        "--router-turns",
        type=int,
        default=4,
        help="questions per held-out image whose loss ratios label the tiles (the recipe's: 4)",
    )
    p.add_argument(
        "--vision-images", type=int, default=32, help="images for the vision-side timing"
    )
    p.add_argument(
        "--rounds", type=int, default=5, help="timed rounds of the vision side (median reported)"
    )
    p.add_argument("--out", help="folder for flash.json, the plot and the routing pictures")
    p.add_argument("--docs", help="markdown file whose '## Flash' section is replaced")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")


# ---- counting ----------------------------------------------------------------------------------------------


def vision_macs(config) -> dict[str, float]:
    """Multiply-accumulates per tile of each vision-side part (matmuls only; norms and softmax are negligible)."""
    v, f = config.vision, config.flash
    cv, cl = v.hidden_size, config.language.hidden_size
    p = (v.image_size // v.patch_size) ** 2
    t = p + 1  # with CLS
    vit = (
        v.num_layers * (t * (4 * cv * cv + 2 * cv * v.intermediate_size) + 2 * t * t * cv)
        + p * 3 * v.patch_size**2 * cv
    )
    h = f.router_hidden_size or cv
    q = f.router_num_queries
    router = (p * cv * h if h != cv else 0) + 2 * (
        2 * p * h * h
    )  # proj_in; K,V of attn1 and attn2 (computed once)
    router += 4 * (
        q * h * h + q * h * h + 2 * q * p * h
    )  # 4 query passes: q proj, out proj, scores + weighted sum
    router += f.router_num_blocks * 2 * h * 4 * h + 2 * h  # gating blocks and the gate
    t1, t2 = config.tokens_per_tile, config.compressed_tokens_per_tile
    mlp1 = t1 * (4 * cv * cl + cl * cl)
    k2 = round(
        1 / config.flash.compressed_downsample_ratio
    )  # 4: each 1/16 token concatenates k2² = 16 patches
    mlp2 = t2 * (k2 * k2 * cv * 2 * cl + 4 * cl * cl + 2 * cl * cl)
    return {"vit": float(vit), "router": float(router), "mlp1": float(mlp1), "mlp2": float(mlp2)}


def vision_cost(model, images, rounds: int) -> dict[str, float]:
    """Seconds for the vision side of `full` (ViT + mlp1) and `router` (ViT + router + chosen branch), and of the
    transformers-style Flash path (ViT + router + both branches), interleaved round by round; MACs alongside."""
    processor = ImageProcessor.from_config(model.config)
    batch = processor(images)
    pv, tiles = batch.pixel_values, batch.tiles_per_image

    def both_branches():
        grid = model.vision_tokens(pv)  # [N,h,w,Cv]
        model.router.p_compress(grid.reshape(grid.shape[0], -1, grid.shape[-1]))
        model.project(grid, None)
        model.project(grid, torch.ones(grid.shape[0], dtype=torch.bool))

    runs = {
        "full": lambda: encode_routed(model, pv, tiles, "full"),
        "router": lambda: encode_routed(model, pv, tiles, "router"),
        "both_branches": both_branches,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        _, decision = encode_routed(model, pv, tiles, "router")
    med = {k: statistics.median(v) for k, v in times.items()}
    m = vision_macs(model.config)
    n, c = decision.compress.numel(), decision.compressed_tiles
    macs_full = n * (m["vit"] + m["mlp1"])
    macs_router = n * (m["vit"] + m["router"]) + (n - c) * m["mlp1"] + c * m["mlp2"]
    return {
        "tiles": float(n),
        "compressed_fraction": c / n,
        "sec_full": med["full"],
        "sec_router": med["router"],
        "sec_both_branches": med["both_branches"],
        "time_ratio": med["router"] / med["full"],
        "mac_ratio": macs_router / macs_full,
        "router_share_of_vit": m["router"] / m["vit"],
        "mlp2_over_mlp1": m["mlp2"] / m["mlp1"],
    }


# ---- choosing thresholds on the training split --------------------------------------------------------------


def world_bound(config, n: int, seeds: list[int], split: str = "eval") -> dict[str, float]:
    """tessera.world.text_free_token_savings on the table's own questions (n per seed)."""
    per_family = -(-n // len(FAMILIES))
    items = [
        it
        for seed in seeds
        for it in (
            tuning_items(per_family, offset=seed)
            if split == "train"
            else eval_items(per_family, offset=seed)
        )[:n]
    ]
    return text_free_token_savings(
        (it.sample() for it in items), config.tokens_per_tile, config.compressed_tokens_per_tile
    )


def _point(value: float, r, full) -> dict[str, float]:
    return {
        "threshold": value,
        "overall": r.overall,
        "reading": reading_accuracy(r),
        "visual_tokens": r.visual_tokens_per_image,
        "tokens_saved": 100 * (1 - r.visual_tokens_per_image / full.visual_tokens_per_image),
        "accuracy_kept": 100 * r.overall / full.overall,
    }


def tune(model, args: argparse.Namespace) -> dict:
    """Sweep each router's threshold on training-split questions and choose (the module docstring's rules)."""
    n, bs = args.tune_n, args.batch_size
    full = evaluate(model, n=n, routing="full", batch_size=bs, keep_records=False, split="train")
    bound = world_bound(model.config, n, [0], split="train")
    need = TARGETS["bound_share"] / 100 * 100 * bound["text_free_and_thumbnails"]  # % tokens saved
    out: dict = {"n": n, "full": full.overall, "bound": bound, "router": [], "question": []}
    for rel in [float(x) for x in args.relative_grid.split(",")]:
        policy = RoutingPolicy("router", relative_threshold=rel)
        r = evaluate(model, n=n, routing=policy, batch_size=bs, keep_records=False, split="train")
        out["router"].append(_point(rel, r, full))
    meets = [p for p in out["router"] if p["tokens_saved"] >= need]
    pick = (
        max(meets, key=lambda p: p["overall"])
        if meets
        else max(out["router"], key=lambda p: p["tokens_saved"])
    )
    out["relative_threshold"] = pick["threshold"]
    if getattr(model, "question_router", None) is not None:
        for ab in [float(x) for x in args.question_grid.split(",")]:
            policy = RoutingPolicy("question", absolute_threshold=ab)
            r = evaluate(
                model, n=n, routing=policy, batch_size=bs, keep_records=False, split="train"
            )
            out["question"].append(_point(ab, r, full))
        kept = [p for p in out["question"] if p["accuracy_kept"] >= TARGETS["accuracy_kept"]]
        pick = (
            max(kept, key=lambda p: p["tokens_saved"])
            if kept
            else max(out["question"], key=lambda p: p["overall"])
        )
        out["question_absolute_threshold"] = pick["threshold"]
    return out


def save_thresholds(checkpoint: str, flash) -> Path:
    """Write the flash thresholds into a tessera-layout checkpoint's config.json."""
    path = Path(checkpoint) / "config.json"
    config = ModelConfig.load(path)
    for name in (
        "relative_threshold",
        "absolute_threshold",
        "question_relative_threshold",
        "question_absolute_threshold",
    ):
        setattr(config.flash, name, getattr(flash, name))
    config.save(path)
    return path


# ---- the run ------------------------------------------------------------------------------------------------


def question_router_tiles(model, samples: int, turns: int) -> dict[str, float]:
    """The question router against exact per-question labels on held-out conversations of its stage's stream."""
    stream = build_question_stage(model, {"turns": turns, "workers": 0}).make
    return evaluate_question_router(model, heldout_stream_samples(stream, samples))


def run(args: argparse.Namespace) -> int:
    model = tessera.load(args.checkpoint).float().eval()
    if not model.config.flash.enabled:
        raise SystemExit(f"{args.checkpoint} is not a Flash model (no router, no mlp2)")
    flash = model.config.flash
    has_question = getattr(model, "question_router", None) is not None
    seeds = [int(x) for x in args.seeds.split(",")]
    tuning = tune(model, args) if args.tune_n else None
    if tuning:
        flash.relative_threshold = tuning["relative_threshold"]
        if has_question:
            flash.question_absolute_threshold = tuning["question_absolute_threshold"]
    per_seed = [evaluate_modes(model, args.n, seed, args.batch_size) for seed in seeds]
    results = {m: merge([r[m] for r in per_seed]) for m in per_seed[0]}
    bound = world_bound(model.config, args.n, seeds)
    vision = None
    if args.vision_images:
        images = [
            item.sample().image
            for item in eval_items(-(-args.vision_images // 7), offset=seeds[0] + 10_000)
        ][: args.vision_images]
        vision = vision_cost(model, images, args.rounds)
        if has_question:
            data, questions = world_inputs(min(8, args.vision_images), 4)
            cached = cached_question_cost(model, data, questions, args.rounds)
            vision.update(
                question_cached_ms=cached["cached_question_ms"],
                question_vit_ms=cached["vit_ms"],
                question_cached_ratio=cached["ratio"],
            )
    router_acc = None
    if args.router_samples:
        router_acc = evaluate_router(
            model, heldout_samples(model, args.router_samples, turns=args.router_turns)
        )
        router_acc["turns"] = float(args.router_turns)
        if has_question:
            router_acc["question"] = question_router_tiles(
                model, args.router_samples, args.router_turns
            )
    s = summarise(results, vision, router_acc, bound)
    s.update(
        seeds=seeds,
        tuning=tuning,
        relative_threshold=flash.relative_threshold,
        absolute_threshold=flash.absolute_threshold,
        question_relative_threshold=flash.question_relative_threshold,
        question_absolute_threshold=flash.question_absolute_threshold,
    )
    if args.save_thresholds:
        print(f"thresholds written to {save_thresholds(args.checkpoint, flash)}", file=sys.stderr)
    command = (
        "tessera bench router " + " ".join(shlex.quote(a) for a in sys.argv[3:])
        if sys.argv[1:3] == ["bench", "router"]
        else ""
    )
    text = markdown(s, args.checkpoint, command)
    if args.out:
        text += "\n\n" + write_figures(model, s, Path(args.out), seeds[0])
    if args.docs:
        replace_section(Path(args.docs), "## Flash", text + f"\n\nMachine: {machine()}.")
    print(json.dumps(s, indent=2) if args.json else text)
    return 0


def write_figures(model, s: dict, out: Path, seed: int) -> str:
    """flash.json, the trade-off plot and the routing pictures (released router; question router for the
    document question asked of the same image). Returns the markdown line naming them."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "flash.json").write_text(json.dumps(s, indent=2) + "\n")
    plot(s, out / "flash_tradeoff.png")
    doc = next(it.sample() for it in eval_items(4, families=[READING_FAMILIES[-1]], offset=seed))
    doc.image.save(out / "flash_example.png")
    draw_routing(model, out / "flash_example.png", "router", str(out / "flash_routing.png"))
    names = [f"`{out / 'flash_tradeoff.png'}`", f"`{out / 'flash_routing.png'}` (router)"]
    if getattr(model, "question_router", None) is not None:
        picture = out / "flash_routing_question.png"
        draw_routing(
            model, out / "flash_example.png", "question", str(picture), question=doc.question
        )
        names.append(f"`{picture}` (question router, for {doc.question!r})")
    return "Plot and pictures: " + ", ".join(names) + "."
