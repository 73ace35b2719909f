"""`tessera bench cascade --init SFT_CKPT --out DIR`: the miniature of InternVL3.5's Table 16, plus Best-of-N.

From one SFT checkpoint:
  SFT                 the checkpoint itself
  +MPO                offline RL on preference pairs from the SFT model's own rollouts
  +GSPO (1 pass)      online RL, one pass over the filtered queries (offline accuracy in [0.2, 0.8]); a pass is
                      `pass_epochs` epochs over them (4 by default: the miniature's pool is small, and GSPO needs
                      thousands of steps here before greedy accuracy moves)
  +GSPO (2 passes)    the same run continued for a second pass (constant learning rate, so pass 1 is its midpoint)
  Cascade ½, 0.9 pass MPO, then GSPO for part of a pass (the cascade's claim is that its online stage can be short;
                      `cascade_stops`)
  Cascade             the same run continued to one pass
Each row has the reasoning accuracy on a held-out set (greedy, thinking on) and its compute: CPU seconds of
training (rollouts made during training included) and the exact, machine-independent token passes
(tessera.bench.compute). The offline collection (the SFT model's rollouts that give
MPO its pairs and every GSPO run its query filter) is shared by all RL rows and reported once, beside them.
The defaults are the measured run of docs/BENCHMARKS.md (≈ 2 hours at two threads); --quick exercises the path.
Then the per-family accuracy before (SFT) and after (every row), and Best-of-N on the Cascade model: a critic
(tessera.best_of_n) is trained on the Cascade model's rollouts of fresh training queries, and each held-out reasoning
question gets 8 samples; N = 4 uses the first 4. Written to DIR/cascade.md and DIR/cascade.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import tessera
from tessera.answers import SamplingConfig, rollout, world_query
from tessera.bench.best_of_n import BestOfNConfig, best_of_n_table, format_best_of_n
from tessera.bench.compute import count_token_passes
from tessera.evaluate import evaluate, family_table
from tessera.train.gspo import GSPOConfig, GSPOStage, select_queries
from tessera.train.mpo import MPOData, MPOStage, collect_or_load
from tessera.train.trainer import TrainConfig, Trainer
from tessera.world import FAMILIES, eval_items


@dataclass
class CascadeConfig:
    collect_queries: int = 4000  # offline rollouts of the SFT model (MPO pairs, GSPO filter)
    group_size: int = 8
    families: dict[str, float] = field(
        default_factory=dict
    )  # {} → tessera.train.rollout.default_rl_families()
    mpo_steps: int = 240
    mpo_lr: float = 2e-5
    pairs_per_batch: int = 8
    gspo_lr: float = 1e-5
    queries_per_rollout: int = 8
    mini_batches: int = 4
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    pass_epochs: int = 4  # epochs over the filtered queries in one GSPO pass
    # the cascade's run is also measured at these fractions of its pass: ½, and 0.9, the length at which its
    # compute (MPO + 0.9 pass) is ≤ 60 % of two GSPO passes (the second pass costs less than the first)
    cascade_stops: tuple[float, ...] = (0.5, 0.9)
    eval_per_family: int = 200  # the per-family table
    eval_reasoning: int = 600  # reasoning questions for the headline accuracy
    eval_seed: int = 0
    sampled_temperature: float = (
        0.6  # the reasoning column "sampled": mean accuracy of answers sampled at this temperature
    )
    sampled_group: int = 4  # ... this many per held-out question
    best_of: tuple[int, ...] = (1, 4, 8)
    critic_queries: int = 200
    bon_temperature: float = 0.7
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.pass_epochs < 1:
            raise ValueError(f"pass_epochs must be at least 1, got {self.pass_epochs}")
        if any(not 0 < f < 1 for f in self.cascade_stops):
            raise ValueError(
                f"cascade_stops are fractions of a pass in (0, 1), got {self.cascade_stops}"
            )
        self.cascade_stops = tuple(self.cascade_stops)  # a JSON override gives a list


def quick_config() -> CascadeConfig:
    """Every step at toy scale (exercises the path in about a minute; measures nothing)."""
    return CascadeConfig(
        collect_queries=8,
        group_size=4,
        mpo_steps=2,
        pairs_per_batch=2,
        queries_per_rollout=2,
        mini_batches=2,
        pass_epochs=2,
        cascade_stops=(0.5, 0.75),
        eval_per_family=2,
        eval_reasoning=4,
        best_of=(1, 2, 4),
        critic_queries=8,
    )


def _cpu() -> float:
    return time.process_time()


def _measure(model, cfg: CascadeConfig) -> dict[str, Any]:
    """Per-family accuracy (eval_per_family each) and reasoning accuracy on eval_reasoning questions, greedy."""
    fam = evaluate(
        model, seed=cfg.eval_seed, n=cfg.eval_per_family * len(FAMILIES), keep_records=False
    )
    rea = evaluate(
        model, seed=cfg.eval_seed, n=cfg.eval_reasoning, families=["reasoning"], keep_records=False
    )
    return {
        "reasoning": rea.overall,
        "families": fam.families,
        "overall": fam.overall,
        "sampled": sampled_accuracy(
            model,
            cfg.eval_reasoning,
            cfg.eval_seed,
            cfg.sampled_temperature,
            cfg.sampled_group,
            cfg.seed,
        ),
    }


def sampled_accuracy(
    model, n: int, eval_seed: int, temperature: float, group_size: int, seed: int = 0
) -> float:
    """Mean accuracy of `group_size` answers sampled at `temperature` for each of n held-out reasoning questions.

    Greedy decoding reads the policy's mode; RL that sharpens the distribution around it moves this number
    and can leave the mode (and so the greedy accuracy) where it was."""
    queries = [
        world_query(it.seed, it.family, split=it.split)
        for it in eval_items(n, ["reasoning"], offset=eval_seed)
    ]
    groups = rollout(
        model,
        queries,
        SamplingConfig(temperature=temperature, group_size=group_size, seed=seed + 29),
    )
    return sum(sum(g.rewards) for g in groups) / max(1, group_size * len(groups))


def _train(
    model,
    stage,
    steps: int,
    lr: float,
    out: Path,
    cfg: CascadeConfig,
    stop_after: int | None = None,
):
    # RL runs use a constant learning rate after a short warm-up: a pass boundary is then just a point in the run
    config = TrainConfig(
        steps=steps,
        lr=lr,
        warmup_steps=min(5, steps),
        min_lr_ratio=1.0,
        log_every=1,
        save_every=0,
        keep_checkpoints=1,
        seed=cfg.seed,
        threads=cfg.threads,
        progress=False,
    )
    trainer = Trainer(model, stage, config, out)
    start = _cpu()
    with count_token_passes(model) as passes:
        result = trainer.fit(resume=True, stop_after=stop_after)
    return result, {"cpu_seconds": _cpu() - start, "token_passes": passes.total}


def _plus(*costs: dict[str, float]) -> dict[str, float]:
    """The cost of runs one after another (a row's compute is everything trained to reach it)."""
    return {k: sum(c[k] for c in costs) for k in costs[0]}


def cascade_stop_steps(
    fractions: tuple[float, ...], steps_per_pass: int
) -> list[tuple[float, int]]:
    """(fraction, step) for each fraction of a pass, rounded to a step in [1, steps_per_pass − 1], duplicates dropped."""
    out: dict[int, float] = {}
    for f in sorted(fractions):
        step = min(max(1, round(f * steps_per_pass)), steps_per_pass - 1)
        if step >= 1 and step not in out:
            out[step] = f
    return [(f, step) for step, f in sorted(out.items())]


def _pass_name(fraction: float) -> str:
    return "½ pass" if fraction == 0.5 else f"{fraction:g} pass"


def run_cascade(
    sft_dir: str | Path, out: str | Path, cfg: CascadeConfig = CascadeConfig(), log=print
) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rows: dict[str, dict[str, Any]] = {}
    log("cascade: evaluating SFT")
    rows["SFT"] = {**_measure(tessera.load(sft_dir), cfg), "cpu_seconds": 0.0, "token_passes": 0}

    offline_dir = out / "offline"
    sft = tessera.load(sft_dir)
    data = MPOData(
        out=str(offline_dir),
        queries=cfg.collect_queries,
        families=cfg.families,
        sampling=SamplingConfig(group_size=cfg.group_size, seed=cfg.seed),
        pairs_per_batch=cfg.pairs_per_batch,
    )
    with count_token_passes(sft) as offline_passes:
        offline = collect_or_load(sft, data, log=log)
    collect_cpu = (
        offline.seconds
    )  # measured when collected (and kept in offline/collect.json for a rerun)
    pool = select_queries(offline.stats)
    log(
        f"cascade: {len(offline.pairs)} pairs, {len(pool)}/{len(offline.stats)} queries in [0.2, 0.8], "
        f"offline accuracy {offline.accuracy:.3f}"
    )
    gspo_sampling = SamplingConfig(
        group_size=cfg.group_size, queries_per_batch=cfg.queries_per_rollout, seed=cfg.seed
    )
    gspo_cfg = GSPOConfig(
        queries_per_rollout=cfg.queries_per_rollout,
        mini_batches=cfg.mini_batches,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        sampling=gspo_sampling,
    )
    steps_per_pass = (
        cfg.pass_epochs * math.ceil(len(pool) / cfg.queries_per_rollout) * cfg.mini_batches
    )

    log("cascade: +MPO")
    mpo_model = tessera.load(sft_dir)
    # the SFT model sampled the pairs in fp32, so their recorded log-probs are the frozen reference (no reference
    # pass); the collection's image features serve every arm (the vision side is frozen in MPO and GSPO alike,
    # and every filtered query has pairs), so each arm's compute is its training steps and rollouts
    mpo_stage = MPOStage(
        offline.pairs, cfg.pairs_per_batch, seed=cfg.seed, prepared=dict(offline.prepared)
    )
    mpo_result, mpo_cost = _train(mpo_model, mpo_stage, cfg.mpo_steps, cfg.mpo_lr, out / "mpo", cfg)
    rows["+MPO"] = {**_measure(mpo_model, cfg), **mpo_cost}
    log(f"cascade: MPO's reference log-probs came from the {mpo_stage.reference_source}")

    log(f"cascade: +GSPO, two passes of {steps_per_pass} steps")
    g_model = tessera.load(sft_dir)
    g_stage = GSPOStage(pool, gspo_cfg, prepared=dict(offline.prepared))
    _, g1_cost = _train(
        g_model,
        g_stage,
        2 * steps_per_pass,
        cfg.gspo_lr,
        out / "gspo",
        cfg,
        stop_after=steps_per_pass,
    )
    rows["+GSPO (1 pass)"] = {**_measure(g_model, cfg), **g1_cost}
    g_result, g2_cost = _train(g_model, g_stage, 2 * steps_per_pass, cfg.gspo_lr, out / "gspo", cfg)
    rows["+GSPO (2 passes)"] = {**_measure(g_model, cfg), **_plus(g1_cost, g2_cost)}

    log(
        f"cascade: MPO → GSPO (measured at {', '.join(f'{f:g}' for f in cfg.cascade_stops)} of a pass, then one pass)"
    )
    c_model = tessera.load(out / "mpo" / "final")
    c_stage = GSPOStage(pool, gspo_cfg, prepared=dict(offline.prepared))
    spent = [
        mpo_cost
    ]  # one run, measured at each stop (constant learning rate: a stop is just a point in it)
    for fraction, step in cascade_stop_steps(cfg.cascade_stops, steps_per_pass):
        _, cost = _train(
            c_model, c_stage, steps_per_pass, cfg.gspo_lr, out / "cascade", cfg, stop_after=step
        )
        spent.append(cost)
        rows[f"Cascade (MPO → GSPO {_pass_name(fraction)})"] = {
            **_measure(c_model, cfg),
            **_plus(*spent),
        }
    c_result, c_cost = _train(c_model, c_stage, steps_per_pass, cfg.gspo_lr, out / "cascade", cfg)
    rows["Cascade (MPO → GSPO)"] = {**_measure(c_model, cfg), **_plus(*spent, c_cost)}

    log("cascade: Best-of-N on the Cascade model")
    bon_sampling = SamplingConfig(
        temperature=cfg.bon_temperature, group_size=cfg.group_size, seed=cfg.seed
    )
    bon_cfg = BestOfNConfig(
        cfg.eval_reasoning,
        cfg.best_of,
        cfg.critic_queries,
        cfg.families,
        cfg.eval_seed,
        bon_sampling,
    )
    bon = best_of_n_table(c_model, bon_cfg, out / "critic")
    summary = {
        "config": asdict(cfg),
        "rows": rows,
        "offline": {
            "queries": len(offline.stats),
            "pairs": len(offline.pairs),
            "accuracy": offline.accuracy,
            "filtered_queries": len(pool),
            "cpu_seconds": collect_cpu,
            "token_passes": offline_passes.total or None,
        },  # None: read back from an earlier run
        "steps_per_pass": steps_per_pass,
        "mpo_reference": mpo_stage.reference_source,
        "best_of_n": bon,
        "training_curves": {
            name: [
                {k: h.get(k) for k in ("step", "loss", "reward", "clip_fraction", "reward_margin")}
                for h in r.history
            ]
            for name, r in (("mpo", mpo_result), ("gspo", g_result), ("cascade", c_result))
        },
    }
    (out / "cascade.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "cascade.md").write_text(format_cascade(summary))
    return summary


def format_cascade(summary: dict[str, Any]) -> str:
    rows, off = summary["rows"], summary["offline"]
    base, base_sampled = rows["SFT"]["reasoning"], rows["SFT"].get("sampled", float("nan"))
    lines = [
        "# Cascade RL in miniature (InternVL3.5 Table 16)",
        "",
        f"Offline collection (shared by every RL row): {off['queries']} training queries × "
        f"{summary['config']['group_size']} rollouts, {off['pairs']} preference pairs, rollout accuracy "
        f"{off['accuracy']:.1%}; {off['filtered_queries']} queries with accuracy in [0.2, 0.8]; "
        f"{off['cpu_seconds']:.0f} CPU s. One GSPO pass = {summary['steps_per_pass']} steps "
        f"({summary['config'].get('pass_epochs', 1)} epoch(s) over the filtered queries).",
        "",
        f'Reasoning is greedy (the headline); "sampled" is the mean accuracy of '
        f"{summary['config']['sampled_group']} answers sampled at temperature "
        f"{summary['config']['sampled_temperature']} per question.",
        "",
        "Compute is what training spent to reach the row: CPU seconds, and token passes (every token position "
        "the language model runs forward counts 1, and 3 when it is also differentiated; exact, unlike CPU "
        "seconds on a shared machine; tessera.bench.compute).",
        "",
        "| model | reasoning | Δ vs SFT | sampled | Δ sampled | all families | training CPU s | "
        "incl. offline collection | token passes (M) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        total = r["cpu_seconds"] + (off["cpu_seconds"] if name != "SFT" else 0.0)
        sampled = r.get("sampled", float("nan"))
        passes = r.get("token_passes")
        lines.append(
            f"| {name} | {r['reasoning']:.1%} | {100 * (r['reasoning'] - base):+.1f} | {sampled:.1%} | "
            f"{100 * (sampled - base_sampled):+.1f} | {r['overall']:.1%} | "
            f"{r['cpu_seconds']:.0f} | {total:.0f} | {'' if passes is None else f'{passes / 1e6:.1f}'} |"
        )
    lines += ["", *compute_ratios(rows)]
    lines += ["", "Per family (greedy; thinking on for reasoning):", "", *family_table(rows)]
    lines += ["", *format_best_of_n(summary["best_of_n"], "the Cascade model")]
    return "\n".join(lines) + "\n"


def compute_ratios(
    rows: dict[str, dict[str, Any]], reference: str = "+GSPO (2 passes)"
) -> list[str]:
    """One line per cascade row: its accuracy against `reference`'s and its compute as a share of it."""
    ref = rows.get(reference)
    if ref is None:
        return []
    out = []
    for name, r in rows.items():
        if not name.startswith("Cascade"):
            continue
        shares = [
            f"{r['cpu_seconds'] / ref['cpu_seconds']:.1%} of its CPU seconds"
            if ref["cpu_seconds"]
            else ""
        ]
        if r.get("token_passes") and ref.get("token_passes"):
            shares.append(f"{r['token_passes'] / ref['token_passes']:.1%} of its token passes")
        out.append(
            f"- {name} vs {reference}: {100 * (r['reasoning'] - ref['reasoning']):+.1f} points of reasoning, at "
            + ", ".join(x for x in shares if x)
        )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", required=True, help="the SFT checkpoint every row starts from")
    parser.add_argument(
        "--out", required=True, help="run folder (offline rollouts, stage runs, cascade.md/json)"
    )
    parser.add_argument("--config", help="JSON with CascadeConfig fields to override")
    parser.add_argument(
        "--quick", action="store_true", help="toy sizes: exercise the path, measure nothing"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the summary as JSON instead of the table"
    )


def run(args: argparse.Namespace) -> int:
    cfg = quick_config() if args.quick else CascadeConfig()
    if args.config:
        overrides = json.loads(Path(args.config).read_text())
        unknown = sorted(set(overrides) - set(CascadeConfig.__dataclass_fields__))
        if unknown:
            raise SystemExit(f"{args.config}: unknown CascadeConfig field(s) {unknown}")
        cfg = CascadeConfig(**{**asdict(cfg), **overrides})
    summary = run_cascade(args.init, args.out, cfg)
    print(json.dumps(summary) if args.json else format_cascade(summary))
    return 0
