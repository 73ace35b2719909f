"""InternViT: the vision tower of InternVL3.5.

Two variants share one code path, selected by `VisionConfig`:
- InternViT-300M (InternVL3.5-1B..38B): LayerNorm, qkv bias, layer scale.
- InternViT-6B style: RMSNorm, RMS q/k normalisation over the full hidden size, no qkv bias.

Module attribute names are those of the official `modeling_intern_vit.py`, so official state dicts
(`vision_model.*`) load without renaming. Attention runs through `scaled_dot_product_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tessera.config import VisionConfig

INIT_STD = 0.02  # official `initializer_range`


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, then scaled by a learned weight (T5 / Qwen / InternViT style)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=eps)
    if norm_type == "rms_norm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm_type {norm_type!r} (expected layer_norm or rms_norm)")


class InternVisionEmbeddings(nn.Module):
    """CLS token + 14×14 patch convolution + learned absolute positions (bicubic-resized for other grids)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, config.patches_per_side**2 + 1, dim))

    def _patch_positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings of the patch grid h×w: the stored grid itself, or a bicubic resize of it."""
        side = self.config.patches_per_side
        pos = self.position_embedding[:, 1:]  # [1, side*side, C]
        if (h, w) == (side, side):
            return pos
        grid = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, C, side, side]
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # [1, C, h, w]
        return grid.flatten(2).transpose(1, 2).to(pos.dtype)  # [1, h*w, C]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        pixels = pixel_values.to(
            self.patch_embedding.weight.device, dtype
        )  # [N, 3, S, S] on the model's device
        patches = self.patch_embedding(pixels)  # [N, C, h, w]
        n, _, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # [N, h*w, C]
        cls = self.class_embedding.expand(n, 1, -1).to(dtype)  # [N, 1, C]
        pos = torch.cat(
            [self.position_embedding[:, :1], self._patch_positions(h, w)], dim=1
        )  # [1, 1+h*w, C]
        return torch.cat([cls, patches], dim=1) + pos.to(dtype)  # [N, 1+P, C]


class InternAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection and optional RMS q/k norm."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if config.qk_normalization:
            # official: RMSNorm over all heads together (hidden_size), not per head
            self.q_norm = RMSNorm(dim, eps=config.layer_norm_eps)
            self.k_norm = RMSNorm(dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim)  # [N, L, 3, H, hd]
        q, k, v = qkv.unbind(2)  # each [N, L, H, hd]
        if self.qk_normalization:
            q = self.q_norm(q.flatten(-2)).view(
                n, length, self.num_heads, self.head_dim
            )  # [N, L, H, hd]
            k = self.k_norm(k.flatten(-2)).view(
                n, length, self.num_heads, self.head_dim
            )  # [N, L, H, hd]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [N, H, L, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # [N, H, L, hd]
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))  # [N, L, C]


class InternMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as ACT2FN["gelu"]


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm block with layer scale: x + ls1·attn(norm1 x), then x + ls2·mlp(norm2 x)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = make_norm(config.norm_type, dim, config.layer_norm_eps)
        self.attn = InternAttention(config)
        self.ls1 = nn.Parameter(torch.full((dim,), config.layer_scale_init))
        self.norm2 = make_norm(config.norm_type, dim, config.layer_norm_eps)
        self.mlp = InternMLP(config)
        self.ls2 = nn.Parameter(torch.full((dim,), config.layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            InternVisionEncoderLayer(config) for _ in range(config.num_layers)
        )
        self.gradient_checkpointing = False


class InternVisionModel(nn.Module):
    """InternViT. `forward(pixel_values [N,3,S,S], layer=-1) -> [N, 1+P, C]` with the CLS token first.

    `layer` indexes the official `hidden_states` tuple (embeddings, then the output of each of the L
    layers; L+1 entries): -1 is the last layer, -2 the one before, 0 the embeddings. Only the layers
    needed are run.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal(0.02) linears and embeddings, unit norms, layer scale at `layer_scale_init`."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, InternVisionEncoderLayer):
                nn.init.constant_(module.ls1, self.config.layer_scale_init)
                nn.init.constant_(module.ls2, self.config.layer_scale_init)
        nn.init.trunc_normal_(self.embeddings.class_embedding, std=INIT_STD)
        nn.init.trunc_normal_(self.embeddings.position_embedding, std=INIT_STD)

    def num_layers_for(self, layer: int) -> int:
        """How many encoder layers produce hidden state `layer` (an index into L+1 hidden states)."""
        total = len(self.encoder.layers)
        if not -(total + 1) <= layer <= total:
            raise ValueError(
                f"layer {layer} out of range for a ViT with {total} layers ({total + 1} hidden states)"
            )
        return layer if layer >= 0 else total + 1 + layer

    def hidden_states(
        self, pixel_values: torch.Tensor, layers: Sequence[int]
    ) -> list[torch.Tensor]:
        """Several hidden states from one pass, each [N, 1+P, C], in the order of `layers`."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be [N, {self.config.num_channels}, S, S], got {tuple(pixel_values.shape)}"
            )
        wanted = [self.num_layers_for(layer) for layer in layers]
        x = self.embeddings(pixel_values)  # [N, 1+P, C]
        found = {0: x}
        use_ckpt = self.encoder.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.encoder.layers[: max(wanted)]):
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
            found[i + 1] = x
        return [found[k] for k in wanted]

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        return self.hidden_states(pixel_values, [layer])[0]
