"""`generate`: batched generation for scripts, evaluation, RL rollouts and Best-of-N.

The one offline decode loop, on the engine's own pieces: the prompts are prefilled together into a slot KV
cache (`decode.prefill`, right-padded, ragged lengths masked), each prompt's cache is copied into the slots of
its `group_size` samples, and every step decodes all rows in one batched forward (`decode.DecodeStep`) and
draws one token per row with the engine's sampler (`sampling.sample_tokens`). Serving uses the same cache, step
and sampler through `Engine`, which adds continuous batching.

Reproducibility: one generator seeded from `sampling.seed` draws every sampled row of the batch, so the same
model, prompts and sampling give the same tokens; greedy rows draw nothing. A row's tokens are the ones it would
get alone up to float rounding of the batched matmuls (greedy outputs are tested equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tessera.engine.decode import DecodeStep, prefill
from tessera.engine.kv_cache import CacheGeometry, SlotKVCache
from tessera.engine.sampling import SamplingParams, sample_tokens


@dataclass
class Generation:
    """Rows in prompt order, `group_size` per prompt (prompt q's samples are rows q·G … q·G + G − 1).

    tokens[r] ends with the stop id when the row hit one (finished[r]); logprobs[r][t] is log π(tokens[r][t])
    at the sampling temperature (1 when greedy), over the whole vocabulary."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    group_size: int = 1

    def answers(self) -> list[list[int]]:
        """Each row's tokens without its final stop id."""
        return [row[:-1] if done else list(row) for row, done in zip(self.tokens, self.finished)]

    def groups(self) -> list[list[int]]:
        """Row indices of each prompt's samples: [Q][G]."""
        G = self.group_size
        return [list(range(q * G, q * G + G)) for q in range(len(self.tokens) // G)]


def _embed_prompts(
    model, prompts: Sequence[Sequence[int]], features: torch.Tensor | None
) -> list[torch.Tensor]:
    """Each prompt's embeddings [T_i, D], the rows of `features` [ΣT, D] spliced in at its <IMG_CONTEXT>
    tokens in prompt order (model.embed checks the counts)."""
    img = model.image_context_token_id
    device = model.device
    out, start = [], 0
    for p in prompts:
        n = sum(1 for t in p if t == img)
        feats = features[start : start + n] if n else None
        start += n
        out.append(
            model.embed(torch.tensor([list(p)], dtype=torch.long, device=device), feats)[0]
        )  # [T_i, D]
    rows = 0 if features is None else features.shape[0]
    if start != rows:
        raise ValueError(
            f"the prompts have {start} <IMG_CONTEXT> tokens but {rows} image feature rows were given"
        )
    return out


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    features: torch.Tensor | None,
    sampling: SamplingParams,
    group_size: int = 1,
    max_tokens: Sequence[int] | None = None,
) -> Generation:
    """Generate `group_size` continuations of every prompt in one batch → Generation.

    model: a VisionLanguageModel (or anything with `embed(ids [1,T], features)`, `image_context_token_id`,
    `device` and a `language_model` honouring the cache protocol of docs/CONTRACTS.md).
    features: [ΣT, D] for the prompts' <IMG_CONTEXT> tokens in prompt order, or None.
    max_tokens: a budget per prompt (default `sampling.max_tokens` for all); a row stops at its first stop id
    or at its budget (then unfinished).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    budgets = list(max_tokens) if max_tokens is not None else [sampling.max_tokens] * len(prompts)
    if len(budgets) != len(prompts) or min(budgets) < 1:
        raise ValueError(
            f"need one budget >= 1 per prompt, got {budgets} for {len(prompts)} prompts"
        )
    llm = model.language_model
    param = next(llm.parameters())
    Q, G = len(prompts), group_size
    B = Q * G
    lengths = [len(p) for p in prompts]
    steps = max(budgets)
    cfg = llm.config
    windows = (
        llm.windows() if hasattr(llm, "windows") else {}
    )  # sliding layers store only their window
    geometry = CacheGeometry(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, B, max(lengths) + steps, windows
    )
    cache = SlotKVCache(geometry, dtype=param.dtype, device=param.device)
    logits = prefill(llm, cache, 0, _embed_prompts(model, prompts, features))  # [Q, V]
    # fan out: prompt q's cache (slot q) → slots q·G … q·G+G−1; from the top down, so no source is overwritten
    for q in reversed(range(Q)):
        for g in reversed(range(G)):
            if q * G + g != q:
                cache.move(q, q * G + g, lengths[q])
    logits = logits.repeat_interleave(G, dim=0)  # [B, V]
    row_len = [n for n in lengths for _ in range(G)]  # tokens in each row's cache
    limits = [b for b in budgets for _ in range(G)]
    decoder = DecodeStep(llm, llm.embed_tokens, cache, param.dtype, param.device)
    params = [sampling] * B
    generator = sampling.make_generator()
    stop = sampling.stop_ids
    tokens: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    finished, done = [False] * B, [False] * B
    for _step in range(steps):
        ids, lp = sample_tokens(logits, params, generator, logprobs=True)  # [B], [B]
        lp = lp.tolist()
        for b in range(B):
            if done[b]:
                continue
            tokens[b].append(ids[b])
            logps[b].append(lp[b])
            finished[b] = ids[b] in stop
            done[b] = finished[b] or len(tokens[b]) >= limits[b]
        if all(done):
            break
        # finished rows keep decoding their last token into their own slot; nothing reads it
        logits = decoder([row[-1] for row in tokens], row_len)  # [B, V]
        row_len = [n + 1 for n in row_len]
    return Generation(tokens, logps, finished, G)
