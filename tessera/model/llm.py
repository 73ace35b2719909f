"""Qwen3-style decoder working on embeddings: GQA, RoPE, per-head q/k RMSNorm, SwiGLU, tied or untied head.

Module names follow transformers' `Qwen3ForCausalLM` (model.embed_tokens, model.layers.N.self_attn.q_proj, ...,
model.norm, lm_head), which is also what official InternVL checkpoints store under `language_model.`.

The forward takes `inputs_embeds` (the VLM splices image features in first) and explicit `position_ids`,
so packed sequences are just restarted positions plus a block-diagonal mask (`packed_causal_mask`).
Any object with `update(layer_idx, k, v) -> (k_all, v_all)` works as a KV cache; `DynamicCache` is the
simple growing one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tessera.config import LanguageConfig
from tessera.model.vit import RMSNorm

INIT_STD = 0.02


class DynamicCache:
    """A KV cache that grows by concatenation: per layer, k/v [B, Hkv, S, hd]."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)  # [B, Hkv, S_old+T, hd]
            v = torch.cat([self.values[layer_idx], v], dim=2)  # [B, Hkv, S_old+T, hd]
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    @property
    def seq_len(self) -> int:
        """Positions cached so far (0 when empty)."""
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]


def packed_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask for packed rows: bool [B, 1, T, T], True = may attend.

    Token i attends token j iff j <= i and both carry the same segment id. Give padding its own id
    (e.g. -1): pads then attend only to pads, so no attention row is empty.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, T], got {tuple(segment_ids.shape)}")
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()  # [T, T]
    return (same & causal)[:, None]  # [B, 1, T, T]


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, hd] for rotate-half RoPE, computed in float32 (inv_freq recomputed, never cast to bf16)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # [hd/2]
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd], cos/sin [B, T, hd] → rotated x."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Qwen3Attention(nn.Module):
    def __init__(self, config: LanguageConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.rope_theta = config.rope_theta
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, S, hd]
        s = k.shape[2]
        if attn_mask is not None and attn_mask.shape[-2:] != (t, s):
            raise ValueError(f"attn_mask must end in [T={t}, S={s}], got {tuple(attn_mask.shape)}")
        if t == 1 and s > 1 and (attn_mask is None or attn_mask.dim() < 3 or attn_mask.shape[-3] == 1):
            # decoding: fold each KV head's group of query heads into the query axis, [B, H, 1, hd] → [B, Hkv, G, hd],
            # so the kernel reads every cached key/value head once instead of once per query head. Same scores;
            # a head-independent [B, 1, 1, S] mask broadcasts over the group.
            g = self.num_heads // self.num_kv_heads
            out = F.scaled_dot_product_attention(q.reshape(b, self.num_kv_heads, g, self.head_dim), k, v,
                                                 attn_mask=attn_mask)  # [B, Hkv, G, hd]
            out = out.reshape(b, self.num_heads, 1, self.head_dim)  # [B, H, T=1, hd]
        elif attn_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)  # [B, H, T, hd]
        elif t == s:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            # new queries sit at the end of the key sequence: query i may see keys j <= (s - t) + i
            causal = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)  # [T, S]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))  # [B, T, D]


class Qwen3MLP(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: LanguageConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    """The decoder plus the LM head. `forward(inputs_embeds [B,T,D], position_ids [B,T], cache, attn_mask) -> logits [B,T,V]`.

    `position_ids=None` means positions continue from the cache (`cache.seq_len`, 0 without a cache).
    `attn_mask`: bool [B, 1, T, S] (True = may attend; S = cached + new keys); None = causal.
    """

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config says so (Qwen3 ≤ 4B)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    def hidden(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None, cache=None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, D]."""
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be [B, T, D], got {tuple(inputs_embeds.shape)}")
        b, t, _ = inputs_embeds.shape
        if position_ids is None:
            if cache is not None and not hasattr(cache, "seq_len"):
                raise ValueError("position_ids are required with a cache that has no seq_len")
            start = cache.seq_len if cache is not None else 0
            position_ids = torch.arange(start, start + t, device=inputs_embeds.device).expand(b, t)
        if position_ids.shape != (b, t):
            raise ValueError(f"position_ids must be [B={b}, T={t}], got {tuple(position_ids.shape)}")
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask must be a bool tensor (True = may attend), got {attn_mask.dtype}")
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        if attn_mask is not None:
            # the additive form SDPA turns a bool mask into, built once here instead of inside every layer's call
            attn_mask = torch.zeros(attn_mask.shape, dtype=inputs_embeds.dtype, device=attn_mask.device).masked_fill_(
                ~attn_mask, float("-inf"))  # same shape, 0 = may attend
        x = inputs_embeds
        use_ckpt = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer in self.model.layers:
            if use_ckpt:
                x = checkpoint(layer, x, cos, sin, None, attn_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, attn_mask)
        return self.model.norm(x)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None, cache=None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(inputs_embeds, position_ids, cache, attn_mask))  # [B, T, V]
