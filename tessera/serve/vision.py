"""The vision half of serving: image bytes → tiles → ViT → router → projector → features, with two LRU caches.

Used in two places: inside the language process (coupled topology) and inside each vision server (DvD).
Work is split in two phases so a server can batch the tiles of concurrent requests into one ViT call:
`prepare(job)` decodes and tiles (or finds the features, or the ViT tokens, in a cache), `run(prepared)`
encodes many jobs' new tiles together and routes each request on its own tiles
(`tessera.routing.route_patch_tokens`, the decision every path makes once the ViT has run).

Caches, both keyed by a hash of the image file's bytes and the tiling limit:
- features (`cache`): also keyed by the routing settings, so a second request about the same image with the
  same routing skips everything. A request with a visual-token budget is routed as a whole (the budget spans
  its images), so it is cached as a whole, keyed by all its images' hashes. Question-routed requests
  (`RoutingPolicy.needs_question`) are never feature-cached: their decision depends on the question;
- ViT tokens (`tokens`): each image's tiles' ViT output (the grid the projectors read, which is the
  last layer the routers read), so a second question about an image skips decoding, tiling and the ViT and
  runs only the router and the chosen projector per tile.
A question-routed request carries its question's embedding [Dl] (computed on the language side, which has the
LLM's token embeddings: a vision worker holds no language weights); it is used for every image of the request.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

import torch

from tessera.geometry import tokens_of_images
from tessera.image import ImageError, ImageProcessor, image_hash
from tessera.routing import RoutingError, RoutingPolicy, route_patch_tokens
from tessera.serve.protocol import EncodedImage, ImageMeta

VISION_MODULES = (
    "vision_model",
    "mlp1",
    "mlp2",
    "pooling_before_gating",
    "gating",
    "question_router",
)  # everything before the LLM


# a vision server's batching, by default: a ViT batch closes at this many tiles, or when its oldest request has
# waited this long (every place that starts or configures one reads these)
MAX_BATCH_TILES = 32
MAX_WAIT_MS = 5.0


class VisionUnavailable(RuntimeError):
    """No vision worker can take the request right now (HTTP 503)."""


class VisionInputError(ValueError):
    """A request the vision side refuses: its status and parameter go back to the client unchanged."""

    def __init__(self, message: str, status: int = 400, param: str | None = "messages"):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class VisionLimits:
    max_pixels: int = 40_000_000  # per decoded image (width × height)
    max_tiles_per_request: int = 64  # tiles (thumbnails included) over all images of a request
    cache_entries: int = 256
    cache_bytes: int = 1 << 30  # features held by the LRU cache
    token_cache_entries: int = 64  # images whose ViT tokens are kept (0: no token cache)
    token_cache_bytes: int = 1 << 30  # ViT tokens held, on the vision device


@dataclass
class ViTTokens:
    """One image's tiles after the ViT: what the token cache holds."""

    grid: torch.Tensor  # [N, h, w, Cv] select_layer (= last) layer tokens of the image's N tiles
    tiling: tuple[int, int]  # (cols, rows) of the tiling, thumbnail not counted

    @property
    def num_tiles(self) -> int:
        return self.grid.shape[0]


@dataclass
class PreparedJob:
    """One request after decoding/tiling; `cached` is set when the whole result came from the feature cache.

    Per image (in request order) either its cached ViT tokens (`tokens[i]`) or its tiles among
    `pixel_values` (the images whose `tokens[i]` is None, in order)."""

    keys: list[str]  # feature-cache keys ([] for question-routed requests: not feature-cached)
    routing: RoutingPolicy
    pixel_values: torch.Tensor | None = None  # [ΣN_new, 3, S, S] images not in the token cache
    tiles_per_image: list[int] = field(default_factory=list)
    grids: list[tuple[int, int]] = field(default_factory=list)
    cached: list[EncodedImage] | None = None
    token_keys: list[str] = field(default_factory=list)  # per image: its token-cache key
    tokens: list[ViTTokens | None] = field(default_factory=list)  # per image: cached, or None
    question: torch.Tensor | None = None  # [Dl] float32: the question's embedding

    @property
    def num_tiles(self) -> int:
        return sum(self.tiles_per_image)

    @property
    def new_tiles(self) -> int:
        """Tiles that go through the ViT (not found in the token cache)."""
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]


def _features_bytes(value: list[EncodedImage]) -> int:
    return sum(e.features.numel() * e.features.element_size() for e in value)


def _tokens_bytes(value: ViTTokens) -> int:
    return value.grid.numel() * value.grid.element_size()


class FeatureCache:
    """A thread-safe LRU by key, bounded by entries and by bytes (`sizeof` of a value; by default the
    bytes of an EncodedImage list's features). The vision side's feature cache, and its ViT-token cache."""

    def __init__(self, capacity: int, max_bytes: int = 1 << 30, sizeof=_features_bytes):
        self.capacity, self.max_bytes = capacity, max_bytes
        self._sizeof = sizeof
        self._data: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.bytes = 0

    def get(self, key: str):
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def _size(self, value) -> int:
        return self._sizeof(value)

    def put(self, key: str, value) -> None:
        if self.capacity <= 0 or self._size(value) > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= self._size(old)
            self._data[key] = value
            self.bytes += self._size(value)
            while len(self._data) > self.capacity or self.bytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self.bytes -= self._size(evicted)

    def __len__(self) -> int:
        return len(self._data)


class VisionEncoder:
    """Everything between image bytes and projected features for one model."""

    def __init__(self, model, limits: VisionLimits | None = None, dtype: torch.dtype | None = None):
        """dtype: run the vision side in this precision (e.g. torch.bfloat16, as served on GPUs; on CPUs with AMX
        it is ~3× faster). It casts the model's vision tower, projectors and routers *in place*; the language
        model is untouched, and it casts the features it receives to its own dtype."""
        self.model = model.eval()
        if dtype is not None:
            for name in VISION_MODULES:
                if hasattr(model, name):
                    getattr(model, name).to(dtype)
        self.dtype = next(model.vision_model.parameters()).dtype
        # the vision tower's device: with `--language-backend vllm` the language model is not here
        self.device = next(model.vision_model.parameters()).device
        self.config = model.config
        self.limits = limits or VisionLimits()
        self.cache = FeatureCache(self.limits.cache_entries, self.limits.cache_bytes)
        self.tokens = FeatureCache(
            self.limits.token_cache_entries, self.limits.token_cache_bytes, _tokens_bytes
        )
        self.has_router = (
            bool(self.config.flash.enabled) and getattr(model, "router", None) is not None
        )
        self.has_question_router = (
            self.has_router
            and bool(self.config.flash.question_router)
            and getattr(model, "question_router", None) is not None
        )
        self.vit_tiles = 0  # tiles that went through the ViT (a token-cache hit adds none)

    # ---- phase 1: decode + tile ---------------------------------------------------------------------------

    def cache_key(self, images: list[bytes], routing: RoutingPolicy, max_tiles: int) -> list[str]:
        hashes = [image_hash(b) for b in images]
        suffix = f"|{routing.key()}|{max_tiles}"
        if routing.budget is not None:
            return ["+".join(hashes) + suffix]
        return [h + suffix for h in hashes]

    def _check_question(self, routing: RoutingPolicy, question: torch.Tensor | None) -> None:
        if not routing.needs_question:
            return
        if not self.has_question_router:
            raise VisionInputError(
                f"routing {routing.mode!r} needs a model with a question-aware router "
                "(tessera train question_router); this one has none: use routing 'router' or 'full'",
                param="routing",
            )
        dim = self.config.language.hidden_size
        if question is None:
            raise VisionInputError(
                f"routing {routing.mode!r} needs the question's embedding with the images",
                param="routing",
            )
        if question.shape != (dim,) or not bool(torch.isfinite(question).all()):
            raise VisionInputError(
                f"the question embedding must be {dim} finite numbers (the language hidden size), "
                f"got shape {tuple(question.shape)}",
                param="routing",
            )

    def prepare(
        self,
        images: list[bytes],
        routing: RoutingPolicy,
        max_tiles: int | None = None,
        question: torch.Tensor | None = None,
    ) -> PreparedJob:
        """question: the question's embedding [Dl] float32, needed by question routing (ignored otherwise)."""
        cfg = self.config
        if max_tiles is None:
            max_tiles = cfg.max_tiles
        if not cfg.min_tiles <= max_tiles <= cfg.max_tiles:
            raise VisionInputError(
                f"max_tiles {max_tiles} outside [{cfg.min_tiles}, {cfg.max_tiles}] for this model",
                param="max_tiles",
            )
        if routing.mode != "full" and not self.has_router:
            raise VisionInputError(
                f"routing {routing.mode!r} needs a Flash model (router + mlp2); this one is plain",
                param="routing",
            )
        if routing.budget is not None and not self.has_router:
            raise VisionInputError(
                "visual_token_budget needs a Flash model (router + mlp2); this one is plain",
                param="visual_token_budget",
            )
        self._check_question(routing, question)
        if not routing.needs_question:
            question = None
        # a question-routed decision depends on the question: never feature-cached (its ViT tokens are)
        keys = [] if routing.needs_question else self.cache_key(images, routing, max_tiles)
        hits = [self.cache.get(k) for k in keys]
        if keys and all(h is not None for h in hits):
            out = [
                EncodedImage(
                    ImageMeta(e.meta.tokens_per_tile, e.meta.grid, e.meta.full_tokens, True),
                    e.features,
                )
                for h in hits
                for e in h
            ]
            return PreparedJob(keys, routing, cached=out)
        token_keys = [f"{image_hash(b)}|{max_tiles}" for b in images]
        tokens = [self.tokens.get(k) for k in token_keys]
        todo = [b for b, t in zip(images, tokens) if t is None]
        batch = None
        if todo:
            processor = ImageProcessor(
                cfg.tile_size, cfg.min_tiles, max_tiles, cfg.use_thumbnail, self.limits.max_pixels
            )
            try:
                batch = processor(todo)
            except ImageError as e:
                raise VisionInputError(str(e)) from None
        new = iter(zip(batch.tiles_per_image, batch.grids)) if batch is not None else iter(())
        tiles_per_image, grids = [], []
        for t in tokens:
            n, g = (t.num_tiles, t.tiling) if t is not None else next(new)
            tiles_per_image.append(n)
            grids.append(tuple(g))
        if sum(tiles_per_image) > self.limits.max_tiles_per_request:
            raise VisionInputError(
                f"the request's images need {sum(tiles_per_image)} tiles, more than the "
                f"{self.limits.max_tiles_per_request} allowed; send fewer or smaller images, or lower max_tiles"
            )
        return PreparedJob(
            keys,
            routing,
            batch.pixel_values if batch is not None else None,
            tiles_per_image,
            grids,
            token_keys=token_keys,
            tokens=tokens,
            question=question,
        )

    # ---- phase 2: encode many jobs' tiles together -------------------------------------------------------

    def _vit(self, jobs: list[PreparedJob]) -> list[torch.Tensor]:
        """Each job's ViT grid [ΣN, h, w, Cv]: its cached images' tokens and, from one ViT call over every
        job's new tiles, the rest (which join the token cache)."""
        fresh = [j.pixel_values for j in jobs if j.pixel_values is not None]
        grid = None
        if fresh:
            pixels = torch.cat(fresh).to(self.device, self.dtype)  # [ΣN_new, 3, S, S]
            grid = self.model.vision_tokens(pixels)  # [ΣN_new, h, w, Cv]
            self.vit_tiles += grid.shape[0]
        out, row = [], 0
        for job in jobs:
            parts = []
            for key, cached, n, tiling in zip(
                job.token_keys, job.tokens, job.tiles_per_image, job.grids
            ):
                if cached is None:
                    cached = ViTTokens(grid[row : row + n].clone(), tiling)  # [n, h, w, Cv]
                    self.tokens.put(key, cached)
                    row += n
                parts.append(cached.grid)
            out.append(torch.cat(parts))  # [ΣN, h, w, Cv]
        return out

    @torch.inference_mode()
    def run(self, jobs: list[PreparedJob]) -> list[list[EncodedImage] | Exception]:
        """Encode every uncached job's new tiles in one ViT batch; route per job, project in one batch.
        Errors are per job."""
        results: list[list[EncodedImage] | Exception | None] = [j.cached for j in jobs]
        todo = [i for i, j in enumerate(jobs) if j.cached is None]
        if not todo:
            return results  # type: ignore[return-value]
        model, cfg = self.model, self.config
        routed = any(jobs[i].routing.needs_router or jobs[i].routing.needs_question for i in todo)
        if routed and cfg.select_layer not in (-1, cfg.vision.num_layers - 1):
            raise RoutingError(
                f"routing reads the last ViT layer, but select_layer is {cfg.select_layer}"
            )
        grids = self._vit([jobs[i] for i in todo])
        compress, decided = [], {}
        for i, grid in zip(todo, grids):
            job = jobs[i]
            n, h, w, cv = grid.shape
            questions = None if job.question is None else job.question.expand(len(job.grids), -1)
            try:
                d = route_patch_tokens(
                    model, grid.reshape(n, h * w, cv), job.tiles_per_image, job.routing, questions
                )  # questions [I, Dl]
                decided[i] = d
                compress.append(d.compress)
            except RoutingError as e:
                results[i] = VisionInputError(
                    str(e), param="visual_token_budget" if job.routing.budget else "routing"
                )
                compress.append(
                    torch.zeros(n, dtype=torch.bool)
                )  # projected and dropped: keeps the batch aligned
        grid = torch.cat(grids)  # [ΣN, h, w, Cv]
        feats, per_tile = model.project(grid, torch.cat(compress).to(grid.device))  # [ΣT, D], [ΣN]
        row, tile = 0, 0
        for i in todo:
            job = jobs[i]
            encoded = []
            for count, g in zip(job.tiles_per_image, job.grids):
                tokens = per_tile[tile : tile + count]
                rows = sum(tokens)
                meta = ImageMeta(list(tokens), g, tokens_of_images([count], cfg.tokens_per_tile)[0])
                encoded.append(EncodedImage(meta, feats[row : row + rows].clone()))  # [rows, D]
                row += rows
                tile += count
            if i in decided:
                results[i] = encoded
                self._store(job, encoded)
        return results  # type: ignore[return-value]

    def _store(self, job: PreparedJob, encoded: list[EncodedImage]) -> None:
        if not job.keys:  # question-routed: not feature-cached
            return
        if len(job.keys) == 1 and len(encoded) > 1:
            self.cache.put(job.keys[0], encoded)
        else:
            for key, e in zip(job.keys, encoded):
                self.cache.put(key, [e])

    def encode(
        self,
        images: list[bytes],
        routing: RoutingPolicy,
        max_tiles: int | None = None,
        question: torch.Tensor | None = None,
    ) -> list[EncodedImage]:
        """Both phases for one request (the coupled topology calls this on the engine thread)."""
        result = self.run([self.prepare(images, routing, max_tiles, question)])[0]
        if isinstance(result, Exception):
            raise result
        return result


def vision_only(model, device, dtype: torch.dtype | None, keep_embeddings: bool = False):
    """The model without its language model's weights, the vision side on `device`: what a vision worker
    and a server whose language model runs elsewhere (`--language-backend vllm`) need.

    Loaded memory-mapped on the CPU, the language model's tensors are replaced by meta tensors before
    anything is cast or moved, so they never occupy memory here (on a GPU or in RAM). `keep_embeddings`
    keeps the token embedding table (memory-mapped, on the CPU): what a language side that hands the LLM to
    vLLM still needs to embed questions for question routing (tessera.routing.question_vectors)."""
    embed = model.language_model.embed_tokens
    kept = embed.weight.data if keep_embeddings else None
    model.language_model.to_empty(device="meta")
    if kept is not None:
        embed.weight = torch.nn.Parameter(kept, requires_grad=False)
    for name in ("vision_model", "mlp1", "mlp2", "router", "question_router"):
        part = getattr(model, name, None)
        if part is not None:
            part.to(device=device, dtype=dtype)
    return model
