"""Routing policy: which tiles go through the 1/16 branch (mlp2) and which keep 1/4 (mlp1).

Five modes, one code path (eval, chat, serve and the benchmark all call `decide`):
- `full`        every tile at 1/4 (plain InternVL3.5)
- `compressed`  every tile at 1/16
- `router`      ViR: compress tile i of an image when p_i > q and p_i >= absolute, with p = p(compress) from the
                router and q the `relative` quantile of p over that image's tiles (the released rule; the release
                takes the quantile over all tiles of a generate call, i.e. per image in single-image chat)
- `random`      per image, exactly as many tiles as `router` would compress, chosen uniformly at random: the fair
                baseline at the same visual-token budget
- `question`    Tessera's question-aware router (tessera.model.question_router): the same rule on p(compress)
                given the tile *and the question*, with its own thresholds (`config.flash.question_*`)

`match` makes two modes meet at the same budget: `router` or `random` with `match="question"` compresses, per
image, exactly as many tiles as `question` would — the released router its highest-p tiles, random any.
(`random` alone matches `router`.)

A per-request `budget` (visual tokens over all images of the request) is applied after the mode: if the
request is over budget, still-kept tiles are compressed in decreasing p(compress) until it fits; a budget
below the all-compressed count is an error, never a silent overrun.

`encode_routed` is the compute-saving inference path: ViT once, router on its last-layer tokens, then only the
chosen branch per tile (tiles batched per branch) — via `VisionLanguageModel.encode_images(compress=callable)`.
The question modes take one question per image: its text (embedded here with the model's own token
embeddings) or its embedding (`question_vectors`, what a language server sends a vision server).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Union

import torch

from tessera.geometry import routed_tokens, tokens_of_images
from tessera.image import load_image, preprocess
from tessera.model.question_router import question_embedding

MODES = ("full", "compressed", "router", "random", "question")
RELEASED_MODES = MODES[:4]  # what the released Flash design can do (no question router)
ROUTERS = ("router", "question")  # the modes that decide from router scores, and so can be matched


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
    match: str | None = (
        None  # router/random: per image, compress as many tiles as this router would
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RoutingError(
                f"unknown routing mode {self.mode!r}; choose from {', '.join(MODES)}"
            )
        if self.match is not None and (
            self.match not in ROUTERS or self.mode not in ("router", "random")
        ):
            raise RoutingError(
                f"match={self.match!r} with mode {self.mode!r}: only router or random can match the "
                f"budget of {' or '.join(ROUTERS)}"
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
        base = f"{self.mode}:{self.budget}" + (f":match={self.match}" if self.match else "")
        if (self.relative_threshold, self.absolute_threshold, self.seed) == (None, None, 0):
            return base
        return f"{base}:{self.relative_threshold}:{self.absolute_threshold}:{self.seed}"

    @property
    def counts_from(self) -> str | None:
        """The router whose per-image compressed counts this policy takes (random: `router` by default)."""
        return self.match or ("router" if self.mode == "random" else None)

    @property
    def needs_router(self) -> bool:
        """True when the decision reads the released router's scores (router, random matching it, or a budget
        on full or random)."""
        return (
            self.mode == "router"
            or self.counts_from == "router"
            or (self.budget is not None and self.mode in ("full", "random"))
        )

    @property
    def needs_question(self) -> bool:
        """True when the decision reads the question-aware router's scores (so it needs the question)."""
        return self.mode == "question" or self.match == "question"

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
    p_compress: torch.Tensor | None = None  # float [N]: the deciding router's scores, when one ran

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


def top_k_decision(
    p_compress: torch.Tensor, counts: list[int], tiles_per_image: list[int]
) -> torch.Tensor:
    """Per image, compress the `counts[i]` tiles with the highest p(compress) (ties by position). → bool [ΣN]."""
    if len(counts) != len(tiles_per_image):
        raise RoutingError(f"{len(counts)} counts for {len(tiles_per_image)} images")
    out = torch.zeros(p_compress.numel(), dtype=torch.bool)
    start = 0
    for k, n in zip(counts, tiles_per_image):
        if not 0 <= k <= n:
            raise RoutingError(f"cannot compress {k} of {n} tiles")
        chunk = p_compress[start : start + n].detach().float()
        order = sorted(range(n), key=lambda i: (-float(chunk[i]), i))
        out[[start + i for i in order[:k]]] = True
        start += n
    return out


def per_image_counts(compress: torch.Tensor, tiles_per_image: list[int]) -> list[int]:
    """Compressed tiles per image of a decision."""
    return [int(part.sum()) for part in compress.split(tiles_per_image)]


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
    p_question: torch.Tensor | None = None,
    question_thresholds: tuple[float, float] = (0.0, 0.5),
) -> RoutingDecision:
    """Route one request. `p_compress` / `p_question` are the released / question-aware router's scores [N];
    `relative`/`absolute` and `question_thresholds` are the model's defaults for each, overridden by the
    policy's own values."""
    n = sum(tiles_per_image)
    _check_tiles(n, tiles_per_image)
    scores = {"router": p_compress, "question": p_question}
    for name, needed in (("router", policy.needs_router), ("question", policy.needs_question)):
        p = scores[name]
        if needed and p is None:
            what = "router" if name == "router" else "question-aware router"
            raise RoutingError(
                f"routing mode {policy.mode!r}{' with a budget' if policy.budget else ''}"
                f"{f' matching {policy.match!r}' if policy.match else ''} needs {what} scores, and none "
                "were given (is this a Flash model"
                + (" with a question router?)" if name != "router" else "?)")
            )
        if p is not None and p.numel() != n:
            raise RoutingError(f"{p.numel()} {name} scores for {n} tiles")
    defaults = {"router": (relative, absolute), "question": tuple(question_thresholds)}

    def thresholded(name: str) -> torch.Tensor:
        rel, ab = defaults[name]
        rel = policy.relative_threshold if policy.relative_threshold is not None else rel
        ab = policy.absolute_threshold if policy.absolute_threshold is not None else ab
        return threshold_decision(scores[name], tiles_per_image, rel, ab)

    if policy.mode == "full":
        compress = torch.zeros(n, dtype=torch.bool)
    elif policy.mode == "compressed":
        compress = torch.ones(n, dtype=torch.bool)
    elif policy.counts_from is None:  # router or question on its own thresholds
        compress = thresholded(policy.mode)
    else:
        counts = per_image_counts(thresholded(policy.counts_from), tiles_per_image)
        if policy.mode == "random":
            gen = generator if generator is not None else torch.Generator().manual_seed(policy.seed)
            compress = random_decision(counts, tiles_per_image, gen)
        else:  # the released router at another router's budget: its own highest-p tiles
            compress = top_k_decision(p_compress, counts, tiles_per_image)
    deciding = p_question if policy.mode == "question" else p_compress
    if policy.budget is not None:
        # random stays random under a budget: extra tiles in position order rather than by router score
        order = None if policy.mode == "random" else deciding
        compress = enforce_budget(compress, order, policy.budget, full_tokens, compressed_tokens)
    tokens = routed_tokens(compress.tolist(), full_tokens, compressed_tokens)
    return RoutingDecision(
        compress,
        tokens,
        list(tiles_per_image),
        deciding.detach().float() if deciding is not None else None,
    )


# ---- the model-facing path --------------------------------------------------------------------------------

Questions = Union[Sequence[str], torch.Tensor, None]  # one per image: texts, or embeddings [I, Dl]


def _model_thresholds(model) -> tuple[float, float]:
    flash = model.config.flash
    return flash.relative_threshold, flash.absolute_threshold


def _question_thresholds(model) -> tuple[float, float]:
    flash = model.config.flash
    return flash.question_relative_threshold, flash.question_absolute_threshold


def router_of(model):
    """The model's VisualResolutionRouter, or a RoutingError naming what is missing."""
    router = getattr(model, "router", None)
    if router is None or not model.config.flash.enabled:
        raise RoutingError(
            "this model has no Visual Resolution Router (not a Flash model); use --routing full"
        )
    return router


def question_router_of(model):
    """The model's QuestionAwareRouter, or a RoutingError naming what is missing."""
    router = getattr(model, "question_router", None)
    if router is None or not model.config.flash.question_router:
        raise RoutingError(
            "this model has no question-aware router (train one with `tessera train question_router`); "
            "use --routing router or full"
        )
    return router


def question_vectors(model, questions: Sequence[str]) -> torch.Tensor:
    """Each question's embedding [I, Dl] from the model's own token embeddings (the language side's job)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise RoutingError(
            "embedding a question needs the model's tokenizer (tessera.load attaches it)"
        )
    return question_embedding(model.language_model.embed_tokens, [tok.encode(q) for q in questions])


def _per_tile_questions(model, questions: Questions, tiles_per_image: list[int]) -> torch.Tensor:
    """The question embedding of each tile [ΣN, Dl], from one question (text or embedding) per image."""
    if questions is None:
        raise RoutingError(
            "routing 'question' needs the question: one per image (text or embedding)"
        )
    vectors = (
        questions
        if isinstance(questions, torch.Tensor)
        else question_vectors(model, list(questions))
    )
    if vectors.dim() != 2 or vectors.shape[0] != len(tiles_per_image):
        raise RoutingError(
            f"{tuple(vectors.shape)} question embeddings for {len(tiles_per_image)} images "
            "(need one row per image)"
        )
    return vectors.repeat_interleave(torch.tensor(tiles_per_image), dim=0)  # [ΣN, Dl]


def route_patch_tokens(
    model,
    patch_tokens: torch.Tensor,
    tiles_per_image: list[int],
    policy: RoutingPolicy,
    questions: Questions = None,
    generator: torch.Generator | None = None,
) -> RoutingDecision:
    """The decision for tiles whose last-layer ViT tokens [ΣN, P, Cv] are given: only the routers the policy
    reads run. What every path calls once the ViT has run (in-process, and a vision server's cached tokens)."""
    cfg = model.config
    p = router_of(model).p_compress(patch_tokens) if policy.needs_router else None
    pq = None
    if policy.needs_question:
        per_tile = _per_tile_questions(model, questions, tiles_per_image)
        pq = question_router_of(model).p_compress(patch_tokens, per_tile.to(patch_tokens.device))
    rel, ab = _model_thresholds(model)
    return decide(
        policy,
        tiles_per_image,
        cfg.tokens_per_tile,
        cfg.compressed_tokens_per_tile,
        p.cpu() if p is not None else None,
        rel,
        ab,
        generator,
        pq.cpu() if pq is not None else None,
        _question_thresholds(model),
    )


def make_router_hook(
    model,
    tiles_per_image: list[int],
    policy: RoutingPolicy,
    generator: torch.Generator | None = None,
    questions: Questions = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list]:
    """A callable for `encode_images(compress=...)`: last-layer patch tokens [N,P,Cv] → bool [N].

    Returns (hook, box); after encoding, box[0] holds the RoutingDecision.
    """
    box: list[RoutingDecision] = []

    def hook(patch_tokens: torch.Tensor) -> torch.Tensor:
        decision = route_patch_tokens(
            model, patch_tokens, tiles_per_image, policy, questions, generator
        )
        box.append(decision)
        return decision.compress.to(patch_tokens.device)

    return hook, box


def _check_model_can(model, policy: RoutingPolicy) -> None:
    if policy.mode != "full" and not model.config.flash.enabled:
        raise RoutingError(
            f"routing {policy.mode!r} needs a Flash model (mlp2 and the router); this one is plain"
        )
    if policy.needs_question:
        question_router_of(model)


@torch.no_grad()
def encode_routed(
    model,
    pixel_values: torch.Tensor,
    tiles_per_image: list[int],
    routing: str | RoutingPolicy,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    questions: Questions = None,
) -> tuple[torch.Tensor, RoutingDecision]:
    """ViT once → router (only when the policy needs it) → only the chosen branch per tile.

    Returns (features [ΣT, D], decision); `decision.image_tokens` is what the prompt must carry per image.
    `seed` (or a `generator`, which wins) drives `random`; `questions` (one per image) feed `question`.
    """
    policy = RoutingPolicy.parse(routing, **({"seed": seed} if seed is not None else {}))
    _check_model_can(model, policy)
    hook, box = make_router_hook(model, tiles_per_image, policy, generator, questions)
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
    questions: Questions = None,
) -> torch.Tensor | None:
    """Only the per-tile compress flags, None for `full` without a budget (runs the ViT for the routers;
    prefer `encode_routed`, which runs it once and also projects)."""
    policy = RoutingPolicy.parse(routing, **({"seed": seed} if seed is not None else {}))
    if policy.mode == "full" and policy.budget is None:
        return None
    _check_model_can(model, policy)
    tokens = model.vision_patch_tokens(pixel_values)  # [N, P, Cv]
    return route_patch_tokens(model, tokens, tiles_per_image, policy, questions, generator).compress


# ---- a picture of one routing decision ----------------------------------------------------------------------


def draw_routing(
    model,
    image,
    routing: str | RoutingPolicy,
    out_png: str,
    seed: int = 0,
    scale: int = 0,
    question: str | None = None,
) -> RoutingDecision:
    """Draw the tiled image with each tile marked kept (1/4, green) or compressed (1/16, red), plus the thumbnail.

    Each tile is labelled with its branch and, when a router ran, the deciding router's p(compress); with a
    `question` (needed by `question` routing) the picture shows what was kept for that question and names it.
    Returns the decision drawn.
    """
    from PIL import Image, ImageDraw, ImageFont

    cfg = model.config
    img = load_image(image)
    pixel_values, (cols, rows) = preprocess(
        img, cfg.tile_size, cfg.min_tiles, cfg.max_tiles, cfg.use_thumbnail
    )
    n = pixel_values.shape[0]
    policy = RoutingPolicy.parse(routing, seed=seed)
    _check_model_can(model, policy)
    with torch.no_grad():
        tokens = model.vision_patch_tokens(pixel_values)  # [N, P, Cv]
        questions = [question] if question is not None else None
        decision = route_patch_tokens(model, tokens, [n], policy, questions)
        p = decision.p_compress
        if p is None and cfg.flash.enabled and getattr(model, "router", None) is not None:
            p = router_of(model).p_compress(tokens)  # [N], shown even when it did not decide
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
    caption = (
        f"routing {policy.mode}: {decision.compressed_tiles}/{n} tiles at 1/16, "
        f"{decision.visual_tokens} visual tokens (all 1/4: {n * cfg.tokens_per_tile})"
    )
    if question is not None:
        caption += f' for "{question}"'
    ImageDraw.Draw(canvas).text(
        (4, T * rows + 6), caption, fill=(0, 0, 0), font=ImageFont.load_default(size=14)
    )
    canvas.save(out_png)
    return decision
