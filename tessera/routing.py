"""Routing policy: which tiles go through the 1/16 branch (mlp2) and which keep 1/4 (mlp1).

Four modes, one code path (eval, chat, serve and the benchmark all call `decide`):
- `full`        every tile at 1/4 (plain InternVL3.5)
- `compressed`  every tile at 1/16
- `router`      ViR: compress tile i of an image when p_i > q and p_i >= absolute, with p = p(compress) from the
                router and q the `relative` quantile of p over that image's tiles (the released rule; the release
                takes the quantile over all tiles of a generate call, i.e. per image in single-image chat)
- `random`      per image, exactly as many tiles as `router` would compress, chosen uniformly at random: the fair
                baseline at the same visual-token budget

A per-request `budget` (visual tokens over all images of the request) is applied after the mode: if the
request is over budget, still-kept tiles are compressed in decreasing p(compress) until it fits; a budget
below the all-compressed count is an error, never a silent overrun.

`encode_routed` is the compute-saving inference path: ViT once, router on its last-layer tokens, then only the
chosen branch per tile (tiles batched per branch) — via `VisionLanguageModel.encode_images(compress=callable)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from tessera.geometry import routed_tokens, tokens_of_images
from tessera.image import load_image, preprocess

MODES = ("full", "compressed", "router", "random")


class RoutingError(ValueError):
    """An invalid routing request: unknown mode, a budget that cannot be met, a router the model lacks."""


@dataclass(frozen=True)
class RoutingPolicy:
    """How to route one request. Thresholds default (None) to the model's `config.flash`. The one routing type:
    eval, chat, the API and the DvD wire format (which carries `mode` and `budget`) all use it."""

    mode: str = "full"
    relative_threshold: float | None = None
    absolute_threshold: float | None = None
    budget: int | None = None  # max visual tokens for the whole request
    seed: int = 0  # for `random`

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RoutingError(
                f"unknown routing mode {self.mode!r}; choose from {', '.join(MODES)}"
            )
        for name in ("relative_threshold", "absolute_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise RoutingError(f"{name} must lie in [0, 1], got {value}")
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1
        ):
            raise RoutingError(
                f"budget must be a positive integer number of visual tokens, got {self.budget!r}"
            )

    def key(self) -> str:
        """What the decision depends on besides the images: part of a feature-cache key."""
        base = f"{self.mode}:{self.budget}"
        if (self.relative_threshold, self.absolute_threshold, self.seed) == (None, None, 0):
            return base
        return f"{base}:{self.relative_threshold}:{self.absolute_threshold}:{self.seed}"

    @property
    def needs_router(self) -> bool:
        """True when the decision reads router scores (router, random, or any budgeted request but all-compressed)."""
        return self.mode in ("router", "random") or (
            self.budget is not None and self.mode != "compressed"
        )

    @classmethod
    def parse(cls, routing: str | RoutingPolicy | None, **overrides) -> RoutingPolicy:
        if isinstance(routing, RoutingPolicy):
            return replace(routing, **overrides) if overrides else routing
        return cls(mode=routing or "full", **overrides)


@dataclass
class RoutingDecision:
    """Per-tile outcome of routing one request (tiles in prompt order)."""

    compress: torch.Tensor  # bool [N]
    tokens_per_tile: list[int]
    tiles_per_image: list[int]
    p_compress: torch.Tensor | None = None  # float [N], when the router ran

    @property
    def visual_tokens(self) -> int:
        return sum(self.tokens_per_tile)

    @property
    def compressed_tiles(self) -> int:
        return int(self.compress.sum())

    @property
    def image_tokens(self) -> list[int]:
        """Visual tokens per image: what the prompt carries for each `<img>`."""
        return tokens_of_images(self.tiles_per_image, self.tokens_per_tile)


def _check_tiles(n: int, tiles_per_image: list[int]) -> None:
    if any(t < 1 for t in tiles_per_image) or sum(tiles_per_image) != n:
        raise RoutingError(f"tiles_per_image {tiles_per_image} does not add up to {n} tiles")


def threshold_decision(
    p_compress: torch.Tensor, tiles_per_image: list[int], relative: float, absolute: float
) -> torch.Tensor:
    """The released ViR rule per image: compress where p > quantile(p_image, relative) and p >= absolute.

    p_compress [N] → bool [N]. Raising either threshold never adds a compressed tile (monotone). Because the
    comparison with the quantile is strict (as released), the tile(s) with the lowest p of an image are never
    compressed, so a one-tile image always keeps its 1/4 tokens in `router` mode.
    """
    _check_tiles(p_compress.numel(), tiles_per_image)
    p = p_compress.detach().float()
    out = torch.zeros_like(p, dtype=torch.bool)
    start = 0
    for n in tiles_per_image:
        chunk = p[start : start + n]  # [n]
        q = torch.quantile(chunk, relative)
        out[start : start + n] = (chunk > q) & (chunk >= absolute)
        start += n
    return out


def random_decision(
    counts: list[int], tiles_per_image: list[int], generator: torch.Generator
) -> torch.Tensor:
    """Per image, compress `counts[i]` tiles chosen uniformly at random. → bool [ΣN]."""
    if len(counts) != len(tiles_per_image):
        raise RoutingError(f"{len(counts)} counts for {len(tiles_per_image)} images")
    parts = []
    for k, n in zip(counts, tiles_per_image):
        if not 0 <= k <= n:
            raise RoutingError(f"cannot compress {k} of {n} tiles")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=generator)[:k]] = True
        parts.append(mask)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def enforce_budget(
    compress: torch.Tensor,
    p_compress: torch.Tensor | None,
    budget: int,
    full_tokens: int,
    compressed_tokens: int,
) -> torch.Tensor:
    """Compress more tiles (highest p(compress) first, then by position) until Σ tokens <= budget.

    Smaller budgets compress supersets of the tiles larger budgets compress (monotone). Without scores
    (`p_compress=None`) the order is the tiles' position. Raises RoutingError if even all-compressed is over.
    """
    compress = compress.clone()
    n = compress.numel()
    floor = n * compressed_tokens
    if budget < floor:
        raise RoutingError(
            f"a budget of {budget} visual tokens is below the {floor} that {n} tiles need even "
            f"all at 1/16 ({compressed_tokens} each); raise the budget or send a smaller image"
        )
    tokens = sum(routed_tokens(compress.tolist(), full_tokens, compressed_tokens))
    if tokens <= budget:
        return compress
    save = full_tokens - compressed_tokens
    need = -(-(tokens - budget) // save)  # ceil: tiles still to compress
    scores = p_compress.detach().float() if p_compress is not None else torch.zeros(n)
    order = sorted((i for i in range(n) if not compress[i]), key=lambda i: (-float(scores[i]), i))
    compress[order[:need]] = True
    return compress


def decide(
    policy: RoutingPolicy,
    tiles_per_image: list[int],
    full_tokens: int,
    compressed_tokens: int,
    p_compress: torch.Tensor | None = None,
    relative: float = 0.5,
    absolute: float = 0.5,
    generator: torch.Generator | None = None,
) -> RoutingDecision:
    """Route one request. `relative`/`absolute` are the model's defaults, overridden by the policy's own values."""
    n = sum(tiles_per_image)
    _check_tiles(n, tiles_per_image)
    if policy.needs_router and p_compress is None:
        raise RoutingError(
            f"routing mode {policy.mode!r}{' with a budget' if policy.budget else ''} needs router "
            "scores, and none were given (is this a Flash model?)"
        )
    if p_compress is not None and p_compress.numel() != n:
        raise RoutingError(f"{p_compress.numel()} router scores for {n} tiles")
    rel = policy.relative_threshold if policy.relative_threshold is not None else relative
    ab = policy.absolute_threshold if policy.absolute_threshold is not None else absolute
    if policy.mode == "full":
        compress = torch.zeros(n, dtype=torch.bool)
    elif policy.mode == "compressed":
        compress = torch.ones(n, dtype=torch.bool)
    else:
        compress = threshold_decision(p_compress, tiles_per_image, rel, ab)
        if policy.mode == "random":
            counts, start = [], 0
            for k in tiles_per_image:
                counts.append(int(compress[start : start + k].sum()))
                start += k
            gen = generator if generator is not None else torch.Generator().manual_seed(policy.seed)
            compress = random_decision(counts, tiles_per_image, gen)
    if policy.budget is not None:
        # random stays random under a budget: extra tiles in position order rather than by router score
        scores = None if policy.mode == "random" else p_compress
        compress = enforce_budget(compress, scores, policy.budget, full_tokens, compressed_tokens)
    tokens = routed_tokens(compress.tolist(), full_tokens, compressed_tokens)
    return RoutingDecision(
        compress,
        tokens,
        list(tiles_per_image),
        p_compress.detach().float() if p_compress is not None else None,
    )


# ---- the model-facing path --------------------------------------------------------------------------------


def _model_thresholds(model) -> tuple[float, float]:
    flash = model.config.flash
    return flash.relative_threshold, flash.absolute_threshold


def router_of(model):
    """The model's VisualResolutionRouter, or a RoutingError naming what is missing."""
    router = getattr(model, "router", None)
    if router is None or not model.config.flash.enabled:
        raise RoutingError(
            "this model has no Visual Resolution Router (not a Flash model); use --routing full"
        )
    return router


def make_router_hook(
    model,
    tiles_per_image: list[int],
    policy: RoutingPolicy,
    generator: torch.Generator | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list]:
    """A callable for `encode_images(compress=...)`: last-layer patch tokens [N,P,Cv] → bool [N].

    Returns (hook, box); after encoding, box[0] holds the RoutingDecision.
    """
    cfg = model.config
    full, small = cfg.tokens_per_tile, cfg.compressed_tokens_per_tile
    rel, ab = _model_thresholds(model)
    box: list[RoutingDecision] = []

    def hook(patch_tokens: torch.Tensor) -> torch.Tensor:
        p = router_of(model).p_compress(patch_tokens) if policy.needs_router else None
        decision = decide(policy, tiles_per_image, full, small, p, rel, ab, generator)
        box.append(decision)
        return decision.compress.to(patch_tokens.device)

    return hook, box


@torch.no_grad()
def encode_routed(
    model,
    pixel_values: torch.Tensor,
    tiles_per_image: list[int],
    routing: str | RoutingPolicy,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> tuple[torch.Tensor, RoutingDecision]:
    """ViT once → router (only when the policy needs it) → only the chosen branch per tile.

    Returns (features [ΣT, D], decision); `decision.image_tokens` is what the prompt must carry per image.
    `seed` (or a `generator`, which wins) drives `random`.
    """
    policy = RoutingPolicy.parse(routing, **({"seed": seed} if seed is not None else {}))
    if policy.mode != "full" and not model.config.flash.enabled:
        raise RoutingError(
            f"routing {policy.mode!r} needs a Flash model (mlp2 and the router); this one is plain"
        )
    hook, box = make_router_hook(model, tiles_per_image, policy, generator)
    features, tokens_per_tile = model.encode_images(pixel_values, compress=hook)
    decision = box[0]
    if (
        list(tokens_per_tile) != decision.tokens_per_tile
        or features.shape[0] != decision.visual_tokens
    ):
        raise RoutingError(
            f"encoder produced {features.shape[0]} rows / {tokens_per_tile} per tile, but routing "
            f"decided {decision.tokens_per_tile}"
        )
    return features, decision


@torch.no_grad()
def route_tiles(
    model,
    pixel_values: torch.Tensor,
    tiles_per_image: list[int],
    routing: str | RoutingPolicy,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor | None:
    """Only the per-tile compress flags (runs the ViT for the router; prefer `encode_routed`, which runs it once)."""
    policy = RoutingPolicy.parse(routing, **({"seed": seed} if seed is not None else {}))
    if policy.mode == "full" and policy.budget is None:
        return None
    p = None
    if policy.needs_router:
        grid = model.vision_tokens(pixel_values)  # [N, h, w, Cv]
        p = router_of(model).p_compress(grid.reshape(grid.shape[0], -1, grid.shape[-1]))  # [N]
    rel, ab = _model_thresholds(model)
    cfg = model.config
    return decide(
        policy,
        tiles_per_image,
        cfg.tokens_per_tile,
        cfg.compressed_tokens_per_tile,
        p,
        rel,
        ab,
        generator,
    ).compress


# ---- a picture of one routing decision ----------------------------------------------------------------------


def draw_routing(
    model, image, routing: str | RoutingPolicy, out_png: str, seed: int = 0, scale: int = 0
) -> RoutingDecision:
    """Draw the tiled image with each tile marked kept (1/4, green) or compressed (1/16, red), plus the thumbnail.

    Each tile is labelled with its branch and, when the router ran, p(compress). Returns the decision drawn.
    """
    from PIL import Image, ImageDraw, ImageFont

    cfg = model.config
    img = load_image(image)
    pixel_values, (cols, rows) = preprocess(
        img, cfg.tile_size, cfg.min_tiles, cfg.max_tiles, cfg.use_thumbnail
    )
    n = pixel_values.shape[0]
    policy = RoutingPolicy.parse(routing, seed=seed)
    with torch.no_grad():
        p = None
        if cfg.flash.enabled and getattr(model, "router", None) is not None:
            grid = model.vision_tokens(pixel_values)  # [N, h, w, Cv]
            p = router_of(model).p_compress(grid.reshape(n, -1, grid.shape[-1]))  # [N]
        rel, ab = _model_thresholds(model)
        decision = decide(
            policy, [n], cfg.tokens_per_tile, cfg.compressed_tokens_per_tile, p, rel, ab
        )
    S = cfg.tile_size
    k = scale or max(1, round(448 / S))  # small tiles are drawn larger so the labels fit
    T = S * k
    base = (
        img.convert("RGB")
        .resize((S * cols, S * rows), Image.BICUBIC)
        .resize((T * cols, T * rows), Image.NEAREST)
    )
    thumb = n > cols * rows
    legend_h = 28
    canvas = Image.new(
        "RGB", (T * cols + (T // 2 + 12 if thumb else 0), T * rows + legend_h), "white"
    )
    canvas.paste(base, (0, 0))
    if thumb:
        canvas.paste(img.convert("RGB").resize((T // 2, T // 2), Image.BICUBIC), (T * cols + 6, 0))
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default(size=max(10, T // 16))
    boxes = [
        (c * T, r * T, (c + 1) * T - 1, (r + 1) * T - 1) for r in range(rows) for c in range(cols)
    ]
    if thumb:
        boxes.append((T * cols + 6, 0, T * cols + 6 + T // 2 - 1, T // 2 - 1))
    for i, box in enumerate(boxes):
        compressed = bool(decision.compress[i])
        colour = (220, 40, 40) if compressed else (30, 170, 60)
        if compressed:
            draw.rectangle(box, fill=colour + (70,))
        draw.rectangle(box, outline=colour + (255,), width=max(2, T // 100))
        label = (
            ("thumb " if i == cols * rows else "")
            + ("1/16" if compressed else "1/4")
            + (f" p={float(p[i]):.2f}" if p is not None else "")
        )
        draw.text(
            (box[0] + 4, box[1] + 3),
            label,
            fill=(255, 255, 255, 255),
            font=font,
            stroke_width=2,
            stroke_fill=colour + (255,),
        )
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    ImageDraw.Draw(canvas).text(
        (4, T * rows + 6),
        f"routing {policy.mode}: {decision.compressed_tiles}/{n} tiles at 1/16, "
        f"{decision.visual_tokens} visual tokens (all 1/4: {n * cfg.tokens_per_tile})",
        fill=(0, 0, 0),
        font=ImageFont.load_default(size=14),
    )
    canvas.save(out_png)
    return decision
