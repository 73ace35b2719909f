"""Token selection: greedy, or temperature + nucleus (top-p) sampling with a per-request generator.

Each request owns a `torch.Generator` seeded from its `seed`, so its sampled tokens do not depend on which
other requests happen to share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one sequence is generated. temperature 0 means greedy (argmax)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.stop_ids = frozenset(self.stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return torch.Generator().manual_seed(seed)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of a [V] distribution outside the smallest set whose mass reaches top_p, renormalised.

    The most likely token is always kept.
    """
    if top_p >= 1:
        return probs
    sorted_p, order = torch.sort(probs, descending=True)  # [V], [V]
    cum = torch.cumsum(sorted_p, dim=-1)
    drop = (cum - sorted_p) >= top_p  # mass before this token already reaches top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return out / out.sum()


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits [B, V]; greedy rows in one argmax, sampled rows one by one (own generator)."""
    B = logits.shape[0]
    out = logits.argmax(dim=-1).tolist()  # [B]; kept for greedy rows
    for b in range(B):
        p = params[b]
        if p.greedy:
            continue
        probs = torch.softmax(logits[b].float() / p.temperature, dim=-1)  # [V]
        probs = top_p_filter(probs, p.top_p)
        out[b] = int(torch.multinomial(probs, 1, generator=generators[b]).item())
    return out
