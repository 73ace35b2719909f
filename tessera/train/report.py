"""The recipe's report: accuracy tables (the final model with chance levels, every evaluated stage side by side,
the Flash routings), seconds per stage, training curves (PNG) and a JSON summary with the same numbers.

Chance per family is measured, not assumed: the accuracy of always giving that family's most frequent
answer on the world's training distribution (the best answer a blind model can learn), estimated from
`n` scenes laid out without rendering.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from tessera.evaluate import EvalResult, family_table, format_report
from tessera.world import FAMILIES, build


def chance_levels(n: int = 400, seed: int = 0) -> dict[str, float]:
    """family → accuracy of always answering that family's most common answer (train split, difficulty 1)."""
    out = {}
    for family in FAMILIES:
        answers = Counter(build(seed + i, family, "train")[1].answer for i in range(n))
        out[family] = answers.most_common(1)[0][1] / n
    return out


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, evaluation records) of a metrics.jsonl."""
    train, evals = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                (evals if "eval" in record else train).append(record)
    return train, evals


def plot_curves(stage_dirs: dict[str, Path], out: Path) -> Path:
    """Loss per stage (left) and held-out accuracy during training (right), one PNG.

    Each stage plots its own objective (CE, DPO + BCO + NLL, GSPO's clipped surrogate, KL, BCE), so the loss axis is
    symmetric-log: GSPO's surrogate is negative when the rewarded answers dominate. Evaluations without an overall
    accuracy (the router's tile accuracy) stay in metrics.jsonl only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for name, folder in stage_dirs.items():
        train, evals = read_metrics(folder / "metrics.jsonl")
        evals = [r for r in evals if "overall" in r["eval"]]
        if train:
            steps, losses = [offset + r["step"] for r in train], [r["loss"] for r in train]
            (line,) = ax_loss.plot(steps, losses, alpha=0.3)
            k = max(1, len(losses) // 30)  # moving average over ~1/30 of the stage
            smooth = [
                sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                for i in range(len(losses))
            ]
            ax_loss.plot(steps, smooth, color=line.get_color(), label=name)
        if evals:
            ax_acc.plot(
                [offset + r["step"] for r in evals],
                [r["eval"]["overall"] for r in evals],
                marker="o",
                label=name,
            )
        offset += train[-1]["step"] if train else 0
    ax_loss.set(
        xlabel="step (stages in sequence)",
        ylabel="loss (each stage's objective)",
        title="training loss",
    )
    ax_loss.set_yscale("symlog", linthresh=1e-2)
    ax_acc.set(
        xlabel="step (stages in sequence)",
        ylabel="held-out accuracy",
        ylim=(0, 1),
        title="accuracy during training",
    )
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def stage_table(
    stage_dirs: dict[str, Path], stage_seconds: dict[str, float]
) -> tuple[list[str], dict[str, dict]]:
    """Markdown lines and numbers per stage: steps, wall seconds (build, training, probes), mean seconds of the
    logged steps, last logged loss."""
    rows: dict[str, dict] = {}
    lines = ["| stage | steps | seconds | s / step | final loss |", "|---|---:|---:|---:|---:|"]
    for name, folder in stage_dirs.items():
        train, _ = read_metrics(folder / "metrics.jsonl")
        row = {
            "steps": train[-1]["step"] if train else 0,
            "seconds": stage_seconds.get(name),
            "sec_per_step": sum(r["sec"] for r in train) / len(train) if train else None,
            "final_loss": train[-1]["loss"] if train else None,
        }
        rows[name] = row
        cells = [
            str(row["steps"]),
            _number(row["seconds"], ".0f"),
            _number(row["sec_per_step"], ".2f"),
            _number(row["final_loss"], ".4f"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines, rows


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def flash_table(flash: dict[str, Any]) -> list[str]:
    """Markdown lines of the Flash table (a tessera.flash_table.summarise result): per routing, the accuracy per
    family and overall, visual tokens per image, and tokens saved / accuracy kept relative to full."""
    fams = flash["families"]
    lines = [
        "| routing | "
        + " | ".join(fams)
        + " | overall | visual tokens / image | tokens saved | accuracy kept |",
        "|---|" + "---:|" * (len(fams) + 4),
    ]
    for mode, r in flash["modes"].items():
        cells = " | ".join(f"{r['families'].get(f, float('nan')):.1%}" for f in fams)
        kept = (
            "-" if math.isnan(r["accuracy_kept"]) else f"{r['accuracy_kept']:.1f} %"
        )  # nan: full got nothing right
        lines.append(
            f"| {mode} | {cells} | {r['overall']:.1%} | {r['visual_tokens']:.1f} | {r['tokens_saved']:.1f} % "
            f"| {kept} |"
        )
    drop = 0.0 - flash["compressed_reading_drop"]  # 0.0 - x: no "-0.0"
    lines += [
        "",
        f"Router thresholds: relative {flash['relative_threshold']:.2f}, absolute "
        f"{flash['absolute_threshold']:.2f}; `random` compresses as many tiles per image as the router. On the "
        f"reading families (label, document): router − random {flash['router_minus_random']:+.1f} points, "
        f"all-compressed − full {drop:+.1f} points.",
    ]
    return lines


def write_report(
    out: Path,
    result: EvalResult,
    stage_dirs: dict[str, Path],
    stage_seconds: dict[str, float],
    extra: dict[str, Any] | None = None,
    chance_n: int = 400,
    stage_evals: dict[str, EvalResult] | None = None,
    flash: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write report.md, curves.png and summary.json into `out`; return the summary.

    result: the final model's evaluation; stage_evals: stage → evaluation of the model that stage produced (e.g.
    after sft, before RL); flash: the final model's Flash table (tessera.flash_table.flash_summary) or None."""
    stage_evals = stage_evals or {}
    chance = chance_levels(chance_n)
    curves = plot_curves(stage_dirs, out / "curves.png")
    stages_md, stages = stage_table(stage_dirs, stage_seconds)
    summary = {
        "eval": result.to_json(),
        "chance": chance,
        "stage_seconds": stage_seconds,
        "final_losses": {name: row["final_loss"] for name, row in stages.items()},
        "stages": stages,
        "stage_evals": {name: r.to_json() for name, r in stage_evals.items()},
        "flash": flash,
        **(extra or {}),
    }
    lines = [
        "# Tessera recipe report",
        "",
        f"Final model{f' (after {list(stage_dirs)[-1]})' if stage_dirs else ''}, held-out world set: {result.n} "
        f"questions (seed {result.seed}), routing `{result.routing}`.",
        "",
        format_report(result, chance),
        "",
        "Chance = always answering the family's most frequent answer on the training distribution.",
        "",
    ]
    if stage_evals:
        columns = {
            f"after {name}": {"families": r.families, "overall": r.overall}
            for name, r in stage_evals.items()
        }
        columns["final"] = {"families": result.families, "overall": result.overall}
        lines += [
            "## Per family through the cascade",
            "",
            f"The same {result.n} held-out questions (routing `full`) for the model each stage produced.",
            "",
            *family_table(columns),
            "",
        ]
    if flash is not None:
        lines += [
            "## Flash: what the router buys (final model)",
            "",
            f"{flash['n']} held-out questions per routing (seed {flash['seed']}).",
            "",
            *flash_table(flash),
            "",
        ]
    lines += [
        "## Stages",
        "",
        "Wall seconds per stage (building it, e.g. mpo's rollouts, training and probes); "
        "s / step = mean over the logged steps.",
        "",
        *stages_md,
        "",
        f"![training curves]({curves.name})",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
