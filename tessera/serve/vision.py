"""The vision half of serving: image bytes → tiles → ViT → router → projector → features, with an LRU cache.

Used in two places: inside the language process (coupled topology) and inside each vision server (DvD).
Work is split in two phases so a server can batch the tiles of concurrent requests into one ViT call:
`prepare(job)` decodes and tiles (or finds the features in the cache), `run(prepared)` encodes many jobs'
tiles together and routes each request on its own tiles.

Cache: keyed by a hash of the image file's bytes, the routing settings and the tiling limit, so a second
question about the same image skips decoding, tiling and the ViT. A request with a visual-token budget is
routed as a whole (the budget spans its images), so it is cached as a whole, keyed by all its images' hashes.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

import torch

from tessera.geometry import tokens_of_images
from tessera.image import ImageError, ImageProcessor, image_hash
from tessera.routing import RoutingError, RoutingPolicy, decide, router_of
from tessera.serve.protocol import EncodedImage, ImageMeta

VISION_MODULES = (
    "vision_model",
    "mlp1",
    "mlp2",
    "pooling_before_gating",
    "gating",
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


@dataclass
class PreparedJob:
    """One request after decoding/tiling; `cached` is set when the whole result came from the cache."""

    keys: list[str]
    routing: RoutingPolicy
    pixel_values: torch.Tensor | None = None  # [ΣN, 3, S, S]
    tiles_per_image: list[int] = field(default_factory=list)
    grids: list[tuple[int, int]] = field(default_factory=list)
    cached: list[EncodedImage] | None = None

    @property
    def num_tiles(self) -> int:
        return sum(self.tiles_per_image)


class FeatureCache:
    """A thread-safe LRU of EncodedImage lists by key, bounded by entries and by bytes of features."""

    def __init__(self, capacity: int, max_bytes: int = 1 << 30):
        self.capacity, self.max_bytes = capacity, max_bytes
        self._data: collections.OrderedDict[str, list[EncodedImage]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.bytes = 0

    def get(self, key: str) -> list[EncodedImage] | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    @staticmethod
    def _size(value: list[EncodedImage]) -> int:
        return sum(e.features.numel() * e.features.element_size() for e in value)

    def put(self, key: str, value: list[EncodedImage]) -> None:
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
        it is ~3× faster). It casts the model's vision tower, projectors and router *in place*; the language
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
        self.has_router = (
            bool(self.config.flash.enabled) and getattr(model, "router", None) is not None
        )

    # ---- phase 1: decode + tile ---------------------------------------------------------------------------

    def cache_key(self, images: list[bytes], routing: RoutingPolicy, max_tiles: int) -> list[str]:
        hashes = [image_hash(b) for b in images]
        suffix = f"|{routing.key()}|{max_tiles}"
        if routing.budget is not None:
            return ["+".join(hashes) + suffix]
        return [h + suffix for h in hashes]

    def prepare(
        self, images: list[bytes], routing: RoutingPolicy, max_tiles: int | None = None
    ) -> PreparedJob:
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
        keys = self.cache_key(images, routing, max_tiles)
        hits = [self.cache.get(k) for k in keys]
        if all(h is not None for h in hits):
            out = [
                EncodedImage(
                    ImageMeta(e.meta.tokens_per_tile, e.meta.grid, e.meta.full_tokens, True),
                    e.features,
                )
                for h in hits
                for e in h
            ]
            return PreparedJob(keys, routing, cached=out)
        processor = ImageProcessor(
            cfg.tile_size, cfg.min_tiles, max_tiles, cfg.use_thumbnail, self.limits.max_pixels
        )
        try:
            batch = processor(list(images))
        except ImageError as e:
            raise VisionInputError(str(e)) from None
        if sum(batch.tiles_per_image) > self.limits.max_tiles_per_request:
            raise VisionInputError(
                f"the request's images need {sum(batch.tiles_per_image)} tiles, more than the "
                f"{self.limits.max_tiles_per_request} allowed; send fewer or smaller images, or lower max_tiles"
            )
        return PreparedJob(
            keys,
            routing,
            batch.pixel_values,
            batch.tiles_per_image,
            [tuple(g) for g in batch.grids],
        )

    # ---- phase 2: encode many jobs' tiles together -------------------------------------------------------

    @torch.inference_mode()
    def run(self, jobs: list[PreparedJob]) -> list[list[EncodedImage] | Exception]:
        """Encode every uncached job in one ViT batch; route and project per job. Errors are per job."""
        results: list[list[EncodedImage] | Exception | None] = [j.cached for j in jobs]
        todo = [i for i, j in enumerate(jobs) if j.cached is None]
        if not todo:
            return results  # type: ignore[return-value]
        model, cfg = self.model, self.config
        pixels = torch.cat([jobs[i].pixel_values for i in todo]).to(
            self.device, self.dtype
        )  # [ΣN, 3, S, S]
        grid = model.vision_tokens(pixels)  # [ΣN, h, w, Cv]
        n, h, w, cv = grid.shape
        p = None
        if any(jobs[i].routing.needs_router for i in todo):
            if cfg.select_layer not in (-1, cfg.vision.num_layers - 1):
                raise RoutingError(
                    f"routing reads the last ViT layer, but select_layer is {cfg.select_layer}"
                )
            p = router_of(model).p_compress(grid.reshape(n, h * w, cv)).float().cpu()  # [ΣN]
        compress, start, decided = [], 0, {}
        for i in todo:
            job = jobs[i]
            k = job.num_tiles
            policy = job.routing
            try:
                d = decide(
                    policy,
                    job.tiles_per_image,
                    cfg.tokens_per_tile,
                    cfg.compressed_tokens_per_tile,
                    p[start : start + k] if p is not None and policy.needs_router else None,
                    cfg.flash.relative_threshold,
                    cfg.flash.absolute_threshold,
                )
                decided[i] = d
                compress.append(d.compress)
            except RoutingError as e:
                results[i] = VisionInputError(
                    str(e), param="visual_token_budget" if job.routing.budget else "routing"
                )
                compress.append(
                    torch.zeros(k, dtype=torch.bool)
                )  # projected and dropped: keeps the batch aligned
            start += k
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
        if len(job.keys) == 1 and len(encoded) > 1:
            self.cache.put(job.keys[0], encoded)
        else:
            for key, e in zip(job.keys, encoded):
                self.cache.put(key, [e])

    def encode(
        self, images: list[bytes], routing: RoutingPolicy, max_tiles: int | None = None
    ) -> list[EncodedImage]:
        """Both phases for one request (the coupled topology calls this on the engine thread)."""
        result = self.run([self.prepare(images, routing, max_tiles)])[0]
        if isinstance(result, Exception):
            raise result
        return result


def vision_only(model, device, dtype: torch.dtype | None):
    """The model without its language model's weights, the vision side on `device`: what a vision worker
    and a server whose language model runs elsewhere (`--language-backend vllm`) need.

    Loaded memory-mapped on the CPU, the language model's tensors are replaced by meta tensors before
    anything is cast or moved, so they never occupy memory here (on a GPU or in RAM)."""
    model.language_model.to_empty(device="meta")
    for name in ("vision_model", "mlp1", "mlp2", "router"):
        part = getattr(model, name, None)
        if part is not None:
            part.to(device=device, dtype=dtype)
    return model
