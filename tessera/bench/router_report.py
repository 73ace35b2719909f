"""The Flash table as markdown and as a plot, from `tessera.flash_table.summarise` (plus the bench's extras)."""

from __future__ import annotations

from pathlib import Path

INTRO = """`tessera bench router` (tessera/bench/router.py) evaluates one Flash checkpoint under every routing on
the same held-out questions: every tile at 1/4 (`full`), every tile at 1/16 (`compressed`), the released Visual
Resolution Router (`router`), random tiles at the router's budget per image (`random`), Tessera's question-aware
router (`question`), the released router and random at the question router's budget per image
(`router@question`, `random@question`), and two routings by what the world knows: the question-blind bound
(every tile without text and the thumbnail at 1/16) and the question's evidence tiles (the rest at 1/16).
Inference runs the ViT once, then the router, then only the chosen branch per tile, and the prompt carries
exactly the tokens used. Thresholds are chosen on training-split questions, then every number below is
measured on held-out (eval-split) seeds."""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def mode_table(s: dict) -> list[str]:
    fams = s["families"]
    lines = [
        "| routing | "
        + " | ".join(fams)
        + " | overall | reading | visual tokens / image | saved | kept | questions/s |",
        "|---|" + "---:|" * (len(fams) + 6),
    ]
    for m, r in s["modes"].items():
        cells = " | ".join(_pct(r["families"].get(f, float("nan"))) for f in fams)
        lines.append(
            f"| {m} | {cells} | {_pct(r['overall'])} | {_pct(r['reading'])} | "
            f"{r['visual_tokens']:.1f} | {r['tokens_saved']:.1f} % | {r['accuracy_kept']:.1f} % | "
            f"{r['samples_per_second']:.2f} |"
        )
    return lines


def tuning_table(t: dict) -> list[str]:
    lines = [
        f"Thresholds chosen on {t['n']} training-split questions (full: {_pct(t['full'])} %; the world bound "
        f"there: {_pct(t['bound']['text_free_and_thumbnails'])} % of the tokens):",
        "",
        "| router | threshold | visual tokens / image | saved | overall | kept | reading | chosen |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, key, which in (
        ("router", "relative_threshold", "relative"),
        ("question", "question_absolute_threshold", "absolute"),
    ):
        for p in t[name]:
            chosen = "**yes**" if p["threshold"] == t.get(key) else ""
            lines.append(
                f"| {name} | {which} {p['threshold']:.2f} | {p['visual_tokens']:.1f} | "
                f"{p['tokens_saved']:.1f} % | {_pct(p['overall'])} | {p['accuracy_kept']:.1f} % | "
                f"{_pct(p['reading'])} | {chosen} |"
            )
    return lines


def markdown(s: dict, checkpoint: str, command: str = "") -> str:
    lines = [INTRO, ""]
    if command:
        lines += ["```", command, "```", ""]
    seeds = ", ".join(str(x) for x in s.get("seeds", [s["seed"]]))
    lines += [
        f"Checkpoint `{checkpoint}`, {s['n']} held-out questions per routing (eval split, seeds {seeds}); "
        f"released router: relative {s['relative_threshold']:.2f}, absolute {s['absolute_threshold']:.2f}"
        + (
            f"; question router: relative {s['question_relative_threshold']:.2f}, absolute "
            f"{s['question_absolute_threshold']:.2f}"
            if "question" in s
            else ""
        )
        + ".",
        "",
        *mode_table(s),
        "",
    ]
    gaps = s["router_minus_random_families"]
    line = (
        f"- released router vs full: **{s['tokens_saved']:.1f} % fewer visual tokens** at **"
        f"{s['accuracy_kept']:.1f} % of the accuracy**; router − random at its budget: label "
        f"{gaps.get('label', float('nan')):+.1f}, document {gaps.get('document', float('nan')):+.1f} points"
    )
    if "world_bound" in s:
        b = s["world_bound"]
        line += (
            f"; **{s['bound_share']:.0f} % of the world bound's savings** (the bound: every text-free tile and "
            f"every thumbnail at 1/16, {_pct(b['text_free_and_thumbnails'])} % of the tokens; text-free tiles "
            f"alone {_pct(b['text_free'])} %)"
        )
    lines.append(line)
    if "question" in s:
        q = s["question"]
        lines.append(
            f"- question router vs full: **{q['tokens_saved']:.1f} % fewer visual tokens** at **"
            f"{q['accuracy_kept']:.1f} % of the accuracy**; question − released router at the same budget: "
            f"label {q['minus_router'].get('label', float('nan')):+.1f}, document "
            f"{q['minus_router'].get('document', float('nan')):+.1f} points; question − random at the same "
            f"budget: reading {q['minus_random']['reading']:+.1f}"
        )
    lines.append(
        f"- all-compressed vs full on reading: {-s['compressed_reading_drop']:+.1f} points; end-to-end eval "
        f"throughput router / full **{s['throughput_ratio']:.2f}×**"
        + (
            f", question / full **{s['question']['throughput_ratio']:.2f}×**"
            if "question" in s
            else ""
        )
    )
    if "vision" in s:
        v = s["vision"]
        lines.append(
            f"- vision side over {v['tiles']:.0f} tiles ({100 * v['compressed_fraction']:.0f} % routed to 1/16): "
            f"router / full time **{v['time_ratio']:.2f}×** ({1e3 * v['sec_router']:.0f} ms vs "
            f"{1e3 * v['sec_full']:.0f} ms; both branches as transformers' Flash does: "
            f"{1e3 * v['sec_both_branches']:.0f} ms), MACs {v['mac_ratio']:.3f}× (router = "
            f"{100 * v['router_share_of_vit']:.1f} % of the ViT; one mlp2 tile = {v['mlp2_over_mlp1']:.2f}× an "
            "mlp1 tile)"
        )
        if "question_cached_ratio" in v:
            lines.append(
                f"- a question about an image whose ViT tokens the vision server has cached (question router + "
                f"chosen branch, `tessera.serve.vision`): {v['question_cached_ms']:.1f} ms vs the ViT's "
                f"{v['question_vit_ms']:.1f} ms per image: **{v['question_cached_ratio']:.2f}×**"
            )
    if "router_tiles" in s:
        r = s["router_tiles"]
        lines.append(
            f"- released router on {r['tiles']:.0f} held-out tiles vs exact loss-ratio labels from "
            f"{r.get('turns', 1):.0f} questions per image (τ = median r): accuracy {_pct(r['accuracy'])} %, "
            f"AUC {r['auc']:.3f}"
        )
        if "question" in r:
            q = r["question"]
            lines.append(
                f"- question router on {q['rows']:.0f} held-out (tile, question) pairs vs exact per-question "
                f"labels (τ = 70th percentile): accuracy {_pct(q['accuracy'])} %, AUC {q['auc']:.3f} (the "
                f"released router on the same pairs, blind to the question: AUC {q['released_auc']:.3f})"
            )
    if s.get("tuning"):
        lines += ["", *tuning_table(s["tuning"])]
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if ok else '**no**'} |" for k, ok in s["targets"].items()]
    return "\n".join(lines)


def plot(s: dict, out: Path) -> None:
    """Accuracy (filled: overall, hollow: reading) against visual tokens per image, one marker per routing,
    and the training-split threshold sweeps as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for (m, r), marker in zip(s["modes"].items(), "osD^v<>ph*"):
        ax.scatter(r["visual_tokens"], 100 * r["overall"], marker=marker, s=50, label=m)
        ax.scatter(
            r["visual_tokens"],
            100 * r["reading"],
            marker=marker,
            s=50,
            facecolors="none",
            edgecolors="k",
        )
    t = s.get("tuning") or {}
    for name, style in (("router", "-"), ("question", "--")):
        if t.get(name):
            pts = sorted(t[name], key=lambda p: p["visual_tokens"])
            ax.plot(
                [p["visual_tokens"] for p in pts],
                [100 * p["overall"] for p in pts],
                style,
                color="grey",
                lw=1,
                label=f"{name} sweep (training split)",
            )
    ax.set_xlabel("visual tokens per image")
    ax.set_ylabel("accuracy (%); hollow: reading families")
    ax.set_title("Flash: accuracy vs visual tokens (held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
