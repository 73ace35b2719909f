"""The question-aware router: Tessera's own ViR that reads the question as well as the tile.

The released router (tessera.model.router) decides per tile from the tile alone, so it cannot know that "what
colour is the square?" needs none of an image's small text while "what is the label of the red diamond?" needs
one label. This router takes, besides each tile's last-layer ViT tokens, a text embedding of the question:

    question ids ─embed_tokens (the LLM's, on the language side)─▶ mean over tokens  e [Dl]
    q = question_proj(question_norm(e))                                                [H]
    pooling: the released cross-attention pooling, its learned query shifted by query_proj(q)
             (each tile is asked for what the question names)                          [N, H]
    FiLM:    h = pooled · (1 + γ) + β,  (γ, β) = film(q)                               [N, H]
    gating:  the released residual blocks and gate → logits [N, 2], class 0 = compress

`query_proj` and `film` start at zero, so a fresh question router copied from a trained released router
(`init_from`) decides exactly as that router does, and training moves it from there. It sits at the VLM's top
level as `question_router.*` (a Tessera extension: absent from official checkpoints) next to the released one,
so a checkpoint carries both; `config.flash.question_router` says it is there.

Why a mean of token embeddings: it is what the language side already has for free (no forward pass), it is one
vector per request to send to a vision server, and the world's questions are told apart by the words they name
(colours, shapes, "label", "document"); word order is left to the LLM.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.config import FlashConfig
from tessera.model.router import COMPRESS, CrossAttentionPooling, Gating, VisualResolutionRouter


class QuestionAwareRouter(nn.Module):
    """p(compress) per tile given the tile's last-layer ViT tokens and the question's embedding."""

    def __init__(self, vision_hidden: int, text_hidden: int, flash: FlashConfig):
        super().__init__()
        hidden = flash.router_hidden_size or vision_hidden
        self.hidden, self.text_hidden = hidden, text_hidden
        self.pooling = CrossAttentionPooling(
            vision_hidden, hidden, flash.router_num_heads, flash.router_num_queries, num_attention=2
        )
        self.gating = Gating(hidden, flash.router_num_blocks)
        self.question_norm = nn.LayerNorm(text_hidden)
        self.question_proj = nn.Linear(text_hidden, hidden)
        self.query_proj = nn.Linear(hidden, hidden)
        self.film = nn.Linear(hidden, 2 * hidden)
        for layer in (self.query_proj, self.film):  # start as the router it is copied from
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """tokens [N,P,Cv], question [N,Dl] (each tile's question embedding) → logits [N,2]."""
        if question.dim() != 2 or question.shape != (tokens.shape[0], self.text_hidden):
            raise ValueError(
                f"question embeddings must be [{tokens.shape[0]}, {self.text_hidden}] (one per tile), "
                f"got {tuple(question.shape)}"
            )
        dtype = self.question_proj.weight.dtype
        q = self.question_proj(self.question_norm(question.to(dtype)))  # [N,H]
        pooled = self.pooling(tokens, query_offset=self.query_proj(q))  # [N,H]
        gamma, beta = self.film(q).chunk(2, dim=-1)  # two [N,H]
        return self.gating(pooled * (1 + gamma) + beta)  # [N,2]

    def p_compress(self, tokens: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """[N] probability that each tile can go through the 1/16 branch for this question."""
        return torch.softmax(self(tokens, question).float(), dim=-1)[:, COMPRESS]

    @torch.no_grad()
    def init_from(self, router: VisualResolutionRouter) -> None:
        """Copy the released router's pooling (attn1/norm1, attn2/norm2, query, projection) and gating."""
        source = router.pooling_before_gating.state_dict()
        own = self.pooling.state_dict()
        missing = [k for k in own if k not in source]
        if missing or router.gating.num_blocks != self.gating.num_blocks:
            raise ValueError(
                "the question router and the released router differ in shape "
                f"(pooling keys {missing}, gating blocks {router.gating.num_blocks} vs "
                f"{self.gating.num_blocks}); build both from the same config.flash"
            )
        self.pooling.load_state_dict({k: source[k] for k in own})
        self.gating.load_state_dict(router.gating.state_dict())


@torch.no_grad()
def question_embedding(embed_tokens: nn.Embedding, ids: list[list[int]]) -> torch.Tensor:
    """Mean token embedding of each question → [B, Dl] float32 (zeros for a question without text tokens)."""
    weight = embed_tokens.weight
    out = torch.zeros(len(ids), weight.shape[1], dtype=torch.float32)
    for b, row in enumerate(ids):
        if row:
            index = torch.tensor(row, dtype=torch.long, device=weight.device)
            out[b] = embed_tokens(index).float().mean(0).cpu()  # [T,Dl] → [Dl]
    return out
