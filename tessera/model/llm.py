"""The decoder working on embeddings: Qwen3 (GQA, RoPE, per-head q/k RMSNorm, SwiGLU, tied or untied head),
Qwen3-MoE (sparse MLPs, tessera.model.moe) and GPT-OSS (MoE, attention sinks and biases, sliding-window layers,
YaRN; tessera.model.gpt_oss), chosen by `LanguageConfig.architecture`.

Module names follow transformers' `Qwen3ForCausalLM` (model.embed_tokens, model.layers.N.self_attn.q_proj, ...,
model.norm, lm_head), which is also what official InternVL checkpoints store under `language_model.`.

The forward takes `inputs_embeds` (the VLM splices image features in first) and explicit `position_ids`,
so packed sequences are just restarted positions plus a block-diagonal mask (`packed_causal_mask`).
Any object with `update(layer_idx, k, v) -> (k_all, v_all)` works as a KV cache; `DynamicCache` is the
simple growing one (given `windows`, a sliding layer keeps only its window).

Sliding windows: key j is visible to the query at cache index i iff i - j < window (and j <= i), with indices
counted in the cache's key axis: a query's index is `cache.positions` when the cache has them (the engine's slot
cache, where slot index = position), else `cache.seq_len` + t. A cache that keeps fewer keys for a layer than
the full mask has columns returns the most recent ones, so that layer reads the mask's trailing columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tessera.config import LanguageConfig
from tessera.model.gpt_oss import GptOssMLP, GptOssRMSNorm, rope_frequencies
from tessera.model.moe import Qwen3MoeSparseBlock, load_balancing_loss
from tessera.model.vit import RMSNorm

INIT_STD = 0.02


class DynamicCache:
    """A KV cache that grows by concatenation: per layer, k/v [B, Hkv, S, hd].

    `windows` {layer: W}: those layers store only their latest W - 1 keys after each update (what the next query
    can still see besides itself); `update` still returns every key the current queries need."""

    def __init__(self, windows: dict[int, int] | None = None) -> None:
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.windows = dict(windows or {})
        self.dropped: dict[int, int] = {}  # layer → positions no longer stored

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)  # [B, Hkv, S_old+T, hd]
            v = torch.cat([self.values[layer_idx], v], dim=2)  # [B, Hkv, S_old+T, hd]
        keep = self.windows.get(layer_idx, 0) - 1
        if keep >= 0 and k.shape[2] > keep:
            self.dropped[layer_idx] = self.dropped.get(layer_idx, 0) + k.shape[2] - keep
            self.keys[layer_idx], self.values[layer_idx] = (
                k[:, :, k.shape[2] - keep :],
                v[:, :, v.shape[2] - keep :],
            )
        else:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    @property
    def seq_len(self) -> int:
        """Positions cached so far (0 when empty)."""
        if not self.keys or self.keys[0] is None:
            return 0
        return self.keys[0].shape[2] + self.dropped.get(0, 0)

    def stored(self) -> int:
        """Key positions held over all layers (what the windows save)."""
        return sum(k.shape[2] for k in self.keys if k is not None)


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


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, hd] for rotate-half RoPE, computed in float32 (inv_freq recomputed, never cast to bf16).

    `scaling`: a tessera.config.RopeScaling (YaRN scales the frequencies and cos/sin); None = plain RoPE."""
    if scaling is None or scaling.rope_type == "default":
        exponents = (
            torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
            / head_dim
        )
        inv_freq, scale = 1.0 / (theta**exponents), 1.0  # [hd/2]
    else:
        inv_freq, scale = rope_frequencies(head_dim, theta, scaling, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, hd]
    if scale != 1.0:
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd], cos/sin [B, T, hd] → rotated x."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Qwen3Attention(nn.Module):
    """GQA self-attention with RoPE. Qwen3: per-head q/k RMSNorm, no biases. GPT-OSS (config.attention_sinks):
    no q/k norm, biased projections, and one learned sink logit per head (`sinks` [H]) that joins every softmax
    and takes its share of the probability mass without contributing a value. `window` > 0: a sliding layer."""

    def __init__(self, config: LanguageConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.rope_theta = config.rope_theta
        self.window = config.window(layer_idx)
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)  # per head, before RoPE
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if config.attention_sinks else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache=None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(
            1, 2
        )  # [B, H, T, hd]
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(
            1, 2
        )  # [B, Hkv, T, hd]
        v = (
            self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        )  # [B, Hkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, S, hd]
        s = k.shape[2]
        if attn_mask is not None and attn_mask.shape[-1] > s and self.window:
            attn_mask = attn_mask[..., -s:]  # a windowed cache returned only the latest s keys
        if attn_mask is not None and attn_mask.shape[-2:] != (t, s):
            raise ValueError(f"attn_mask must end in [T={t}, S={s}], got {tuple(attn_mask.shape)}")
        if self.sinks is not None:
            out = self._attend_with_sinks(q, k, v, attn_mask)
        elif (
            t == 1
            and s > 1
            and (attn_mask is None or attn_mask.dim() < 3 or attn_mask.shape[-3] == 1)
        ):
            # decoding: fold each KV head's group of query heads into the query axis, [B, H, 1, hd] → [B, Hkv, G, hd],
            # so the kernel reads every cached key/value head once instead of once per query head. Same scores;
            # a head-independent [B, 1, 1, S] mask broadcasts over the group.
            g = self.num_heads // self.num_kv_heads
            out = F.scaled_dot_product_attention(
                q.reshape(b, self.num_kv_heads, g, self.head_dim), k, v, attn_mask=attn_mask
            )  # [B, Hkv, G, hd]
            out = out.reshape(b, self.num_heads, 1, self.head_dim)  # [B, H, T=1, hd]
        elif attn_mask is not None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, enable_gqa=True
            )  # [B, H, T, hd]
        elif t == s:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=_causal(t, s, x.device), enable_gqa=True
            )
        return self.o_proj(
            out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        )  # [B, T, D]

    def _attend_with_sinks(self, q, k, v, attn_mask):
        """SDPA over the keys plus one extra all-zero key/value whose logit is the head's sink: q·0 = 0, so its
        score is exactly `sinks[h]` (from the additive mask), and its zero value adds nothing to the output."""
        b, _, t, hd = q.shape
        s = k.shape[2]
        zero = k.new_zeros(b, self.num_kv_heads, 1, hd)
        k, v = torch.cat([k, zero], dim=2), torch.cat([v, zero], dim=2)  # [B, Hkv, S+1, hd]
        if attn_mask is None:
            attn_mask = torch.zeros(t, s, dtype=q.dtype, device=q.device).masked_fill_(
                ~_causal(t, s, q.device), float("-inf")
            )  # [T, S]
        elif attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~attn_mask, float("-inf")
            )
        bias = attn_mask.expand(b, self.num_heads, t, s)  # [B, H, T, S]
        sink = self.sinks.to(q.dtype)[None, :, None, None].expand(
            b, self.num_heads, t, 1
        )  # [B, H, T, 1]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.cat([bias, sink], dim=-1), enable_gqa=True
        )  # [B, H, T, hd]


def _causal(t: int, s: int, device) -> torch.Tensor:
    """bool [T, S]: the T new queries sit at the end of the S keys; query i may see keys j <= (s - t) + i."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def sliding_band(q_index: torch.Tensor, s: int, window: int) -> torch.Tensor:
    """bool [B, 1, T, S]: key j is inside the window of the query at cache index q_index[b, t] (q - j < window)."""
    k_index = torch.arange(s, device=q_index.device)  # [S]
    return ((q_index[:, :, None] - k_index[None, None, :]) < window)[:, None]  # [B, 1, T, S]


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
        self.input_layernorm = make_norm(config)
        self.self_attn = Qwen3Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = make_mlp(config, layer_idx)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def make_norm(config: LanguageConfig) -> RMSNorm:
    """The decoder's RMSNorm over the hidden size: GPT-OSS scales by its weight before casting back (same in fp32)."""
    cls = GptOssRMSNorm if config.architecture == "gpt_oss" else RMSNorm
    return cls(config.hidden_size, eps=config.rms_norm_eps)


def make_mlp(config: LanguageConfig, layer_idx: int) -> nn.Module:
    """The layer's MLP: dense SwiGLU, a Qwen3-MoE sparse block, or GPT-OSS's experts."""
    if not config.is_sparse_layer(layer_idx):
        return Qwen3MLP(config)
    return GptOssMLP(config) if config.architecture == "gpt_oss" else Qwen3MoeSparseBlock(config)


class Qwen3Model(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)


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
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, GptOssMLP):
                nn.init.trunc_normal_(module.router.weight, std=INIT_STD)
                nn.init.zeros_(module.router.bias)
                for p in (module.experts.gate_up_proj, module.experts.down_proj):
                    nn.init.trunc_normal_(p, std=INIT_STD)
                nn.init.zeros_(module.experts.gate_up_proj_bias)
                nn.init.zeros_(module.experts.down_proj_bias)
            elif isinstance(module, Qwen3Attention) and module.sinks is not None:
                nn.init.zeros_(module.sinks)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config says so (Qwen3 ≤ 4B)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    def hidden(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache=None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
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
            raise ValueError(
                f"position_ids must be [B={b}, T={t}], got {tuple(position_ids.shape)}"
            )
        position_ids = position_ids.to(
            inputs_embeds.device
        )  # inputs built on the CPU meet a model elsewhere
        if attn_mask is not None:
            attn_mask = attn_mask.to(inputs_embeds.device)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise ValueError(
                f"attn_mask must be a bool tensor (True = may attend), got {attn_mask.dtype}"
            )
        cfg = self.config
        cos, sin = rope_cos_sin(
            position_ids, cfg.head_dim, cfg.rope_theta, inputs_embeds.dtype, cfg.rope_scaling
        )
        masks = self._layer_masks(attn_mask, cache, b, t, inputs_embeds)
        if attn_mask is not None:
            # the additive form SDPA turns a bool mask into, built once here instead of inside every layer's call
            attn_mask = _additive(attn_mask, inputs_embeds.dtype)  # same shape, 0 = may attend
        x = inputs_embeds
        use_ckpt = (
            self.gradient_checkpointing
            and self.training
            and cache is None
            and torch.is_grad_enabled()
        )
        for i, layer in enumerate(self.model.layers):
            mask = masks.get(i, attn_mask)
            if use_ckpt:
                x = checkpoint(layer, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, mask)
        return self.model.norm(x)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache=None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.lm_head(self.hidden(inputs_embeds, position_ids, cache, attn_mask))  # [B, T, V]

    def _layer_masks(
        self, attn_mask, cache, b: int, t: int, like: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """Additive masks of the sliding layers (layer → [B, 1, T, S]): the given mask (or causal) ∩ the window."""
        windows = self.windows()
        if not windows:
            return {}
        if getattr(cache, "positions", None) is not None:
            q_index = (
                cache.positions
            )  # [B, T]: the engine's slot cache stores position p at index p
        else:
            past = cache.seq_len if cache is not None else 0
            q_index = (past + torch.arange(t, device=like.device)).expand(b, t)  # [B, T]
        s = attn_mask.shape[-1] if attn_mask is not None else int(q_index.max()) + 1
        base = attn_mask if attn_mask is not None else _causal(t, s, like.device)  # [.., T, S]
        rings = getattr(cache, "ring", None) or {}
        built: dict[object, torch.Tensor] = {}
        out = {}
        for i, w in windows.items():
            n = rings.get(i)
            if n is not None and t == 1:
                # a ring of the latest n positions (index p mod n): every entry it holds is in the window, and
                # index r holds a real key iff r <= p, which is the given mask's column r
                key = ("ring", n)
                if key not in built:
                    built[key] = _additive(
                        base[..., : min(s, n)], like.dtype
                    )  # [B, 1, 1, min(S, n)]
            else:
                key = w
                if key not in built:
                    built[key] = _additive(
                        base & sliding_band(q_index, s, w), like.dtype
                    )  # [B, 1, T, S]
            out[i] = built[key]
        return out

    def windows(self) -> dict[int, int]:
        """{layer: sliding window} of the sliding layers (for DynamicCache(windows=...))."""
        return {
            i: layer.self_attn.window
            for i, layer in enumerate(self.model.layers)
            if layer.self_attn.window
        }

    def router_logits(self) -> list[torch.Tensor]:
        """The router logits [N, E] of every sparse layer from the latest forward (empty for a dense model)."""
        return [
            layer.mlp.router_logits
            for layer in self.model.layers
            if getattr(layer.mlp, "router_logits", None) is not None
        ]

    def aux_loss(self, token_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The load-balancing loss of the latest forward, already weighted by `router_aux_loss_coef`; None for a
        dense model. token_mask [B, T] (True = real token) keeps padding out of the expert statistics."""
        logits = self.router_logits()
        if not logits:
            return None
        return self.config.router_aux_loss_coef * load_balancing_loss(
            logits, self.config.num_experts_per_tok, token_mask
        )


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = may attend) → additive float mask (0 / -inf), same shape."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )
