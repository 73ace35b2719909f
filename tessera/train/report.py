"""The recipe's report: accuracy table with chance levels, training curves (PNG) and a JSON summary.

Chance per family is measured, not assumed: the accuracy of always giving that family's most frequent
answer on the world's training distribution (the best answer a blind model can learn), estimated from
`n` scenes laid out without rendering.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tessera.evaluate import EvalResult, format_report


def chance_levels(n: int = 400, seed: int = 0) -> dict[str, float]:
    """family → accuracy of always answering that family's most common answer (train split, difficulty 1)."""
    from tessera.world import FAMILIES, build

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
    """Loss per stage (left) and held-out accuracy during training (right), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for name, folder in stage_dirs.items():
        train, evals = read_metrics(folder / "metrics.jsonl")
        if train:
            steps, losses = [offset + r["step"] for r in train], [r["loss"] for r in train]
            line, = ax_loss.plot(steps, losses, alpha=0.3)
            k = max(1, len(losses) // 30)  # moving average over ~1/30 of the stage
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
            ax_loss.plot(steps, smooth, color=line.get_color(), label=name)
        if evals:
            ax_acc.plot([offset + r["step"] for r in evals], [r["eval"]["overall"] for r in evals], marker="o", label=name)
        offset += train[-1]["step"] if train else 0
    ax_loss.set(xlabel="step (stages in sequence)", ylabel="loss (square-averaged CE)", yscale="log", title="training loss")
    ax_acc.set(xlabel="step (stages in sequence)", ylabel="held-out accuracy", ylim=(0, 1), title="accuracy during training")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(out: Path, result: EvalResult, stage_dirs: dict[str, Path], stage_seconds: dict[str, float],
                 extra: dict[str, Any] | None = None, chance_n: int = 400) -> dict[str, Any]:
    """Write report.md, curves.png and summary.json into `out`; return the summary."""
    chance = chance_levels(chance_n)
    curves = plot_curves(stage_dirs, out / "curves.png")
    summary = {"eval": result.to_json(), "chance": chance, "stage_seconds": stage_seconds,
               "final_losses": {name: (read_metrics(d / "metrics.jsonl")[0] or [{}])[-1].get("loss")
                                for name, d in stage_dirs.items()},
               **(extra or {})}
    lines = ["# Tessera recipe report", "",
             f"Held-out world set: {result.n} questions (seed {result.seed}), routing `{result.routing}`.", "",
             format_report(result, chance), "",
             "Chance = always answering the family's most frequent answer on the training distribution.", "",
             "| stage | seconds | final loss |", "|---|---:|---:|"]
    for name in stage_dirs:
        loss = summary["final_losses"][name]
        lines.append(f"| {name} | {stage_seconds.get(name, 0):.0f} | {loss:.4f} |" if loss is not None else f"| {name} | - | - |")
    lines += ["", f"![training curves]({curves.name})", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
