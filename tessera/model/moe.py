"""Qwen3-MoE sparse MLP blocks (Qwen3-30B-A3B, Qwen3-235B-A22B) and the load-balancing loss.

Names follow the checkpoints (official InternVL and transformers' saved layout alike): `mlp.gate.weight`
[E, D] is the router, `mlp.experts.N.{gate,up,down}_proj.weight` are expert N's SwiGLU projections.

Routing: softmax over all E router logits (float32), keep the top-k, renormalise them to sum 1 when
`norm_topk_prob`, and sum the chosen experts' outputs weighted by those probabilities.
Every block keeps the router logits of its latest forward (`router_logits`, [N, E]) so that training can add
the Switch-Transformer load-balancing loss (`load_balancing_loss`) without a second return value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import LanguageConfig


class Qwen3MoeExpert(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


def route(
    router_logits: torch.Tensor, top_k: int, renormalise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] → (weights [N, k] in the logits' dtype, expert ids [N, k]), softmax-then-top-k."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [N, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [N, k]
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


@torch.compiler.disable  # data-dependent (per-expert token counts): compiled decode calls it eagerly
def dispatch(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, run_expert
) -> torch.Tensor:
    """Σ_k weights[n, k] · expert_{experts[n, k]}(x[n]) for tokens x [N, D]; each expert runs once on its tokens.

    `run_expert(e, tokens [n_e, D]) -> [n_e, D]`."""
    out = torch.zeros_like(x)  # [N, D]
    flat = experts.reshape(-1)  # [N·k]
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=1).tolist()
    token_of = order // experts.shape[1]  # [N·k] token index of each sorted assignment
    w_sorted = weights.reshape(-1)[order]  # [N·k]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = token_of[start : start + n]
        y = run_expert(e, x[idx]) * w_sorted[start : start + n, None]  # [n_e, D]
        out.index_add_(0, idx, y.to(out.dtype))
        start += n
    return out


class Qwen3MoeSparseBlock(nn.Module):
    """`forward(x [B, T, D]) -> [B, T, D]`; the router logits of the call stay in `self.router_logits` [B·T, E]."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.top_k, self.renormalise = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            Qwen3MoeExpert(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.num_experts)
        )
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)  # [N, D]
        logits = self.gate(flat)  # [N, E]
        self.router_logits = logits
        weights, experts = route(logits, self.top_k, self.renormalise)
        out = dispatch(flat, weights, experts, lambda e, tokens: self.experts[e](tokens))
        return out.reshape(b, t, d)


def load_balancing_loss(
    router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over the sparse layers: E · Σ_e f_e · P_e, where f_e is the share of
    top-k assignments expert e received (summing to k) and P_e its mean router probability, both over every
    layer's tokens (padding excluded by `token_mask` [N], True = real token). 1·k for a perfectly even router."""
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    counts = torch.zeros(num_experts, device=device)
    prob_sum = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
        w = (
            torch.ones(probs.shape[0], device=device)
            if token_mask is None
            else token_mask.reshape(-1).float()
        )
        counts = counts + torch.zeros(num_experts, device=device).scatter_add_(
            0, chosen.reshape(-1), w.repeat_interleave(top_k)
        )
        prob_sum = prob_sum + (probs * w[:, None]).sum(0)
        rows = rows + w.sum()
    return num_experts * ((counts / rows) * (prob_sum / rows)).sum()
