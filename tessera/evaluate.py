"""Accuracy on a held-out world set: batched greedy generation, the world's verifiers, tokens and throughput.

The eval set is the world's fixed one (`tessera.world.eval_items`, the `eval` split, difficulty 1): n questions
interleaved over the families, starting at `seed` (the set's offset), so two runs with the same arguments see
the same scenes and every family gets the same share. The reasoning family is asked with thinking on (its SFT
target has a worked `<think>` chain), the others with thinking off, as in training (override with `thinking`).
Scores come from `tessera.world.score`: `overall` is the mean over families.

Generation is batched: prompts are left-padded, each row keeps its own position ids, and the attention mask
hides the padding, so a row's tokens are exactly those it would get alone (greedy is deterministic).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

ROUTINGS = ("full", "compressed", "router", "random")  # tessera.routing.MODES


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


@torch.inference_mode()
def greedy_generate(model, prompts: list[list[int]], image_features: torch.Tensor | None, max_new_tokens: int,
                    stop_id: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations of several prompts at once (left padding, per-row positions, one KV cache).

    prompts: B token lists; image_features [ΣT, D] for their <IMG_CONTEXT> tokens in row order.
    Returns each row's new tokens up to and excluding `stop_id`.
    """
    from tessera.model.llm import DynamicCache

    B, P = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)  # [B,P] real (non-padding) tokens
    for b, p in enumerate(prompts):
        input_ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[b, P - len(p):] = True
    position_ids = (valid.long().cumsum(1) - 1).clamp_min(0)  # [B,P], 0 at each row's first real token
    causal = torch.ones(P, P, dtype=torch.bool).tril()  # [P,P]
    eye = torch.eye(P, dtype=torch.bool)  # padding queries see themselves, so no softmax row is empty
    mask = (causal & (valid[:, None, :] | eye))[:, None]  # [B,1,P,P]
    cache = DynamicCache()
    logits = model(input_ids, image_features=image_features, position_ids=position_ids, attn_mask=mask, cache=cache)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    next_pos = position_ids[:, -1] + 1  # [B]
    for _ in range(max_new_tokens):
        token = logits[:, -1].argmax(-1).cpu()  # [B], on the host for the per-row bookkeeping
        for b in range(B):
            if not done[b]:
                if int(token[b]) == stop_id:
                    done[b] = True
                else:
                    out[b].append(int(token[b]))
        if bool(done.all()):
            break
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], dim=1)  # [B,S], S = keys so far
        logits = model(token[:, None], position_ids=next_pos[:, None], attn_mask=valid[:, None, None, :], cache=cache)
        next_pos = next_pos + 1
    return out


def evaluate(model, seed: int = 0, n: int = 140, routing: str = "full", batch_size: int = 16,
             thinking: str = "auto", max_new_tokens: int = 32, max_think_tokens: int = 160, best_of: int = 1,
             families: list[str] | None = None, keep_records: bool = True) -> EvalResult:
    """Accuracy of `model` (with `.tokenizer`) on n held-out world questions, family by family."""
    from tessera.image import ImageProcessor
    from tessera.routing import RoutingPolicy, encode_routed
    from tessera.world import FAMILIES, eval_items, score, verify

    critic = None
    if best_of != 1:  # Best-of-N: the model must carry a critic (tessera.tts.Critic.load(checkpoint))
        from tessera.tts import generate_best_of_n

        critic = getattr(model, "critic", None)
        if critic is None:
            raise ValueError("best_of > 1 needs a critic: set model.critic = tessera.tts.Critic.load(CHECKPOINT) "
                             "(train one with `tessera critic CHECKPOINT`)")
    if thinking not in ("auto", "on", "off"):
        raise ValueError(f"thinking must be auto, on or off, got {thinking!r}")
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; load it with tessera.load(checkpoint_dir)")
    fams = list(families or FAMILIES)
    processor = ImageProcessor.from_config(model.config)
    samples = [item.sample() for item in eval_items(-(-n // len(fams)), fams, offset=seed)[:n]]
    think = [(thinking == "on") or (thinking == "auto" and s.thinking_answer is not None) for s in samples]
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    tokens_total = tiles_total = compressed_total = generated = 0
    start = time.perf_counter()
    # batch thinking and non-thinking questions separately: their generation lengths differ a lot
    order = sorted(range(n), key=lambda i: (think[i], i))
    for lo in range(0, n, batch_size):
        idx = order[lo:lo + batch_size]
        mode = think[idx[0]]
        group = [i for i in idx if think[i] == mode]
        rest = [i for i in idx if think[i] != mode]
        for part in (group, rest):
            if not part:
                continue
            pixels = processor([samples[i].image for i in part])
            features, decision = encode_routed(model, pixels.pixel_values, pixels.tiles_per_image,
                                               RoutingPolicy(mode=routing, seed=seed))
            image_tokens = decision.image_tokens
            prompts = [tok.build_prompt(samples[i].question, [image_tokens[k]], thinking=think[i]) for k, i in enumerate(part)]
            limit = max_think_tokens if think[part[0]] else max_new_tokens
            if best_of > 1:
                outs = generate_best_of_n(model, critic, prompts, features, think[part[0]], best_of, limit, seed=seed + lo)
            else:
                outs = greedy_generate(model, prompts, features, limit, tok.im_end_id, tok.pad_id)
            for k, i in enumerate(part):
                s, text = samples[i], tok.decode(outs[k], skip_special_tokens=False)  # keep </think>: verify splits on it
                ok = bool(verify(s.family, text, s.answer))
                generated += len(outs[k])
                records.append({"index": i, "family": s.family, "question": s.question, "answer": s.answer,
                                "prediction": text, "correct": ok, "visual_tokens": image_tokens[k]})
            tokens_total += sum(image_tokens)
            tiles_total += len(decision.tokens_per_tile)
            compressed_total += decision.compressed_tiles
    seconds = time.perf_counter() - start
    model.train(was_training)
    records.sort(key=lambda r: r["index"])
    scores = score((r["family"], r["prediction"], r["answer"]) for r in records)
    counts = {f: sum(r["family"] == f for r in records) for f in fams}
    return EvalResult(
        overall=scores["overall"], families={f: scores[f] for f in fams if counts[f]},
        counts={f: c for f, c in counts.items() if c}, visual_tokens_per_image=tokens_total / max(1, n),
        n=n, routing=routing, seed=seed, seconds=seconds, samples_per_second=n / max(seconds, 1e-9),
        generated_tokens_per_second=generated / max(seconds, 1e-9),
        compressed_tile_fraction=compressed_total / max(1, tiles_total), best_of=best_of,
        records=records if keep_records else [])


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
    lines.append(f"| **overall** | {result.n} | **{result.overall:.1%}** |" + (" |" if chance else ""))
    lines.append("")
    lines.append(f"routing {result.routing}: {result.visual_tokens_per_image:.1f} visual tokens per image"
                 f" ({result.compressed_tile_fraction:.0%} of tiles compressed); {result.samples_per_second:.1f} questions/s,"
                 f" {result.generated_tokens_per_second:.0f} generated tokens/s")
    return "\n".join(lines)
