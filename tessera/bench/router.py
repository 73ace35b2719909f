"""`tessera bench router CKPT`: the Flash table — what the Visual Resolution Router buys, measured.

A miniature of the paper's Table 17: on the world's held-out questions, per-family accuracy and visual tokens
per image for four routings of the same Flash checkpoint —
    full        every tile at 1/4 (mlp1)          compressed  every tile at 1/16 (mlp2)
    router      ViR decides per tile              random      per image, as many tiles as the router, at random
— then % visual tokens saved and % accuracy kept (router vs full), router − random on the reading families
(same budget), the vision-side cost (ViT + router + chosen branch vs ViT + mlp1, timed and counted in MACs),
the end-to-end eval throughput ratio, and the router's accuracy on held-out tiles against exact loss-ratio
labels. `--docs docs/BENCHMARKS.md` rewrites that file's "## Flash" section with the result; `--out DIR` also
writes flash.json, an accuracy-vs-tokens plot and a routing picture.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import tessera
from tessera.bench.docs import replace_section
from tessera.flash_table import evaluate_modes, reading_accuracy, summarise
from tessera.image import ImageProcessor
from tessera.routing import draw_routing, encode_routed
from tessera.train.router_stage import evaluate_router, heldout_samples
from tessera.world import FAMILIES, READING_FAMILIES, eval_items, text_free_token_savings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a Flash checkpoint (trained: ViCO then router)")
    p.add_argument(
        "--n",
        type=int,
        default=140,
        help="held-out questions per routing, interleaved over the families",
    )
    p.add_argument("--seed", type=int, default=0, help="offset of the held-out set")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--router-samples",
        type=int,
        default=48,
        help="held-out samples for the router's tile accuracy (0: skip)",
    )
    p.add_argument(
        "--router-turns",
        type=int,
        default=4,
        help="questions per held-out image whose loss ratios label the tiles (the recipe's router stage: 4)",
    )
    p.add_argument(
        "--vision-images", type=int, default=32, help="images for the vision-side timing"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="timed rounds of the vision side; the median is reported",
    )
    p.add_argument("--out", help="folder for flash.json, flash_tradeoff.png and flash_routing.png")
    p.add_argument(
        "--docs", help="markdown file whose '## Flash' section is replaced with the result"
    )
    p.add_argument(
        "--relative-threshold",
        type=float,
        help="override the checkpoint's flash.relative_threshold",
    )
    p.add_argument(
        "--absolute-threshold",
        type=float,
        help="override the checkpoint's flash.absolute_threshold",
    )
    p.add_argument(
        "--sweep",
        help="comma-separated relative thresholds: router and random at each (the trade-off curve)",
    )
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


# ---- the table ---------------------------------------------------------------------------------------------


def world_bound(config, n: int, seed: int = 0) -> dict[str, float]:
    """tessera.world.text_free_token_savings on the table's own n held-out questions."""
    items = eval_items(-(-n // len(FAMILIES)), FAMILIES, offset=seed)[:n]
    return text_free_token_savings(
        (it.sample() for it in items), config.tokens_per_tile, config.compressed_tokens_per_tile
    )


INTRO = """`tessera bench router` (tessera/bench/router.py) evaluates one Flash checkpoint four ways on the same held-out
questions: every tile at 1/4 (`full`, mlp1), every tile at 1/16 (`compressed`, mlp2), the Visual Resolution Router
deciding per tile (`router`), and per image as many tiles as the router compresses but chosen at random (`random`, the
same visual-token budget). Inference runs the ViT once, then the router, then only the chosen branch per tile, and the
prompt carries exactly the tokens used. A miniature of the paper's Table 17."""


def markdown(s: dict, checkpoint: str, command: str = "") -> str:
    fams = s["families"]
    lines = [INTRO, ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"Checkpoint `{checkpoint}`, {s['n']} held-out questions per routing (seed {s['seed']}); router thresholds "
        f"relative {s['relative_threshold']:.2f}, absolute {s['absolute_threshold']:.2f}.",
        "",
        "| routing | "
        + " | ".join(fams)
        + " | overall | reading | visual tokens / image | tiles at 1/16 | questions/s |",
        "|---|" + "---:|" * (len(fams) + 5),
    ]
    for m, r in s["modes"].items():
        cells = " | ".join(f"{100 * r['families'].get(f, float('nan')):.1f}" for f in fams)
        lines.append(
            f"| {m} | {cells} | {100 * r['overall']:.1f} | {100 * r['reading']:.1f} | {r['visual_tokens']:.1f} "
            f"| {100 * r['compressed_tiles']:.0f} % | {r['samples_per_second']:.2f} |"
        )
    lines += [
        "",
        f"- router vs full: **{s['tokens_saved']:.1f} % fewer visual tokens**, **{s['accuracy_kept']:.1f} % of the "
        f"accuracy** ({s['reading_kept']:.1f} % on reading families)",
        f"- all-compressed vs full on reading: {-s['compressed_reading_drop']:+.1f} points; router − random at the same "
        f"budget on reading: {s['router_minus_random']:+.1f} points",
        f"- end-to-end eval throughput, router / full: **{s['throughput_ratio']:.2f}×**",
    ]
    if "vision" in s:
        v = s["vision"]
        lines.append(
            f"- vision side over {v['tiles']:.0f} tiles ({100 * v['compressed_fraction']:.0f} % routed to 1/16): "
            f"router / full time **{v['time_ratio']:.2f}×** ({1e3 * v['sec_router']:.0f} ms vs {1e3 * v['sec_full']:.0f} ms; "
            f"both branches as transformers' Flash does: {1e3 * v['sec_both_branches']:.0f} ms), MACs {v['mac_ratio']:.3f}× "
            f"(router = {100 * v['router_share_of_vit']:.1f} % of the ViT; one mlp2 tile = {v['mlp2_over_mlp1']:.2f}× an mlp1 tile)"
        )
    if s.get("sweep"):
        lines += [
            "",
            f"Trade-off (absolute threshold {s['absolute_threshold']:.2f}; random compresses as many tiles as the "
            "router at each point):",
            "",
            "| relative threshold | visual tokens / image | router overall | router reading | random overall | random reading |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for pt in s["sweep"]:
            lines.append(
                f"| {pt['relative']:.2f} | {pt['router']['visual_tokens']:.1f} | {100 * pt['router']['overall']:.1f} | "
                f"{100 * pt['router']['reading']:.1f} | {100 * pt['random']['overall']:.1f} | {100 * pt['random']['reading']:.1f} |"
            )
    if "router_tiles" in s:
        r = s["router_tiles"]
        lines.append(
            f"- router on {r['tiles']:.0f} held-out tiles vs exact loss-ratio labels from {r.get('turns', 1):.0f} "
            f"question(s) per image (τ = median r = {r['tau']:.3f}): "
            f"accuracy {100 * r['accuracy']:.1f} %, balanced {100 * r['balanced_accuracy']:.1f} %, AUC {r['auc']:.3f}"
        )
    if "world_bound" in s:
        b = s["world_bound"]
        lines.append(
            f"- world bound: a router that sees tiles but not the question keeps every reading answer only by keeping "
            f"every tile with text; compressing exactly the others saves {100 * b['text_free']:.1f} % of the visual "
            f"tokens ({100 * b['text_free_and_thumbnails']:.1f} % with every thumbnail too)"
        )
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if ok else '**no**'} |" for k, ok in s["targets"].items()]
    return "\n".join(lines)


def plot(s: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (m, r), marker in zip(s["modes"].items(), "osD^v<>"):
        ax.scatter(
            r["visual_tokens"], 100 * r["overall"], marker=marker, s=60, label=f"{m} (overall)"
        )
        ax.scatter(
            r["visual_tokens"],
            100 * r["reading"],
            marker=marker,
            s=60,
            facecolors="none",
            edgecolors="k",
        )
        ax.annotate(
            m,
            (r["visual_tokens"], 100 * r["overall"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    if s.get("sweep"):
        for m, style in (("router", "-"), ("random", "--")):
            xs = [pt[m]["visual_tokens"] for pt in s["sweep"]]
            ax.plot(
                xs,
                [100 * pt[m]["reading"] for pt in s["sweep"]],
                style,
                color="k",
                lw=1,
                label=f"{m} sweep (reading)",
            )
    ax.set_xlabel("visual tokens per image")
    ax.set_ylabel("accuracy (%)  — hollow: reading families")
    ax.set_title("Flash: accuracy vs visual tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    model = tessera.load(args.checkpoint).eval()
    if not model.config.flash.enabled:
        raise SystemExit(f"{args.checkpoint} is not a Flash model (no router, no mlp2)")
    flash = model.config.flash
    if args.relative_threshold is not None:
        flash.relative_threshold = args.relative_threshold
    if args.absolute_threshold is not None:
        flash.absolute_threshold = args.absolute_threshold

    results = evaluate_modes(model, args.n, args.seed, args.batch_size)
    sweep = []
    chosen = flash.relative_threshold
    for t in [float(x) for x in args.sweep.split(",")] if args.sweep else []:
        flash.relative_threshold = (
            t  # routing reads the thresholds from the config at each decision
        )
        pair = evaluate_modes(model, args.n, args.seed, args.batch_size, ("router", "random"))
        sweep.append(
            {
                "relative": t,
                **{
                    m: {
                        "overall": r.overall,
                        "reading": reading_accuracy(r),
                        "visual_tokens": r.visual_tokens_per_image,
                    }
                    for m, r in pair.items()
                },
            }
        )
    flash.relative_threshold = chosen
    images = [
        item.sample().image
        for item in eval_items(-(-args.vision_images // 7), offset=args.seed + 10_000)
    ]
    vision = (
        vision_cost(model, images[: args.vision_images], args.rounds)
        if args.vision_images
        else None
    )
    router_acc = None
    if args.router_samples:
        router_acc = evaluate_router(
            model, heldout_samples(model, args.router_samples, turns=args.router_turns)
        )
        router_acc["turns"] = float(args.router_turns)
    s = summarise(results, vision, router_acc)
    s["world_bound"] = world_bound(model.config, args.n, args.seed)
    s.update(
        relative_threshold=flash.relative_threshold,
        absolute_threshold=flash.absolute_threshold,
        sweep=sweep,
    )
    import shlex
    import sys

    text = markdown(
        s,
        args.checkpoint,
        "tessera bench router " + " ".join(shlex.quote(a) for a in sys.argv[3:])
        if sys.argv[1:3] == ["bench", "router"]
        else "",
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "flash.json").write_text(json.dumps(s, indent=2) + "\n")
        plot(s, out / "flash_tradeoff.png")
        doc = next(
            it.sample() for it in eval_items(4, families=[READING_FAMILIES[-1]], offset=args.seed)
        )
        doc.image.save(out / "flash_example.png")
        draw_routing(model, out / "flash_example.png", "router", str(out / "flash_routing.png"))
        text += f"\n\nPlot: `{out / 'flash_tradeoff.png'}`; routing picture: `{out / 'flash_routing.png'}`."
    if args.docs:
        replace_section(Path(args.docs), "## Flash", text)
    print(json.dumps(s, indent=2) if args.json else text)
    return 0
