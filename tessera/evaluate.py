"""Accuracy on a held-out world set: batched greedy generation, the world's verifiers, tokens and throughput.

The eval set is the world's fixed one (`tessera.world.eval_items`, the `eval` split, difficulty 1): n questions
interleaved over the families, starting at `seed` (the set's offset), so two runs with the same arguments see
the same scenes and every family gets the same share. The reasoning family is asked with thinking on (its SFT
target has a worked `<think>` chain), the others with thinking off, as in training (override with `thinking`).
Scores come from `tessera.world.score`: `overall` is the mean over families.

Generation is batched through `tessera.engine.generate` (greedy), so a row's tokens are those it would get
alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tessera.best_of_n import generate_best_of_n
from tessera.engine import SamplingParams, generate
from tessera.image import ImageProcessor
from tessera.routing import RoutingDecision, RoutingPolicy, encode_routed
from tessera.world import FAMILIES, Sample, eval_items, score, tuning_items, verify


@dataclass
class EvalResult:
    overall: float  # mean accuracy over families (tessera.world.score)
    families: dict[str, float]  # family → accuracy
    counts: dict[str, int]  # family → number of questions
    visual_tokens_per_image: float
    n: int
    routing: str
    seed: int
    seconds: float
    samples_per_second: float
    generated_tokens_per_second: float
    compressed_tile_fraction: float = 0.0
    best_of: int = 1
    records: list[dict[str, Any]] = field(default_factory=list)  # one per question

    def to_json(self, records: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not records:
            data.pop("records")
        return data


def evaluate(
    model,
    seed: int = 0,
    n: int = 140,
    routing: str | RoutingPolicy = "full",
    batch_size: int = 16,
    thinking: str = "auto",
    max_new_tokens: int = 32,
    max_think_tokens: int = 160,
    best_of: int = 1,
    families: list[str] | None = None,
    keep_records: bool = True,
    split: str = "eval",
    oracle: Callable[[Sample], Sequence[bool]] | None = None,
) -> EvalResult:
    """Accuracy of `model` (with `.tokenizer`) on n held-out world questions, family by family.

    `split="train"` asks training-split scenes instead (where a benchmark chooses thresholds before it reports
    on the eval split). `oracle` (a Sample → compress flag per tile, e.g. from the world's evidence tiles)
    routes by what the world knows instead of by a policy: the benchmarks' bounds."""
    critic = None
    if (
        best_of != 1
    ):  # Best-of-N: the model must carry a critic (tessera.best_of_n.Critic.load(checkpoint))
        critic = getattr(model, "critic", None)
        if critic is None:
            raise ValueError(
                "best_of > 1 needs a critic: set model.critic = tessera.best_of_n.Critic.load(CHECKPOINT) "
                "(train one with `tessera critic CHECKPOINT`)"
            )
    if thinking not in ("auto", "on", "off"):
        raise ValueError(f"thinking must be auto, on or off, got {thinking!r}")
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; load it with tessera.load(checkpoint_dir)")
    fams = list(families or FAMILIES)
    policy = RoutingPolicy.parse(routing, seed=seed)
    processor = ImageProcessor.from_config(model.config)
    per_family = -(-n // len(fams))
    items = (
        tuning_items(per_family, fams, offset=seed)
        if split == "train"
        else eval_items(per_family, fams, split=split, offset=seed)
    )[:n]
    samples = [item.sample() for item in items]
    think = [
        (thinking == "on") or (thinking == "auto" and s.thinking_answer is not None)
        for s in samples
    ]
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    tokens_total = tiles_total = compressed_total = generated = 0
    start = time.perf_counter()
    # batch thinking and non-thinking questions separately: their generation lengths differ a lot
    order = sorted(range(n), key=lambda i: (think[i], i))
    for lo in range(0, n, batch_size):
        idx = order[lo : lo + batch_size]
        mode = think[idx[0]]
        group = [i for i in idx if think[i] == mode]
        rest = [i for i in idx if think[i] != mode]
        for part in (group, rest):
            if not part:
                continue
            pixels = processor([samples[i].image for i in part])
            if oracle is not None:
                mask = torch.tensor([c for i in part for c in oracle(samples[i])], dtype=torch.bool)
                with torch.no_grad():
                    features, per_tile = model.encode_images(pixels.pixel_values, compress=mask)
                decision = RoutingDecision(mask, list(per_tile), list(pixels.tiles_per_image))
            else:
                features, decision = encode_routed(
                    model,
                    pixels.pixel_values,
                    pixels.tiles_per_image,
                    policy,
                    questions=[samples[i].question for i in part]
                    if policy.needs_question
                    else None,
                )
            image_tokens = decision.image_tokens
            prompts = [
                tok.build_prompt(samples[i].question, [image_tokens[k]], thinking=think[i])
                for k, i in enumerate(part)
            ]
            limit = max_think_tokens if think[part[0]] else max_new_tokens
            if best_of > 1:
                outs = generate_best_of_n(
                    model, critic, prompts, features, think[part[0]], best_of, limit, seed=seed + lo
                )
            else:
                greedy = SamplingParams(max_tokens=limit, stop_ids=frozenset([tok.im_end_id]))
                outs = generate(model, prompts, features, greedy).answers()
            for k, i in enumerate(part):
                s, text = (
                    samples[i],
                    tok.decode(outs[k], skip_special_tokens=False),
                )  # keep </think>: verify splits on it
                ok = bool(verify(s.family, text, s.answer))
                generated += len(outs[k])
                records.append(
                    {
                        "index": i,
                        "family": s.family,
                        "question": s.question,
                        "answer": s.answer,
                        "prediction": text,
                        "correct": ok,
                        "visual_tokens": image_tokens[k],
                    }
                )
            tokens_total += sum(image_tokens)
            tiles_total += len(decision.tokens_per_tile)
            compressed_total += decision.compressed_tiles
    seconds = time.perf_counter() - start
    model.train(was_training)
    records.sort(key=lambda r: r["index"])
    scores = score((r["family"], r["prediction"], r["answer"]) for r in records)
    counts = {f: sum(r["family"] == f for r in records) for f in fams}
    return EvalResult(
        overall=scores["overall"],
        families={f: scores[f] for f in fams if counts[f]},
        counts={f: c for f, c in counts.items() if c},
        visual_tokens_per_image=tokens_total / max(1, n),
        n=n,
        routing="oracle" if oracle else policy.mode + (f"@{policy.match}" if policy.match else ""),
        seed=seed,
        seconds=seconds,
        samples_per_second=n / max(seconds, 1e-9),
        generated_tokens_per_second=generated / max(seconds, 1e-9),
        compressed_tile_fraction=compressed_total / max(1, tiles_total),
        best_of=best_of,
        records=records if keep_records else [],
    )


def format_report(result: EvalResult, chance: dict[str, float] | None = None) -> str:
    """A markdown table: accuracy per family (and chance beside it when given), then the totals."""
    head = "| family | n | accuracy |" + (" chance |" if chance else "")
    rule = "|---|---:|---:|" + ("---:|" if chance else "")
    lines = [head, rule]
    for fam, acc in result.families.items():
        line = f"| {fam} | {result.counts[fam]} | {acc:.1%} |"
        if chance:
            line += f" {chance.get(fam, float('nan')):.1%} |"
        lines.append(line)
    lines.append(
        f"| **overall** | {result.n} | **{result.overall:.1%}** |" + (" |" if chance else "")
    )
    lines.append("")
    lines.append(
        f"routing {result.routing}: {result.visual_tokens_per_image:.1f} visual tokens per image"
        f" ({result.compressed_tile_fraction:.0%} of tiles compressed); {result.samples_per_second:.1f} questions/s,"
        f" {result.generated_tokens_per_second:.0f} generated tokens/s"
    )
    return "\n".join(lines)


def family_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: one column per model (each a dict with "families" and "overall"), one row per family of
    the first model, then the overall accuracy."""
    if not rows:
        raise ValueError("family_table needs at least one model's accuracies")
    fams = list(next(iter(rows.values()))["families"])
    lines = ["| family | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
    for f in fams:
        lines.append(
            f"| {f} | "
            + " | ".join(f"{r['families'].get(f, float('nan')):.1%}" for r in rows.values())
            + " |"
        )
    lines.append(
        "| **overall** | " + " | ".join(f"**{r['overall']:.1%}**" for r in rows.values()) + " |"
    )
    return lines
