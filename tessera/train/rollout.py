"""What reasoning RL adds to sampled answers: its query pool and the teacher-forced scoring it differentiates.

The rollouts themselves (G sampled answers per query with their log-probs, scored by the world's verifiers)
are `tessera.answers.rollout`, shared with Best-of-N. Here: `training_queries` (the weighted train-split
pool), and `sequence_batch` + `response_logprobs`, log π of given responses with gradients for the trainer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tessera.answers import PreparedQuery, Query, world_query
from tessera.logprobs import token_logprobs
from tessera.seeds import RL_SEED_OFFSET
from tessera.train.data import Batch, Encoded, collate
from tessera.train.losses import IGNORE
from tessera.world import FAMILIES


def default_rl_families() -> dict[str, float]:
    """Every family; reasoning (RL's target) 8×, count 2×, the others 1×.

    Count is weighted up because a reasoning-only pool cost it 5.5 points (docs/log/2026-11-24-notes-8.md): its
    answers are the reads that reasoning chains build on, and the [0.2, 0.8] filter keeps many of its queries
    (221 of 545 against 2–29 of ~270 for the reading families)."""
    weights = {"reasoning": 8.0, "count": 2.0}
    return {f: weights.get(f, 1.0) for f in FAMILIES}


def training_queries(
    n: int,
    families: dict[str, float] | None = None,
    seed: int = 0,
    seed_offset: int = RL_SEED_OFFSET,
) -> list[Query]:
    """n train-split queries at scene seeds seed_offset + seed·n + i, families drawn by weight (deterministic)."""
    families = families or default_rl_families()
    names, weights = list(families), [float(families[f]) for f in families]
    if not names or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(
            f"families must map at least one family to a positive weight, got {families}"
        )
    rng = random.Random(seed)
    return [
        world_query(seed_offset + seed * n + i, rng.choices(names, weights)[0]) for i in range(n)
    ]


# ---- teacher-forced scoring ------------------------------------------------------------------------


@dataclass
class SequenceBatch:
    """Prompt + response rows for the trainer (one sequence per row, right-padded).

    `batch.targets[b, t]` is the token at t+1 when it belongs to row b's response, else IGNORE; `old_logprobs`
    (when the responses came from a rollout) holds log π_old of that same target, aligned with `targets`."""

    batch: Batch  # tessera.train.data.Batch: input_ids, targets, position_ids, pixel_values, image_tokens
    image_features: torch.Tensor | None  # [ΣT, D] in row order (None → encode batch.pixel_values)
    old_logprobs: torch.Tensor | None = None  # [B,L]

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.targets != IGNORE  # [B,L]


def sequence_batch(
    prepared: Sequence[PreparedQuery],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    old_logprobs: Sequence[Sequence[float]] | None = None,
) -> SequenceBatch:
    """Rows prompt_i + response_i with the loss on the response tokens (data.collate builds the tensors)."""
    if len(prepared) != len(responses) or not prepared:
        raise ValueError(
            f"need one response per prompt, got {len(prepared)} prompts and {len(responses)} responses"
        )
    rows = []
    for p, r in zip(prepared, responses):
        if not r:
            raise ValueError(f"empty response for query seed={p.query.seed} ({p.query.family})")
        rows.append(
            [
                Encoded(
                    list(p.prompt_ids) + list(r),
                    [0] * len(p.prompt_ids) + [1] * len(r),
                    p.pixel_values,
                    p.image_tokens,
                    p.query.family,
                )
            ]
        )
    batch = collate(rows, pad_id)
    feats = [p.image_features for p in prepared]
    features = torch.cat(feats) if sum(f.shape[0] for f in feats) else None  # [ΣT, D]
    old = None
    if old_logprobs is not None:
        old = torch.zeros(batch.targets.shape)  # [B,L]
        for b, (p, lp) in enumerate(zip(prepared, old_logprobs)):
            if len(lp) != len(responses[b]):
                raise ValueError(
                    f"row {b}: {len(lp)} old log-probs for {len(responses[b])} response tokens"
                )
            start = len(p.prompt_ids) - 1  # position that predicts the first response token
            old[b, start : start + len(lp)] = torch.tensor(lp)
    return SequenceBatch(batch, features, old)


def response_logprobs(
    model, seqs: SequenceBatch, temperature: float = 1.0, train_vision: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(response tokens) with gradients: → (token_logp [B,L], mask [B,L]), aligned with batch.targets.

    With `train_vision` the tiles are encoded again (gradients reach the projector and the ViT, if trainable);
    otherwise the image features recorded at rollout time are reused, so only the language model learns."""
    b = seqs.batch
    if train_vision or seqs.image_features is None:
        pixels = b.pixel_values if b.pixel_values.numel() else None
        logits = model(b.input_ids, pixel_values=pixels, position_ids=b.position_ids)  # [B,L,V]
    else:
        logits = model(
            b.input_ids, image_features=seqs.image_features, position_ids=b.position_ids
        )  # [B,L,V]
    mask = seqs.mask
    return token_logprobs(logits, b.targets.clamp_min(0), temperature) * mask, mask  # [B,L], [B,L]


# ---- rewards ------------------------------------------------------------------------------------------
