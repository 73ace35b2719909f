"""ViR, the Visual Resolution Router of InternVL3.5-Flash: one keep/compress decision per tile.

Released architecture (InternVL3_5-*-Flash `modeling_internvl_chat.py` on the hub; the same semantics are
re-implemented in lmdeploy's `internvl.py`). Cv = ViT hidden size, P = patches per tile (1024 at 448 px):

    ViT last layer [N, 1+P, Cv] ─drop CLS─▶ [N, P, Cv]        (always the last layer, not `select_layer`)
    pooling_before_gating  CrossAttentionPooling(dim=Cv, num_heads=16)
        query_token                       [1, Cv] learned
        attn1..attn4 (nn.MultiheadAttention, batch_first): in_proj_weight [3Cv, Cv], in_proj_bias [3Cv],
                                          out_proj.weight [Cv, Cv], out_proj.bias [Cv]
        norm1..norm4 (LayerNorm Cv)
        forward: h = norm1(attn1(q, X, X)); then h = norm2(attn2(h, X, X)) three times.
                 attn3/norm3/attn4/norm4 are in the checkpoint but the released forward never calls them
                 (it reuses attn2/norm2); there are no residuals. Output [N, Cv].
    gating  Gating(hidden_size=Cv, expansion 4, dropout 0.1)
        block1..block4 = Sequential(Linear(Cv,4Cv), GELU, Dropout, Linear(4Cv,Cv), Dropout, LayerNorm(Cv))
                         keys blockK.0 / blockK.3 / blockK.5;   x = x + blockK(x)
        gate = Sequential(LayerNorm(Cv), Linear(Cv, 2))         keys gate.0 / gate.1
        softmax → [N, 2]; class 0 = compress (route the tile through mlp2, 1/16), class 1 = keep (mlp1, 1/4).
    decision (released, over the tiles of one generate call):
        compress_i = p0_i > quantile(p0, flash_relative_threshold) and p0_i >= flash_absolute_threshold
    config.json: flash_mode, flash_relative_threshold, flash_absolute_threshold.
    mlp2 (1/16 branch, in tessera.model.connector): pixel_shuffle(x, 0.25) in one step, then keys
        mlp2.0 LayerNorm(16Cv), mlp2.1 Linear(16Cv, 2Cl), mlp2.4 Linear(2Cl, 2Cl), mlp2.7 Linear(2Cl, Cl).

The transformers port of Flash (the `InternvlFlash` model of a transformers pull request, not in a release)
renames these keys under `model.`: mlp2.{norm,dense1,dense2,dense3}; pooling attnK.in_proj split into
attnK.{query,key,value}; gating blockK.{dense_in,dense_out,norm}, gating.{gate_norm,gate_proj}. That port also
calls attn3/attn4 in its forward, which diverges from the released checkpoints' code; Tessera follows the release.
`flash_official_to_hf` / `flash_hf_to_official` below are the one key map for these Flash-only weights.

Tessera extensions (absent from official checkpoints, so such a model cannot be written in the official layout):
`router_hidden_size` ≠ Cv adds `pooling_before_gating.proj_in` (Linear Cv → H) so a small model can route in a
narrower space; `router_num_queries` > 1 averages the pooled queries. With the released values the keys and the
arithmetic are exactly the released ones.

The module tree: the VLM registers `pooling_before_gating` and `gating` at its top level (official key names);
`VisualResolutionRouter` wraps the two for calling and training and has the same state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import FlashConfig

COMPRESS = 0  # class index of "compress this tile" in the router's softmax (released convention)
KEEP = 1

FLASH_PREFIXES = (
    "mlp2.",
    "pooling_before_gating.",
    "gating.",
)  # official top-level Flash-only keys


class CrossAttentionPooling(nn.Module):
    """Learned-query cross-attention over one tile's patch tokens → one vector per tile (released `pooling_before_gating`)."""

    def __init__(
        self,
        vision_hidden: int,
        hidden: int = 0,
        num_heads: int = 16,
        num_queries: int = 1,
        num_attention: int = 4,
    ):
        super().__init__()
        hidden = hidden or vision_hidden
        if hidden % num_heads:
            raise ValueError(
                f"router hidden size {hidden} is not divisible by router_num_heads {num_heads}"
            )
        if num_queries < 1:
            raise ValueError(f"router_num_queries must be >= 1, got {num_queries}")
        self.hidden, self.num_heads = hidden, num_heads
        if hidden != vision_hidden:
            self.proj_in = nn.Linear(
                vision_hidden, hidden
            )  # Tessera extension, see the module docstring
        self.query_token = nn.Parameter(torch.randn(num_queries, hidden))  # [Q, H]
        # all four exist in released checkpoints; the forward uses attn1 and attn2 (Tessera's own routers
        # build only those two: `num_attention=2`)
        if num_attention not in (2, 4):
            raise ValueError(f"num_attention must be 2 or 4, got {num_attention}")
        for k in range(1, num_attention + 1):
            setattr(self, f"attn{k}", nn.MultiheadAttention(hidden, num_heads, batch_first=True))
            setattr(self, f"norm{k}", nn.LayerNorm(hidden))

    def _keys_values(
        self, attn: nn.MultiheadAttention, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `attn` for tokens x [N,P,H] → two [N,heads,P,hd] (computed once, reused by repeated calls)."""
        N, P, H = x.shape
        w, b = attn.in_proj_weight, attn.in_proj_bias
        kv = F.linear(x, w[H:], b[H:])  # [N,P,2H]
        kv = kv.view(N, P, 2, self.num_heads, H // self.num_heads).permute(
            2, 0, 3, 1, 4
        )  # [2,N,heads,P,hd]
        return kv[0], kv[1]

    def _attend(
        self, attn: nn.MultiheadAttention, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """nn.MultiheadAttention(query, X, X) with precomputed K, V: query [N,Q,H] → [N,Q,H]."""
        N, Q, H = query.shape
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = (
            F.linear(query, w[:H], b[:H])
            .view(N, Q, self.num_heads, H // self.num_heads)
            .transpose(1, 2)
        )  # [N,heads,Q,hd]
        out = F.scaled_dot_product_attention(q, k, v)  # [N,heads,Q,hd]
        out = out.transpose(1, 2).reshape(N, Q, H)  # [N,Q,H]
        return attn.out_proj(out)

    def forward(
        self, tokens: torch.Tensor, query_offset: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [N,P,Cv] (one tile per row, CLS removed) → pooled [N,H].

        `query_offset` [N,H] is added to every learned query of its row (the question-aware router's way of
        asking each tile for what the question names); None is the released forward."""
        if tokens.dim() != 3:
            raise ValueError(
                f"router pooling expects tile tokens [N,P,C], got shape {tuple(tokens.shape)}"
            )
        x = self.proj_in(tokens) if hasattr(self, "proj_in") else tokens  # [N,P,H]
        if x.shape[-1] != self.hidden:
            raise ValueError(f"router pooling expects width {self.hidden}, got {x.shape[-1]}")
        x = x.to(self.query_token.dtype)
        query = self.query_token.unsqueeze(0).expand(x.shape[0], -1, -1)  # [N,Q,H]
        if query_offset is not None:
            query = query + query_offset.to(query.dtype).unsqueeze(1)  # [N,Q,H]
        k1, v1 = self._keys_values(self.attn1, x)
        h = self.norm1(self._attend(self.attn1, query, k1, v1))  # [N,Q,H]
        k2, v2 = self._keys_values(
            self.attn2, x
        )  # the released forward applies attn2/norm2 three times
        for _ in range(3):
            h = self.norm2(self._attend(self.attn2, h, k2, v2))  # [N,Q,H]
        return h.mean(dim=1)  # [N,H]; a plain squeeze when Q = 1 (released)


def _gating_block(hidden: int, expansion: int, dropout: float) -> nn.Sequential:
    # indices 0 / 3 / 5 carry weights: the released keys blockK.0, blockK.3, blockK.5
    return nn.Sequential(
        nn.Linear(hidden, hidden * expansion),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden * expansion, hidden),
        nn.Dropout(dropout),
        nn.LayerNorm(hidden),
    )


class Gating(nn.Module):
    """Residual MLP blocks then LayerNorm → Linear(H, 2): the router's logits (released `gating`, which returns softmax)."""

    def __init__(self, hidden: int, num_blocks: int = 4, expansion: int = 4, dropout: float = 0.1):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"router_num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        for k in range(1, num_blocks + 1):
            setattr(self, f"block{k}", _gating_block(hidden, expansion, dropout))
        self.gate = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """pooled [N,H] → logits [N,2] (softmax of these is the released output)."""
        for k in range(1, self.num_blocks + 1):
            x = x + getattr(self, f"block{k}")(x)  # [N,H]
        return self.gate(x)  # [N,2]


def build_router_parts(
    vision_hidden: int, flash: FlashConfig
) -> tuple[CrossAttentionPooling, Gating]:
    """The two modules the VLM registers as `pooling_before_gating` and `gating`."""
    hidden = flash.router_hidden_size or vision_hidden
    pooling = CrossAttentionPooling(
        vision_hidden, hidden, flash.router_num_heads, flash.router_num_queries
    )
    return pooling, Gating(hidden, flash.router_num_blocks)


class VisualResolutionRouter(nn.Module):
    """pooling_before_gating + gating, called on the last-layer ViT patch tokens of each tile.

    Wraps modules owned by the VLM (shared, not copied): training this wrapper trains the VLM's router.
    """

    def __init__(self, pooling: CrossAttentionPooling, gating: Gating):
        super().__init__()
        self.pooling_before_gating = pooling
        self.gating = gating

    @classmethod
    def from_config(cls, vision_hidden: int, flash: FlashConfig) -> VisualResolutionRouter:
        return cls(*build_router_parts(vision_hidden, flash))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N,P,Cv] → logits [N,2] (class 0 = compress)."""
        return self.gating(self.pooling_before_gating(tokens))

    def probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N,2] softmax, exactly the released Gating output."""
        return torch.softmax(self(tokens).float(), dim=-1)

    def p_compress(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N] probability that each tile can go through the 1/16 branch."""
        return self.probs(tokens)[:, COMPRESS]


# ---- key map for the Flash-only weights: official layout ⇄ transformers InternvlFlash port -------------------

_MLP2_TO_HF = {"0": "norm", "1": "dense1", "4": "dense2", "7": "dense3"}
_BLOCK_TO_HF = {"0": "dense_in", "3": "dense_out", "5": "norm"}
_GATE_TO_HF = {"0": "gate_norm", "1": "gate_proj"}


def _invert(d: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in d.items()}


def flash_official_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys (mlp2.*, pooling_before_gating.*, gating.*) → transformers-port keys under `model.`.

    Only Flash-only keys are accepted; anything else raises, so callers pass exactly the Flash subset.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "mlp2" and len(parts) == 3 and parts[1] in _MLP2_TO_HF:
            out[f"model.mlp2.{_MLP2_TO_HF[parts[1]]}.{parts[2]}"] = value
        elif (
            parts[0] == "pooling_before_gating"
            and len(parts) == 3
            and parts[2] in ("in_proj_weight", "in_proj_bias")
        ):
            suffix = "weight" if parts[2] == "in_proj_weight" else "bias"
            q, k, v = value.chunk(3, dim=0)  # [3H,...] → three [H,...] in q, k, v order
            for name, part in (("query", q), ("key", k), ("value", v)):
                out[f"model.pooling_before_gating.{parts[1]}.{name}.{suffix}"] = part.clone()
        elif parts[0] == "pooling_before_gating":
            out["model." + key] = value
        elif (
            parts[0] == "gating"
            and len(parts) == 4
            and parts[1].startswith("block")
            and parts[2] in _BLOCK_TO_HF
        ):
            out[f"model.gating.{parts[1]}.{_BLOCK_TO_HF[parts[2]]}.{parts[3]}"] = value
        elif (
            parts[0] == "gating"
            and len(parts) == 4
            and parts[1] == "gate"
            and parts[2] in _GATE_TO_HF
        ):
            out[f"model.gating.{_GATE_TO_HF[parts[2]]}.{parts[3]}"] = value
        else:
            raise KeyError(f"not an official Flash key: {key!r}")
    return out


def flash_hf_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `flash_official_to_hf` (q/k/v are concatenated back into in_proj_*)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    mlp2, block, gate = _invert(_MLP2_TO_HF), _invert(_BLOCK_TO_HF), _invert(_GATE_TO_HF)
    for key, value in state.items():
        if not key.startswith("model."):
            raise KeyError(f"not a transformers Flash key: {key!r}")
        parts = key[len("model.") :].split(".")
        if parts[0] == "mlp2" and len(parts) == 3 and parts[1] in mlp2:
            out[f"mlp2.{mlp2[parts[1]]}.{parts[2]}"] = value
        elif (
            parts[0] == "pooling_before_gating"
            and len(parts) == 4
            and parts[2] in ("query", "key", "value")
        ):
            pending.setdefault((parts[1], parts[3]), {})[parts[2]] = value
        elif parts[0] == "pooling_before_gating":
            out[".".join(parts)] = value
        elif (
            parts[0] == "gating"
            and len(parts) == 4
            and parts[1].startswith("block")
            and parts[2] in block
        ):
            out[f"gating.{parts[1]}.{block[parts[2]]}.{parts[3]}"] = value
        elif parts[0] == "gating" and len(parts) == 3 and parts[1] in gate:
            out[f"gating.gate.{gate[parts[1]]}.{parts[2]}"] = value
        else:
            raise KeyError(f"not a transformers Flash key: {key!r}")
    for (attn, suffix), qkv in pending.items():
        missing = {"query", "key", "value"} - set(qkv)
        if missing:
            raise KeyError(
                f"pooling_before_gating.{attn}.{suffix}: missing {sorted(missing)} of query/key/value"
            )
        out[f"pooling_before_gating.{attn}.in_proj_{suffix}"] = torch.cat(
            [qkv["query"], qkv["key"], qkv["value"]], dim=0
        )
    return out
