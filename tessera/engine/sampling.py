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


def top_p_filter(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Zero the tail of distributions [..., V] outside the smallest set whose mass reaches top_p, renormalised.

    top_p: one float, or one per row ([...]); rows with top_p >= 1 are returned unchanged. The most likely
    token is always kept.
    """
    top_p = torch.as_tensor(top_p, dtype=probs.dtype, device=probs.device)
    if bool((top_p >= 1).all()):
        return probs
    # a threshold of +inf never drops: rows at top_p >= 1 keep every token even where rounding lifts cum past 1
    threshold = torch.where(top_p >= 1, torch.full_like(top_p, float("inf")), top_p)[..., None]  # [..., 1]
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)  # [..., V], [..., V]
    cum = torch.cumsum(sorted_p, dim=-1)
    drop = (cum - sorted_p) >= threshold  # mass before this token already reaches top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return out / out.sum(dim=-1, keepdim=True)


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits [B, V]. Greedy rows: one argmax over the batch. Sampled rows: temperature,
    softmax and top-p for all of them at once, then one draw per row from that row's own generator (so a
    request's tokens do not depend on its batch companions)."""
    out = logits.argmax(dim=-1).tolist()  # [B]; kept for greedy rows
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    temperature = torch.tensor([params[b].temperature for b in rows], dtype=torch.float32, device=logits.device)
    top_p = torch.tensor([params[b].top_p for b in rows], dtype=torch.float32, device=logits.device)
    picked = logits[rows] if len(rows) < len(params) else logits  # [n, V]
    probs = top_p_filter(torch.softmax(picked.float() / temperature[:, None], dim=-1), top_p)  # [n, V]
    for i, b in enumerate(rows):
        out[b] = int(torch.multinomial(probs[i], 1, generator=generators[b]))
    return out
