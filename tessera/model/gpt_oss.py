"""GPT-OSS pieces (the LLM of InternVL3.5-20B-A4B): its MoE MLP, its RMSNorm and YaRN RoPE frequencies.

Names and layouts follow the BF16 checkpoints (InternVL3_5-GPT-OSS-20B-A4B, transformers' GptOss):
- `mlp.router.{weight [E, D], bias [E]}`: top-k over the raw logits, then softmax over those k only.
- `mlp.experts.gate_up_proj` [E, D, 2I] with gate and up *interleaved* along the last axis (columns 0, 2, 4, …
  are the gate), `gate_up_proj_bias` [E, 2I], `down_proj` [E, I, D], `down_proj_bias` [E, D]; x @ W, not W x.
- the clamped SwiGLU: gate ≤ limit, −limit ≤ up ≤ limit, out = (up + 1) · gate · σ(α · gate).
The attention side (sinks, biases, sliding windows) lives in tessera.model.llm's attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tessera.config import LanguageConfig, RopeScaling
from tessera.model.moe import dispatch
from tessera.model.vit import RMSNorm


class GptOssRMSNorm(RMSNorm):
    """GPT-OSS's RMSNorm: normalise and scale by the weight in float32, then cast (Qwen3 casts, then scales)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class GptOssRouter(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] → (logits [N, E], weights [N, k], expert ids [N, k])."""
        logits = nn.functional.linear(x, self.weight, self.bias)  # [N, E]
        top, experts = torch.topk(logits, self.top_k, dim=-1)  # [N, k]
        return logits, torch.softmax(top, dim=-1), experts


class GptOssExperts(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        e, d, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(e, d, 2 * i))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj_bias = nn.Parameter(torch.zeros(e, d))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x [n, D] → [n, D]."""
        gate_up = (
            x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        )  # [n, 2I], gate/up interleaved
        gate = gate_up[..., 0::2].clamp(max=self.limit)  # [n, I]
        up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)  # [n, I]
        glu = gate * torch.sigmoid(gate * self.alpha)
        return ((up + 1) * glu) @ self.down_proj[e] + self.down_proj_bias[e]  # [n, D]


class GptOssMLP(nn.Module):
    """`forward(x [B, T, D]) -> [B, T, D]`; the router logits of the call stay in `self.router_logits` [B·T, E]."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.router = GptOssRouter(config)
        self.experts = GptOssExperts(config)
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)  # [N, D]
        logits, weights, experts = self.router(flat)
        self.router_logits = logits
        return dispatch(flat, weights, experts, self.experts.expert).reshape(b, t, d)


def rope_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling, device=None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [hd/2] float32, cos/sin scale) for default RoPE or YaRN (NTK-by-parts + attention factor)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [hd/2]
    if scaling.rope_type == "default":
        return inv_freq, 1.0
    factor, original = scaling.factor, scaling.original_max_position_embeddings
    scale = scaling.attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def dim_of(
        rotations: float,
    ) -> float:  # the dimension that turns `rotations` times over `original` positions
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = (
        (torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
    ).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 → keep the original frequency (fast dims), 0 → divide it by `factor`
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, scale
