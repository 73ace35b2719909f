"""VisionLanguageModel: InternViT → pixel shuffle → MLP projector → Qwen3 decoder (InternVL3.5 / -Flash).

The model accepts precomputed image features everywhere (`embed`, `forward`), so the engine
and the decoupled (DvD) language server never need the vision tower.

Flash: each tile goes through either the 1/4 branch (`mlp1`, `config.downsample_ratio`) or the 1/16 branch
(`mlp2`, `config.flash.compressed_downsample_ratio`). The ViT runs once on all tiles; each projector
then runs only on its own tiles. The router's modules (`pooling_before_gating`, `gating`; tessera/model/router.py)
exist when Flash is enabled; routing decisions come in as the `compress` mask or a router hook (tessera.routing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import nn

from tessera.config import ModelConfig
from tessera.model.connector import make_mlp1, make_mlp2, pixel_shuffle
from tessera.model.llm import Qwen3ForCausalLM
from tessera.model.question_router import QuestionAwareRouter
from tessera.model.router import VisualResolutionRouter, build_router_parts
from tessera.model.vit import InternVisionModel

# per-tile routing: None (all at 1/4), bool [N] (True → 1/16), or a hook: last-layer patch tokens [N, P, Cv] → bool [N]
Compress = Union[torch.Tensor, Sequence[bool], Callable[[torch.Tensor], torch.Tensor], None]


class VisionLanguageModel(nn.Module):
    """InternVL3.5. Submodules: `vision_model`, `mlp1`, `language_model`; with Flash also `mlp2` and the router's
    `pooling_before_gating` + `gating` (official key names). `model.router` is a VisualResolutionRouter view
    over those two (None for a plain model), so the weights are stored once."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        cv, cl = config.vision.hidden_size, config.language.hidden_size
        self.vision_model = InternVisionModel(config.vision)
        self.mlp1 = make_mlp1(cv, cl, config.downsample_ratio)
        if config.flash.enabled:
            self.mlp2 = make_mlp2(cv, cl, config.flash.compressed_downsample_ratio)
            # the router's two parts sit at the top level under their official key names
            self.pooling_before_gating, self.gating = build_router_parts(cv, config.flash)
            if (
                config.flash.question_router
            ):  # Tessera's question-aware router, beside the released one
                self.question_router = QuestionAwareRouter(cv, cl, config.flash)
        self.language_model = Qwen3ForCausalLM(config.language)
        self.tokenizer = None  # a tessera.chat.ChatTokenizer, attached by the checkpoint loader

    def add_flash_branch(self) -> None:
        """Give a plain model Flash's 1/16 branch (mlp2) and router, freshly initialised, on its device and dtype.

        The recipe trains the base model without them (they would be untrained weight in tiny-sft) and ViCO adds
        them when it starts teaching the 1/16 branch. A Flash model is left as it is."""
        if hasattr(self, "mlp2"):
            return
        ref = next(self.mlp1.parameters())
        self.config.flash.enabled = True
        cv, cl = self.config.vision.hidden_size, self.config.language.hidden_size
        self.mlp2 = make_mlp2(cv, cl, self.config.flash.compressed_downsample_ratio).to(
            ref.device, ref.dtype
        )
        pooling, gating = build_router_parts(cv, self.config.flash)
        self.pooling_before_gating, self.gating = (
            pooling.to(ref.device, ref.dtype),
            gating.to(ref.device, ref.dtype),
        )

    def add_question_router(self) -> QuestionAwareRouter:
        """Give a Flash model the question-aware router, copied from its released router (so it starts deciding
        as that one does), on its device and dtype; `config.flash.question_router` is set. Returns it."""
        if self.router is None:
            raise ValueError("the question-aware router needs a Flash model (mlp2 and the router)")
        if not hasattr(self, "question_router"):
            ref = next(self.gating.parameters())
            cv, cl = self.config.vision.hidden_size, self.config.language.hidden_size
            qr = QuestionAwareRouter(cv, cl, self.config.flash).to(ref.device, ref.dtype)
            qr.init_from(self.router)
            qr.train(self.training)
            self.question_router = qr
            self.config.flash.question_router = True
        return self.question_router

    # ---- small helpers -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    @property
    def image_context_token_id(self) -> int:
        return self.config.image_context_token_id

    @property
    def router(self) -> VisualResolutionRouter | None:
        """The ViR (a view sharing `pooling_before_gating` and `gating`), None for a plain model."""
        if not hasattr(self, "gating"):
            return None
        return VisualResolutionRouter(self.pooling_before_gating, self.gating)

    # ---- vision --------------------------------------------------------------------------------

    def vision_patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Last-layer ViT patch tokens [N, P, Cv] (CLS dropped): what the router reads."""
        return self.vision_model(pixel_values, layer=-1)[:, 1:]

    def vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT output at `select_layer` without the CLS token, as the patch grid: [N, h, w, Cv]."""
        return self._grid(self.vision_model(pixel_values, layer=self.config.select_layer)[:, 1:])

    @staticmethod
    def _grid(patch_tokens: torch.Tensor) -> torch.Tensor:
        n, p, c = patch_tokens.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"{p} patch tokens do not form a square grid")
        return patch_tokens.reshape(n, side, side, c)  # [N, P, Cv] → [N, h, w, Cv]

    def project(
        self, grid: torch.Tensor, compress: torch.Tensor | Sequence[bool] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Pixel-shuffle and project ViT grids [N, h, w, Cv] tile by tile → (features [ΣT, D], tokens per tile)."""
        n = grid.shape[0]
        mask = self._compress_mask(compress, n, grid.device)
        if not bool(mask.any()):
            feats = self._branch(grid, self.config.downsample_ratio, self.mlp1)  # [N, t, D]
            return feats.reshape(-1, feats.shape[-1]), [feats.shape[1]] * n
        keep_idx, comp_idx = (~mask).nonzero().flatten(), mask.nonzero().flatten()
        per_tile: list[torch.Tensor | None] = [None] * n
        if keep_idx.numel():
            full = self._branch(
                grid[keep_idx], self.config.downsample_ratio, self.mlp1
            )  # [n1, t1, D]
            for row, i in enumerate(keep_idx.tolist()):
                per_tile[i] = full[row]
        small = self._branch(
            grid[comp_idx], self.config.flash.compressed_downsample_ratio, self.mlp2
        )  # [n2, t2, D]
        for row, i in enumerate(comp_idx.tolist()):
            per_tile[i] = small[row]
        return torch.cat(per_tile, dim=0), [t.shape[0] for t in per_tile]  # [ΣT, D]

    def encode_images(
        self, pixel_values: torch.Tensor, compress: Compress = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Tiles [N, 3, S, S] → (features [ΣT, D] in tile order, tokens per tile). compress[i] → tile i at 1/16.

        `compress` may be a callable (the router hook of tessera.routing): it receives the last-layer patch tokens
        [N, P, Cv] once the ViT has run and returns the bool mask, so the ViT runs once and each projector only
        on its own tiles.
        """
        if not callable(compress):
            return self.project(self.vision_tokens(pixel_values), compress)
        # one ViT pass gives both the select_layer tokens (projected) and the last-layer tokens (routed)
        selected, last = self.vision_model.hidden_states(
            pixel_values, [self.config.select_layer, -1]
        )  # [N, 1+P, Cv]
        grid = self._grid(selected[:, 1:])  # [N, h, w, Cv]
        compress = compress(last[:, 1:])  # [N, P, Cv] → bool [N]
        return self.project(grid, compress)

    @staticmethod
    def _branch(grid: torch.Tensor, ratio: float, mlp: nn.Module) -> torch.Tensor:
        x = pixel_shuffle(grid, ratio)  # [n, h·r, w·r, Cv/r²]
        return mlp(x.reshape(x.shape[0], -1, x.shape[-1]))  # [n, t, D]

    def _compress_mask(self, compress, n: int, device: torch.device) -> torch.Tensor:
        if compress is None:
            return torch.zeros(n, dtype=torch.bool, device=device)
        mask = torch.as_tensor(compress, device=device)
        if mask.dtype != torch.bool or mask.shape != (n,):
            raise ValueError(
                f"compress must be a bool tensor of shape [{n}] (one per tile), got {mask.dtype} {tuple(mask.shape)}"
            )
        if bool(mask.any()) and not hasattr(self, "mlp2"):
            raise ValueError(
                "compress asks for the 1/16 branch but this model has no mlp2 (config.flash.enabled is False)"
            )
        return mask

    # ---- language ------------------------------------------------------------------------------

    def embed(
        self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] with image features spliced in, in order, at the <IMG_CONTEXT> positions."""
        input_ids = input_ids.to(
            self.device
        )  # prompts are built on the CPU; the model may be on a GPU
        embeds = self.language_model.embed_tokens(input_ids)  # [B, T, D]
        slots = input_ids == self.config.image_context_token_id  # [B, T]
        n_slots = int(slots.sum())
        n_rows = 0 if image_features is None else image_features.shape[0]
        if n_slots != n_rows:
            raise ValueError(
                f"the prompt has {n_slots} <IMG_CONTEXT> tokens (id {self.config.image_context_token_id}) "
                f"but {n_rows} image feature rows were given"
            )
        if image_features is None:
            return embeds
        if n_rows == 0:  # no rows but a graph (FSDP runs the vision tower on every rank): keep it
            return embeds + image_features.sum() if image_features.requires_grad else embeds  # + 0
        if image_features.dim() != 2 or image_features.shape[1] != embeds.shape[-1]:
            raise ValueError(
                f"image_features must be [rows, {embeds.shape[-1]}], got {tuple(image_features.shape)}"
            )
        return embeds.masked_scatter(
            slots[..., None], image_features.to(embeds.device, embeds.dtype)
        )  # [B, T, D]

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache=None,
        compress: Compress = None,
    ) -> torch.Tensor:
        """Logits [B, T, V]. Give either `pixel_values` (encoded here, with `compress`) or `image_features`."""
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("give pixel_values or image_features, not both")
            image_features, _ = self.encode_images(pixel_values, compress)
        embeds = self.embed(input_ids, image_features)
        return self.language_model(embeds, position_ids, cache, attn_mask)
