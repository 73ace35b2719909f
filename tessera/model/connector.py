"""The vision-language connector: pixel shuffle (v2) then an MLP projector.

- `mlp1` (every InternVL3.5 model): ratio 1/2 → 1/4 of the patch tokens (256 per 448 px tile).
  LayerNorm(4·Cv) → Linear(4·Cv, Cl) → GELU → Linear(Cl, Cl); official keys mlp1.0 / .1 / .3.
- `mlp2` (InternVL3.5-Flash): ratio 1/4 → 1/16 of the patch tokens (64 per tile), applied directly to
  the ViT grid. LayerNorm(16·Cv) → Linear(16·Cv, 2·Cl) → GELU → Dropout → Linear(2·Cl, 2·Cl) → GELU →
  Dropout → Linear(2·Cl, Cl); official keys mlp2.0 / .1 / .4 / .7 (Flash `modeling_internvl_chat.py`).
"""

from __future__ import annotations

import torch
from torch import nn

INIT_STD = 0.02


def shuffle_factor(ratio: float) -> int:
    """k = 1/ratio, checked to be a whole number (ratio 0.5 → 2, 0.25 → 4)."""
    k = round(1 / ratio)
    if k < 1 or abs(k * ratio - 1) > 1e-9:
        raise ValueError(f"pixel-shuffle ratio {ratio} must be 1/k for a whole k")
    return k


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """InternVL's pixel shuffle, version 2: [N, h, w, C] → [N, h·r, w·r, C/r²] with r = `ratio`.

    Output token (i, j) concatenates the k×k block (k = 1/r) of input tokens whose top-left is
    (i·k, j·k), row-major inside the block; the output grid is row-major. This is the official
    view → permute → view → permute sequence (the final permute is what distinguishes v2 from v1).
    """
    if x.dim() != 4:
        raise ValueError(f"pixel_shuffle expects [N, h, w, C], got {tuple(x.shape)}")
    k = shuffle_factor(ratio)
    n, h, w, c = x.shape
    if h % k or w % k:
        raise ValueError(f"grid {h}x{w} is not divisible by the shuffle factor {k} (ratio {ratio})")
    x = x.reshape(n, h, w // k, c * k)  # [N, h, w/k, C·k]: k neighbouring columns side by side
    x = x.permute(0, 2, 1, 3).contiguous()  # [N, w/k, h, C·k]
    x = x.reshape(
        n, w // k, h // k, c * k * k
    )  # [N, w/k, h/k, C·k²]: k neighbouring rows side by side
    return x.permute(0, 2, 1, 3).contiguous()  # [N, h/k, w/k, C·k²]  (v2: swap back to row-major)


def _init_linears(seq: nn.Sequential) -> nn.Sequential:
    for module in seq:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=INIT_STD)
            nn.init.zeros_(module.bias)
    return seq


def make_mlp1(vision_hidden: int, language_hidden: int, ratio: float = 0.5) -> nn.Sequential:
    """The standard projector for tokens pixel-shuffled at `ratio` (default 1/2 → 4·Cv inputs)."""
    d_in = vision_hidden * shuffle_factor(ratio) ** 2
    return _init_linears(
        nn.Sequential(
            nn.LayerNorm(d_in),
            nn.Linear(d_in, language_hidden),
            nn.GELU(),
            nn.Linear(language_hidden, language_hidden),
        )
    )


def make_mlp2(
    vision_hidden: int, language_hidden: int, ratio: float = 0.25, dropout: float = 0.1
) -> nn.Sequential:
    """Flash's compressed-branch projector for tokens pixel-shuffled at `ratio` (default 1/4 → 16·Cv inputs)."""
    d_in = vision_hidden * shuffle_factor(ratio) ** 2
    d_mid = 2 * language_hidden
    return _init_linears(
        nn.Sequential(
            nn.LayerNorm(d_in),
            nn.Linear(d_in, d_mid),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(d_mid, d_mid),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(d_mid, language_hidden),
        )
    )
