"""Token selection, the one sampler of every decode loop (the engine, `generate`, RL rollouts, Best-of-N).

Greedy (temperature 0), or temperature + top-k + nucleus (top-p) sampling. The draws come either from one
`torch.Generator` per row (the engine: a request's tokens do not depend on which other requests share its
batch) or from one generator for the whole batch (`generate`: a batch is reproducible from one seed).
Optionally each drawn token's log-probability is returned: log π(token) at the sampling temperature (1 when
greedy) over the whole vocabulary, i.e. what a trainer computes for the same token (GSPO's π_old).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one sequence is generated. temperature 0 means greedy (argmax); top_k 0 means no top-k cut.

    banned_ids are never drawn (RL rollouts ban the image placeholders: an answer cannot contain an image)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    banned_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        self.stop_ids = frozenset(self.stop_ids)
        self.banned_ids = frozenset(self.banned_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self) -> torch.Generator | None:
        """A generator seeded from `seed` (a random seed when None); None when greedy (nothing is drawn)."""
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
    threshold = torch.where(top_p >= 1, torch.full_like(top_p, float("inf")), top_p)[
        ..., None
    ]  # [..., 1]
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)  # [..., V], [..., V]
    cum = torch.cumsum(sorted_p, dim=-1)
    drop = (cum - sorted_p) >= threshold  # mass before this token already reaches top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return out / out.sum(dim=-1, keepdim=True)


def top_k_filter(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """logits [n, V] with every token below row i's top_k[i]-th largest set to -inf (0 = keep all)."""
    if not any(k > 0 for k in top_k):
        return logits
    V = logits.shape[-1]
    ks = torch.tensor([min(k, V) if k > 0 else V for k in top_k], device=logits.device)  # [n]
    sorted_l = logits.sort(dim=-1, descending=True).values  # [n, V]
    kth = sorted_l.gather(-1, (ks - 1)[:, None])  # [n, 1], the k-th largest logit
    return logits.masked_fill(logits < kth, float("-inf"))


def _ban(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [B, V] with each row's banned ids at -inf (the input itself when nothing is banned)."""
    if not any(p.banned_ids for p in params):
        return logits
    out = logits.clone()
    for b, p in enumerate(params):
        if p.banned_ids:
            out[b, list(p.banned_ids)] = float("-inf")
    return out


def _draw(
    probs: torch.Tensor, generators: torch.Generator | list[torch.Generator | None] | None, rows
) -> torch.Tensor:
    """One id per row of probs [n, V] by inverse CDF. The uniforms come from the CPU generators (one per row,
    or one for all), so a seed draws the same tokens on every device and only n numbers cross to it."""
    if isinstance(generators, list):
        u = torch.cat([torch.rand(1, generator=generators[b]) for b in rows])  # [n]
    else:
        u = torch.rand(len(rows), generator=generators)  # [n]
    cum = probs.cumsum(-1)  # [n, V]
    u = u.to(probs.device, probs.dtype)[:, None] * cum[:, -1:]  # [n, 1], scaled to each row's mass
    # the first token whose cumulative mass passes u: never one of zero probability
    return torch.searchsorted(cum, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


def sample_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: torch.Generator | list[torch.Generator | None] | None,
    logprobs: bool = False,
) -> tuple[list[int], torch.Tensor | None]:
    """One token per row of logits [B, V] → (ids, log-probs [B] or None).

    Greedy rows: one argmax over the batch. Sampled rows: temperature, top-k, softmax and top-p for all of them
    at once, then the draw: one per row from that row's own generator when `generators` is a list (so a
    request's tokens do not depend on its batch companions), or one draw for all sampled rows from a single
    generator. With `logprobs`, each id's log π at its row's temperature (1 when greedy), whole vocabulary."""
    logits = logits.float()
    allowed = _ban(logits, params)
    ids = allowed.argmax(dim=-1)  # [B]; kept for greedy rows
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if rows:
        temperature = torch.tensor(
            [params[b].temperature for b in rows], dtype=torch.float32, device=logits.device
        )
        top_p = torch.tensor(
            [params[b].top_p for b in rows], dtype=torch.float32, device=logits.device
        )
        picked = allowed[rows] if len(rows) < len(params) else allowed  # [n, V]
        picked = top_k_filter(
            picked / temperature[:, None], [params[b].top_k for b in rows]
        )  # [n, V]
        probs = top_p_filter(torch.softmax(picked, dim=-1), top_p)  # [n, V]
        ids[rows] = _draw(probs, generators, rows)
    if not logprobs:
        return ids.tolist(), None
    temps = torch.tensor(
        [p.temperature if not p.greedy else 1.0 for p in params], device=logits.device
    )  # [B]
    logp = torch.log_softmax(logits / temps[:, None], dim=-1)  # [B, V]
    return ids.tolist(), logp.gather(-1, ids[:, None]).squeeze(1)  # [B, 1] → [B]
