"""Accuracy on a user's file of questions (`tessera eval CKPT --data FILE`): greedy answers scored
by a reward.

Rows are prompt records ({"image", "question", "answer", "category"}) or InternVL conversations
(their first
turn); they are scanned first like training data (tessera.data.scan). Each answer is scored by a
reward
(tessera.data.rewards: exact after normalisation by default, or `module:function`), ≥ 0.5 counting
as
correct; `overall` is the mean over questions and `categories` the mean per `category` when rows
carry one.
Generation is `tessera.engine.generate` (batched, greedy), with the routing of
`tessera eval`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tessera.data.encode import prompt_ids
from tessera.data.rewards import final_text, resolve
from tessera.data.scan import ScanReport, scan
from tessera.engine import SamplingParams, generate
from tessera.image import ImageProcessor
from tessera.routing import RoutingPolicy, encode_routed


@dataclass
class RecordsResult:
    overall: float
    n: int
    categories: dict[str, float]
    counts: dict[str, int]
    reward: str
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, records: bool = False) -> dict[str, Any]:
        out = {
            "overall": self.overall,
            "n": self.n,
            "categories": self.categories,
            "counts": self.counts,
            "reward": self.reward,
            "seconds": self.seconds,
            "skipped": self.skipped,
        }
        if records:
            out["records"] = self.records
        return out


def format_records_report(result: RecordsResult) -> str:
    lines = ["| category | n | accuracy |", "|---|---:|---:|"]
    for cat, acc in result.categories.items():
        lines.append(f"| {cat} | {result.counts[cat]} | {acc:.1%} |")
    lines.append(f"| **overall** | {result.n} | **{result.overall:.1%}** |")
    if result.skipped:
        lines.append(f"\nskipped {sum(result.skipped.values())} bad records: {result.skipped}")
    return "\n".join(lines)


@torch.inference_mode()
def evaluate_records(
    model,
    path: str,
    reward: str = "exact",
    batch_size: int = 16,
    max_new_tokens: int = 32,
    thinking: bool = False,
    routing: str | RoutingPolicy = "full",
    skip_bad: bool = False,
) -> RecordsResult:
    """Score `model` on every question of `path`."""
    score = resolve(reward)
    tok = model.tokenizer
    processor = ImageProcessor.from_config(model.config)
    report: ScanReport = scan(
        path,
        tok,
        processor,
        model.config.tokens_per_tile,
        model.config.language.max_position_embeddings,
        kind="prompt",
        skip_bad=skip_bad,
    )
    items = report.records
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    out: list[dict[str, Any]] = []
    budget = max_new_tokens if not thinking else max(max_new_tokens, 160)
    for lo in range(0, len(items), batch_size):
        part = items[lo : lo + batch_size]
        images = [img for r in part for img in r.images]
        features, per_image = None, []
        if images:
            pixels = processor(images)
            features, decision = encode_routed(
                model,
                pixels.pixel_values,
                pixels.tiles_per_image,
                RoutingPolicy.parse(routing),
                questions=[r.question for r in part for _ in r.images],
            )
            per_image = list(decision.image_tokens)
        prompts, k = [], 0
        for r in part:
            counts = per_image[k : k + len(r.images)]
            k += len(r.images)
            prompts.append(prompt_ids(tok, r.question, counts, thinking=thinking))
        greedy = SamplingParams(max_tokens=budget, stop_ids=frozenset([tok.im_end_id]))
        outs = generate(model, prompts, features, greedy).answers()
        for r, ids in zip(part, outs):
            text = tok.decode(ids, skip_special_tokens=False)
            value = float(score(text, r.answer))
            out.append(
                {
                    "where": r.where,
                    "category": r.category,
                    "question": r.question,
                    "answer": r.answer,
                    "prediction": final_text(text),
                    "reward": value,
                    "correct": value >= 0.5,
                }
            )
    model.train(was_training)
    cats: dict[str, list[bool]] = {}
    for rec in out:
        if rec["category"]:
            cats.setdefault(rec["category"], []).append(rec["correct"])
    n = len(out)
    return RecordsResult(
        overall=sum(r["correct"] for r in out) / n,
        n=n,
        categories={c: sum(v) / len(v) for c, v in sorted(cats.items())},
        counts={c: len(v) for c, v in sorted(cats.items())},
        reward=reward,
        seconds=time.perf_counter() - start,
        skipped=dict(report.skipped),
        records=out,
    )
