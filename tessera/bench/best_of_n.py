"""`tessera bench best_of_n CKPT --out DIR`: test-time scaling on the reasoning family, on any checkpoint.

A critic (tessera.best_of_n) is trained on the checkpoint's rollouts of fresh training queries; each held-out
reasoning question then gets max(N) samples at the Best-of-N temperature, and N < max uses the first N of
them, so every column sees the same samples. Per N: the mean accuracy of a single sample, a plain majority
vote (a baseline, not a critic), the critic's favourite, the critic-weighted vote (`eval --best-of`'s default)
and the oracle pass@N (some sample is right: the ceiling of any selector). Greedy decoding is reported beside.
`tessera bench cascade` runs the same table on its Cascade model. Written to DIR/best_of_n.md and .json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tessera
from tessera.answers import SamplingConfig, prepare, world_query
from tessera.best_of_n import CriticTrainConfig, best_of_n_rollouts, fit_critic, select
from tessera.evaluate import evaluate
from tessera.seeds import CRITIC_SEED_OFFSET
from tessera.train.rollout import training_queries
from tessera.world import eval_items, verify


@dataclass
class BestOfNConfig:
    questions: int = 300  # held-out reasoning questions
    best_of: tuple[int, ...] = (1, 4, 8)
    critic_queries: int = 300  # training queries rolled out for the critic
    families: dict[str, float] = field(
        default_factory=dict
    )  # the critic's queries; {} → default_rl_families()
    eval_seed: int = 0
    # how every answer is drawn: the critic's rollouts (group_size per training query) and the
    # held-out questions' max(best_of) samples (seeded 17 after it); its seed seeds the critic too
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7))


def best_of_n_table(model, cfg: BestOfNConfig, critic_dir: Path) -> dict[str, Any]:
    """Accuracy at each N (greedy, sampled mean, vote, critic, critic-weighted, oracle pass@N) and the critic's report."""
    start = time.process_time()
    sampling = cfg.sampling
    queries = training_queries(
        cfg.critic_queries, cfg.families or None, sampling.seed, CRITIC_SEED_OFFSET
    )
    critic, report = fit_critic(model, queries, sampling, CriticTrainConfig(seed=sampling.seed))
    critic.save(critic_dir)
    critic_cpu = time.process_time() - start
    items = eval_items(cfg.questions, ["reasoning"], offset=cfg.eval_seed)
    prepared = prepare(
        model, [world_query(it.seed, it.family, split=it.split) for it in items], keep_pixels=False
    )
    held_out = replace(sampling, seed=sampling.seed + 17)
    sampled = best_of_n_rollouts(
        model, critic, prepared, max(cfg.best_of), held_out, "weighted", verify=verify
    )
    greedy = evaluate(
        model, seed=cfg.eval_seed, n=cfg.questions, families=["reasoning"], keep_records=False
    ).overall
    table = {}
    for n in cfg.best_of:
        acc = dict.fromkeys(("vote", "critic", "weighted"), 0.0)
        mean_sample = oracle = 0.0
        for _, rolls, probs in sampled:
            rolls, probs = rolls[:n], probs[:n]
            for s in acc:
                acc[s] += rolls[select(rolls, probs, s)].correct
            mean_sample += sum(r.correct for r in rolls) / n
            oracle += any(r.correct for r in rolls)
        k = len(sampled)
        table[n] = {
            "sampled_mean": mean_sample / k,
            "oracle": oracle / k,
            **{s: v / k for s, v in acc.items()},
        }
    return {
        "greedy": greedy,
        "by_n": table,
        "critic": asdict(report),
        "critic_cpu_seconds": critic_cpu,
        "questions": len(sampled),
        "temperature": sampling.temperature,
    }


def format_best_of_n(bon: dict[str, Any], model_name: str) -> list[str]:
    c = bon["critic"]
    lines = [
        f"Best-of-N on {model_name} ({bon['questions']} held-out reasoning questions, temperature "
        f"{bon['temperature']}). Greedy (N = 1): {bon['greedy']:.1%}. Critic: held-out accuracy "
        f"{c['val_accuracy']:.1%}, AUC {c['val_auc']:.3f} on its training rollouts ({c['examples']}, "
        f"{c['positives']:.0%} correct); {bon['critic_cpu_seconds']:.0f} CPU s to build.",
        "",
        "| N | sampled (mean) | vote | critic | critic-weighted | oracle pass@N |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, t in bon["by_n"].items():
        lines.append(
            f"| {n} | {t['sampled_mean']:.1%} | {t['vote']:.1%} | {t['critic']:.1%} | {t['weighted']:.1%} | "
            f"{t['oracle']:.1%} |"
        )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the policy to sample from")
    parser.add_argument("--out", required=True, help="folder for the critic and best_of_n.md/json")
    parser.add_argument("--questions", type=int, default=BestOfNConfig.questions)
    parser.add_argument("--critic-queries", type=int, default=BestOfNConfig.critic_queries)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", action="store_true", help="print the summary as JSON instead of the table"
    )


def run(args: argparse.Namespace) -> int:
    cfg = BestOfNConfig(
        questions=args.questions,
        critic_queries=args.critic_queries,
        sampling=replace(BestOfNConfig().sampling, seed=args.seed),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bon = best_of_n_table(tessera.load(args.checkpoint), cfg, out / "critic")
    (out / "best_of_n.json").write_text(json.dumps({"config": asdict(cfg), **bon}, indent=2) + "\n")
    text = "\n".join(format_best_of_n(bon, args.checkpoint)) + "\n"
    (out / "best_of_n.md").write_text(text)
    print(json.dumps(bon) if args.json else text)
    return 0
