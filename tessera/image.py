"""Images in, InternVL tiles out: decoding with limits, dynamic tiling and ImageNet normalisation.

Semantics are those of the official InternVL `load_image` / `dynamic_preprocess` / `build_transform`, i.e.
what the model was trained with:
- `.convert("RGB")`: palette images are expanded and alpha is *dropped*, not composited on white
  (transformers' processors composite RGBA on white; for opaque images the two agree);
- the grid (cols, rows) from `tessera.geometry.tile_grid`;
- a bicubic resize of the whole image to (S·cols, S·rows), crops in row-major order, and a thumbnail (the
  whole image resized to S×S) appended when the grid has more than one tile;
- (x / 255 − mean) / std per channel in float32 with the ImageNet mean and std.
EXIF orientation is not applied (the official loader does not either). For opaque input the pixels are
bit-identical to transformers' `GotOcr2ImageProcessor(Pil)` with InternVL's settings (tests/test_image.py).
Speed comes from decoding once and converting uint8 → float32 once, straight into one preallocated
[ΣN, 3, S, S] tensor (no intermediate per-tile images or arrays), and optional threads; `fast=True`
additionally decodes large JPEGs at reduced scale and resizes with Pillow's `reducing_gap`, which changes
pixels slightly (measured in docs/BENCHMARKS.md).

Untrusted input is safe to pass: the declared size is checked against `max_pixels` from the header,
before any pixel is decoded, and every failure is an `ImageError` (a ValueError) naming the input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import struct
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tessera.geometry import tile_grid

if TYPE_CHECKING:
    from tessera.config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = (
    64_000_000  # 64 Mpx: 48 Mpx phone photos pass; Pillow's own warning starts at 89.5 Mpx
)
FAST_REDUCING_GAP = (
    3.0  # Pillow: box-reduce by an integer factor first while the remaining scale is >= 3
)

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike, Image.Image, BinaryIO]

# `warnings.catch_warnings` swaps process-global state; the lock keeps our own threads from interleaving
# their swaps. It is held only while Pillow parses a header (microseconds), never while decoding.
_OPEN_LOCK = threading.Lock()
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """An input that is not a usable image: empty, unrecognised, truncated, zero-size or over the pixel limit."""


# ---- hashing ------------------------------------------------------------------------------------


def image_hash(data: bytes | bytearray | memoryview | Image.Image) -> str:
    """Content key for a feature cache: 32 hex characters of BLAKE2b-128.

    Encoded bytes are hashed as they are, without decoding, so a cache hit also skips the decode; the same
    picture re-encoded differently misses, which only costs a recomputation. A PIL image is hashed over its
    size and its RGB pixels (after the same `.convert("RGB")` as preprocessing), in a separate domain, so a
    bytes key and a pixels key never collide. Preprocessing settings (tile size, tile limits, routing) are
    not part of the key: a cache serving several settings must add them itself.
    """
    if isinstance(data, Image.Image):
        rgb = data if data.mode == "RGB" else data.convert("RGB")
        h = hashlib.blake2b(digest_size=16, person=b"tessera-pixels")
        h.update(struct.pack("<II", *rgb.size))
        h.update(rgb.tobytes())
        return h.hexdigest()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return hashlib.blake2b(bytes(data), digest_size=16, person=b"tessera-bytes").hexdigest()
    raise TypeError(f"image_hash takes bytes or a PIL image, got {type(data).__name__}")


# ---- decoding -----------------------------------------------------------------------------------


def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `source` (bytes, a path, a `data:` URL, a binary file object or a PIL image) to an RGB image.

    Raises ImageError for empty input, unknown formats, truncated data, zero-size images and images whose
    header declares more than `max_pixels` pixels. None leaves only Pillow's decompression-bomb limit
    (`PIL.Image.MAX_IMAGE_PIXELS`, 89.5 Mpx, whose warning is turned into an error); a `max_pixels` above it
    replaces it, up to Pillow's hard limit of twice that.
    """
    img, what = _open(source, max_pixels)
    return _decode(img, what)


def _open(source: ImageSource, max_pixels: int | None) -> tuple[Image.Image, str]:
    """Parse the header only (pixels stay undecoded) and enforce the size limits. Returns (image, description)."""
    if isinstance(source, Image.Image):
        what = f"PIL image ({source.mode} {source.size[0]}x{source.size[1]})"
        _check_size(source.size, max_pixels, what)
        return source, what
    fp, what, head = _as_file(source)
    # Pillow warns above Image.MAX_IMAGE_PIXELS (89.5 Mpx) and raises above twice that. The warning becomes an
    # error unless the caller explicitly allowed more pixels than Pillow's threshold; then our check decides.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    lenient = max_pixels is not None and pillow_limit is not None and max_pixels > pillow_limit
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore" if lenient else "error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            f"{what}: refused as a possible decompression bomb by Pillow: {e}"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{what}: not a recognised image{_explain_unidentified(head)}") from None
    except OSError as e:
        raise ImageError(f"{what}: cannot read: {e}") from None
    _check_size(img.size, max_pixels, what)
    return img, what


def _as_file(source: ImageSource) -> tuple[BinaryIO | str, str, bytes]:
    """(something Image.open accepts, a description for messages, the first bytes when known)."""
    if isinstance(source, str) and source.startswith("data:"):
        source = _data_url_bytes(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("image bytes are empty (0 bytes)")
        return io.BytesIO(data), f"image ({len(data)} bytes)", data[:32]
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ImageError(f"{path!r}: no such file")
        if os.path.getsize(path) == 0:
            raise ImageError(f"{path!r}: the file is empty (0 bytes)")
        with open(path, "rb") as f:
            head = f.read(32)
        return path, repr(path), head
    if hasattr(source, "read"):
        return source, "image file object", b""
    raise TypeError(
        f"expected bytes, a path, a data: URL, a binary file or a PIL image, got {type(source).__name__}"
    )


def _data_url_bytes(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageError(
            f"data URL must look like 'data:image/png;base64,<data>', got {url[:40]!r}..."
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data URL: invalid base64 payload ({e})") from None


def _explain_unidentified(head: bytes) -> str:
    """A more helpful reason than Pillow's 'cannot identify image file' where the header tells one."""
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        if width == 0 or height == 0:
            return f": the PNG header declares a zero-size image ({width}x{height})"
        return f": a PNG header ({width}x{height}) followed by invalid or missing data"
    if head:
        return f" (unknown or corrupt format; starts with {head[:8]!r})"
    return " (unknown or corrupt format)"


def _check_size(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{what}: zero-size image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{what}: {width}x{height} = {width * height / 1e6:.1f} Mpx exceeds max_pixels = {max_pixels / 1e6:.1f} Mpx "
            "(decompression-bomb guard, checked from the header before decoding); pass a larger max_pixels to accept it"
        )


def _decode(img: Image.Image, what: str) -> Image.Image:
    """Decode the pixels and convert to RGB the way the official code does (`.convert("RGB")`)."""
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what}: refused as a possible decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as e:
        raise ImageError(
            f"{what}: corrupt or truncated {img.format or ''} data ({img.size[0]}x{img.size[1]}): {e}"
        ) from None
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{what}: cannot convert mode {img.mode} to RGB: {e}") from None


# ---- tiling and normalisation -------------------------------------------------------------------


def _resize(img: Image.Image, size: tuple[int, int], fast: bool) -> Image.Image:
    if img.size == size:
        return img
    return img.resize(
        size, Image.Resampling.BICUBIC, reducing_gap=FAST_REDUCING_GAP if fast else None
    )


def _write_tiles(canvas: Image.Image, out: np.ndarray, cols: int, rows: int) -> None:
    """Crop an RGB canvas of (S·cols)×(S·rows) pixels row-major into out [cols·rows, 3, S, S] float32, normalised.

    Per channel plane and tile: one strided copy does crop + HWC→CHW + uint8→float32 at once, then the
    normalisation runs in place while the tile is still in cache, with exactly the reference's float32
    operations (÷255, −mean, ÷std), so values are bit-identical to torchvision's ToTensor + Normalize.
    NumPy rather than torch: single-threaded by construction, so worker threads never fight torch's
    intra-op thread pool (which a server sizes for the ViT).
    """
    size = out.shape[-1]
    for ch, plane in enumerate(canvas.split()):
        src = np.asarray(plane).reshape(
            rows, size, cols, size
        )  # [rows·S, cols·S] → [rows, S, cols, S] uint8
        mean, std = IMAGENET_MEAN[ch], IMAGENET_STD[ch]
        for k in range(rows * cols):
            dst = out[k, ch]  # [S, S] float32, contiguous
            np.copyto(
                dst, src[k // cols, :, k % cols], casting="unsafe"
            )  # tile (row k // cols, col k % cols)
            np.divide(dst, 255.0, out=dst)
            np.subtract(dst, mean, out=dst)
            np.divide(dst, std, out=dst)


@dataclass
class BatchedPixels:
    """Tiles of a batch of images, image after image, each image's grid tiles row-major then its thumbnail."""

    pixel_values: torch.Tensor  # [ΣN, 3, S, S] float32
    tiles_per_image: list[int]
    grids: list[tuple[int, int]]  # (cols, rows) per image
    image_sizes: list[tuple[int, int]]  # (width, height) of each input image

    def split(self) -> list[torch.Tensor]:
        """Per-image views [N_i, 3, S, S] of `pixel_values`."""
        return list(torch.split(self.pixel_values, self.tiles_per_image))


@dataclass
class ImageProcessor:
    """Preprocess many images into one tile tensor. `num_threads > 1` decodes and resizes images in parallel
    (Pillow releases the GIL), also overlapping one image's grid resize with its thumbnail resize."""

    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    fast: bool = False
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.tile_size <= 0:
            raise ValueError(f"tile_size must be positive, got {self.tile_size}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(
                f"need 1 <= min_tiles ({self.min_tiles}) <= max_tiles ({self.max_tiles})"
            )
        if self.max_pixels is not None and self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive or None, got {self.max_pixels}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")

    @classmethod
    def from_config(cls, config: ModelConfig, **overrides) -> ImageProcessor:
        """The processor a model expects: its tile size, tile limits and thumbnail setting."""
        settings = dict(
            tile_size=config.tile_size,
            min_tiles=config.min_tiles,
            max_tiles=config.max_tiles,
            use_thumbnail=config.use_thumbnail,
        )
        settings.update(overrides)
        return cls(**settings)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        return tile_grid(width, height, self.tile_size, self.min_tiles, self.max_tiles)

    def __call__(self, images: ImageSource | Sequence[ImageSource]) -> BatchedPixels:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("no images given")
        size = self.tile_size
        label = (lambda i, e: f"image {i}: {e}") if len(items) > 1 else (lambda i, e: str(e))
        opened: list[
            tuple[Image.Image, str]
        ] = []  # headers only: sizes fix every grid and the output shape
        owned = [not isinstance(source, Image.Image) for source in items]  # ours to draft and close
        try:
            for i, source in enumerate(items):
                try:
                    opened.append(_open(source, self.max_pixels))
                except ImageError as e:
                    raise ImageError(label(i, e)) from None
            sizes = [img.size for img, _ in opened]
            grids = [self.grid(w, h) for w, h in sizes]
            counts = [c * r + (1 if self.use_thumbnail and c * r > 1 else 0) for c, r in grids]
            starts = np.cumsum([0] + counts).tolist()
            out = torch.empty(starts[-1], 3, size, size, dtype=torch.float32)
            out_np = out.numpy()  # the same memory; the workers write through NumPy

            def decode(i: int) -> Image.Image:
                img, what = opened[i]
                cols, rows = grids[i]
                if self.fast and owned[i] and img.format == "JPEG":
                    img.draft(
                        "RGB", (size * cols, size * rows)
                    )  # DCT-domain downscale, never below the canvas
                try:
                    return _decode(img, what)
                except ImageError as e:
                    raise ImageError(label(i, e)) from None

            def grid_job(i: int, img: Image.Image) -> None:
                cols, rows = grids[i]
                canvas = _resize(img, (size * cols, size * rows), self.fast)
                _write_tiles(canvas, out_np[starts[i] : starts[i] + cols * rows], cols, rows)

            def thumbnail_job(i: int, img: Image.Image) -> None:
                _write_tiles(
                    _resize(img, (size, size), self.fast),
                    out_np[starts[i + 1] - 1 : starts[i + 1]],
                    1,
                    1,
                )

            def run(job: tuple[Callable[[int, Image.Image], None], int, Image.Image]) -> None:
                job[0](job[1], job[2])

            with ThreadPoolExecutor(self.num_threads) as pool:
                mapper = pool.map if self.num_threads > 1 else map
                # chunks of num_threads images bound how many decoded images are held at once
                for first in range(0, len(items), self.num_threads):
                    chunk = range(first, min(first + self.num_threads, len(items)))
                    decoded = list(mapper(decode, chunk))
                    jobs = [(grid_job, i, img) for i, img in zip(chunk, decoded)]
                    jobs += [
                        (thumbnail_job, i, img)
                        for i, img in zip(chunk, decoded)
                        if counts[i] > grids[i][0] * grids[i][1]
                    ]
                    list(mapper(run, jobs))
                    del decoded, jobs
                    for i in chunk:  # free this chunk's pixels and file handles now, not at the end
                        _close(opened[i][0], owned[i])
                        owned[i] = False
            return BatchedPixels(out, counts, grids, sizes)
        finally:  # after an error: release whatever is still open
            for (img, _), mine in zip(opened, owned):
                _close(img, mine)


def _close(img: Image.Image, owned: bool) -> None:
    """Release the file handle and pixels of an image this module opened (never a caller's image)."""
    if owned:
        img.close()


def preprocess(
    image: ImageSource,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    fast: bool = False,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image → (pixel_values float32 [N, 3, S, S], (cols, rows)); N = cols·rows (+1 thumbnail if > 1 tile)."""
    batch = ImageProcessor(tile_size, min_tiles, max_tiles, use_thumbnail, max_pixels, fast)(
        [image]
    )
    return batch.pixel_values, batch.grids[0]
