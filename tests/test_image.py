"""tessera.image: decoding limits and errors, tiling, thumbnail, normalisation, and pixel equality with
transformers' InternVL image processor."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.config import tiny_config
from tessera.geometry import num_tiles, tokens_per_image
from tessera.image import (
    DEFAULT_MAX_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    ImageProcessor,
    image_hash,
    load_image,
    preprocess,
)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random colour field with grain (photo-like, compresses like one)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    field = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16
    )
    grain = rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG that declares width×height but carries almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def reference_tiles(
    img: Image.Image, cols: int, rows: int, size: int, thumbnail: bool = True
) -> torch.Tensor:
    """The official recipe written plainly: resize, crop row-major, thumbnail, ToTensor + Normalize."""
    canvas = img.resize((size * cols, size * rows), Image.Resampling.BICUBIC)
    tiles = [
        canvas.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
        for r in range(rows)
        for c in range(cols)
    ]
    if thumbnail and len(tiles) > 1:
        tiles.append(img.resize((size, size), Image.Resampling.BICUBIC))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return torch.stack(
        [
            (torch.from_numpy(np.array(t)).permute(2, 0, 1).float().div(255) - mean) / std
            for t in tiles
        ]
    )


# ---- bad inputs ---------------------------------------------------------------------------------


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, this is not an image at all", "not a recognised image"),
        (b"\x89PNG\r\n\x1a\n", "not a recognised image"),
        (png_header_only(0, 10), "zero-size image \\(0x10\\)"),
        (png_header_only(10, 0), "zero-size image \\(10x0\\)"),
        (
            png_header_only(9000, 8000),
            "9000x8000 = 72.0 Mpx exceeds max_pixels = 64.0 Mpx",
        ),  # our limit
        (
            png_header_only(10000, 9500),
            "decompression bomb",
        ),  # Pillow's warning (> 89.5 Mpx), turned into an error
        (png_header_only(100000, 100000), "decompression bomb"),  # Pillow's error (> 179 Mpx)
    ],
)
def test_bad_bytes_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)
    with pytest.raises(ImageError, match=message):
        preprocess(data)


def test_size_limit_is_checked_before_decoding():
    # 72 Mpx declared, ~100 bytes of data: decoding would fail as truncated; the limit must speak first
    with pytest.raises(ImageError, match="before decoding"):
        load_image(png_header_only(9000, 8000))
    # and with the limit lifted the same bytes reach the decoder, which reports the truncation
    with pytest.raises(ImageError, match="truncated"):
        load_image(png_header_only(9000, 8000), max_pixels=None)
    assert DEFAULT_MAX_PIXELS == 64_000_000


def test_pixel_limit_above_pillows_replaces_pillows_warning():
    # 95 Mpx: over Pillow's warning threshold (89.5 Mpx), under its hard limit (179 Mpx)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(png_header_only(10000, 9500), max_pixels=None)
    with pytest.raises(
        ImageError, match="truncated"
    ):  # explicitly allowed: the bytes reach the decoder
        load_image(png_header_only(10000, 9500), max_pixels=100_000_000)


def test_configurable_pixel_limit():
    data = encode(photo(100, 80))
    assert load_image(data, max_pixels=8000).size == (100, 80)
    with pytest.raises(ImageError, match="100x80 .* exceeds max_pixels"):
        load_image(data, max_pixels=7999)
    with pytest.raises(ImageError, match="exceeds max_pixels"):
        ImageProcessor(max_pixels=7999)([data])
    with pytest.raises(ImageError, match="exceeds max_pixels"):
        load_image(photo(100, 80), max_pixels=7999)  # PIL input is checked too


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_raise_image_error(fmt):
    data = encode(photo(300, 200), fmt)
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        preprocess(data[: len(data) // 2], tile_size=112, max_tiles=6)


def test_zero_size_pil_image():
    with pytest.raises(ImageError, match="zero-size image \\(0x5\\)"):
        preprocess(Image.new("RGB", (0, 5)))


def test_bad_paths_urls_and_types(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.txt").write_text("plain text")
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(str(tmp_path / "notes.txt"))
    with pytest.raises(ImageError, match="invalid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="data URL must look like"):
        load_image("data:image/png,rawbytes")
    with pytest.raises(TypeError, match="got int"):
        load_image(42)


def test_batch_errors_name_the_image():
    good = encode(photo(64, 64))
    with pytest.raises(ImageError, match="^image 1: image bytes are empty"):
        ImageProcessor(tile_size=112)([good, b""])
    with pytest.raises(ImageError, match="^image 2: .*truncated"):
        ImageProcessor(tile_size=112)([good, good, good[:200]])
    with pytest.raises(ValueError, match="no images"):
        ImageProcessor()([])


# ---- decoding and conversion --------------------------------------------------------------------


def test_every_source_kind_gives_the_same_tiles(tmp_path):
    img = photo(250, 130, seed=3)
    data = encode(img)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    sources = [
        data,
        bytearray(data),
        memoryview(data),
        str(path),
        path,
        io.BytesIO(data),
        Image.open(io.BytesIO(data)),
        img,
        "data:image/png;base64," + base64.b64encode(data).decode(),
    ]
    expected, grid = preprocess(img, 112, 1, 6)
    for source in sources:
        got, got_grid = preprocess(source, 112, 1, 6)
        assert got_grid == grid and torch.equal(got, expected), type(source)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16"])
def test_modes_convert_like_the_official_loader(mode):
    """Official InternVL loads with `.convert("RGB")`: alpha is dropped, not composited."""
    rgb = photo(90, 60, seed=1)
    img = rgb.convert(mode) if mode not in ("RGBA", "LA") else rgb.convert(mode[:-1]).convert(mode)
    if mode in ("RGBA", "LA"):
        img.putalpha(
            Image.new("L", img.size, 0)
        )  # fully transparent: the colour underneath must survive
    loaded = load_image(img)
    assert loaded.mode == "RGB" and loaded.size == (90, 60)
    assert np.array_equal(np.asarray(loaded), np.asarray(img.convert("RGB")))


# ---- tiling, thumbnail, normalisation -----------------------------------------------------------


def test_tiles_are_row_major_and_the_thumbnail_comes_last():
    size, cols, rows = 112, 3, 2
    colours = [(40 * k, 255 - 40 * k, (70 * k) % 256) for k in range(cols * rows)]
    canvas = Image.new("RGB", (size * cols, size * rows))
    for k, colour in enumerate(colours):  # tile k at (row k // cols, col k % cols)
        canvas.paste(
            colour,
            ((k % cols) * size, (k // cols) * size, (k % cols + 1) * size, (k // cols + 1) * size),
        )
    pixels, grid = preprocess(canvas, size, 1, 6)
    assert grid == (3, 2) and pixels.shape == (7, 3, size, size) and pixels.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for k, colour in enumerate(colours):
        expected = (torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).div(255) - mean) / std
        assert torch.equal(pixels[k], expected.expand(3, size, size)), k
    assert torch.equal(
        pixels[-1],
        reference_tiles(canvas.resize((size, size), Image.Resampling.BICUBIC), 1, 1, size)[0],
    )


def test_thumbnail_rule_and_shapes():
    one, grid = preprocess(photo(100, 100), 112, 1, 6)
    assert grid == (1, 1) and one.shape == (1, 3, 112, 112)  # a single tile gets no thumbnail
    many, grid = preprocess(photo(400, 100), 112, 1, 6)
    assert grid == (4, 1) and many.shape == (5, 3, 112, 112)
    bare, grid = preprocess(photo(400, 100), 112, 1, 6, use_thumbnail=False)
    assert grid == (4, 1) and torch.equal(bare, many[:4])


def test_normalisation_values():
    img = Image.new("RGB", (50, 50), (0, 128, 255))
    pixels, _ = preprocess(img, 112, 1, 6)
    got = pixels[0, :, 0, 0].double()
    expected = [
        (0 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
        (128 / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
        (255 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2],
    ]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(got[0].item() + 2.1179) < 1e-4 and abs(got[2].item() - 2.64) < 1e-4
    assert (
        pixels[:, 0] == pixels[0, 0, 0, 0]
    ).all()  # a uniform image stays uniform through bicubic


def test_matches_the_plain_reference_bit_for_bit():
    for (w, h), seed in [((500, 260), 0), ((37, 300), 1), ((1000, 1000), 2)]:
        img = photo(w, h, seed)
        pixels, (cols, rows) = preprocess(img, 112, 1, 12)
        assert torch.equal(pixels, reference_tiles(img, cols, rows, 112)), (w, h)


def test_processor_batches_many_images():
    cfg = tiny_config()
    processor = ImageProcessor.from_config(cfg)
    assert (processor.tile_size, processor.max_tiles) == (112, 6)
    images = [
        photo(300, 120, 0),
        encode(photo(90, 90, 1)),
        photo(150, 500, 2),
        encode(photo(640, 480, 3), "JPEG"),
    ]
    batch = processor(images)
    sizes = [(300, 120), (90, 90), (150, 500), (640, 480)]
    assert batch.image_sizes == sizes
    assert batch.tiles_per_image == [num_tiles(w, h, 112, 1, 6) for w, h in sizes]
    assert batch.pixel_values.shape == (sum(batch.tiles_per_image), 3, 112, 112)
    for (w, h), tiles in zip(
        sizes, batch.tiles_per_image
    ):  # the token count the model will produce
        assert tiles * cfg.tokens_per_tile == tokens_per_image(w, h, 112, 14, 0.5, 1, 6)
    for part, image in zip(batch.split(), images):
        alone, _ = preprocess(image, 112, 1, 6)
        assert torch.equal(part, alone)
    threaded = ImageProcessor.from_config(cfg, num_threads=2)(images)
    assert torch.equal(threaded.pixel_values, batch.pixel_values) and threaded.grids == batch.grids


def test_fast_mode_is_close_to_exact():
    """fast=True decodes big JPEGs at reduced DCT scale and resizes with reducing_gap: same grid, close pixels."""
    data = encode(
        photo(1600, 1200, seed=4), "JPEG", quality=90
    )  # canvas 336×224 → JPEG decoded at 1/4 scale
    exact = ImageProcessor(tile_size=112, max_tiles=6)([data])
    fast = ImageProcessor(tile_size=112, max_tiles=6, fast=True)([data])
    assert fast.grids == exact.grids and fast.pixel_values.shape == exact.pixel_values.shape
    diff = (fast.pixel_values - exact.pixel_values).abs()
    assert diff.max() > 0  # the fast path really ran
    assert diff.mean() < 0.03 and diff.max() < 0.5  # normalised units (1/255 ≈ 0.017)


def test_image_hash():
    data = encode(photo(40, 30))
    assert image_hash(data) == image_hash(bytearray(data)) and len(image_hash(data)) == 32
    assert image_hash(data) != image_hash(data + b"\0")
    img = photo(40, 30)
    assert (
        image_hash(img) == image_hash(img.copy()) == image_hash(img.convert("RGBA"))
    )  # pixels, RGB-converted
    assert image_hash(img) != image_hash(data)  # separate domains
    assert image_hash(img) != image_hash(photo(40, 30, seed=9))
    with pytest.raises(TypeError):
        image_hash("a string")


# ---- against transformers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_processor():
    """A factory for transformers' InternVL image processor (GOT-OCR2's, crop_to_patches) as the checkpoints set it."""
    got_ocr2 = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")

    def make(size: int, max_tiles: int):
        return got_ocr2.GotOcr2ImageProcessorPil(
            size={"height": size, "width": size},
            crop_to_patches=True,
            min_patches=1,
            max_patches=max_tiles,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
        )

    return make


@pytest.mark.parametrize("size, max_tiles", [(448, 12), (112, 6), (112, 24)])
def test_pixels_equal_transformers(size, max_tiles, transformers_processor):
    """Same grid, same tile order (row-major, thumbnail last), and max abs diff 0 for opaque images."""
    hf = transformers_processor(size, max_tiles)
    cases = [
        photo(640, 480, 0),
        photo(1000, 300, 1),
        photo(300, 1000, 2),
        photo(100, 30, 3),
        photo(448, 448, 4),
        photo(700, 700, 5),
        photo(1280, 720, 6).convert("L"),
        photo(500, 333, 7).convert("P"),
        photo(321, 123, 8).convert("CMYK"),
    ]
    ours = ImageProcessor(size, 1, max_tiles)(cases)
    theirs = hf(images=cases, return_tensors="pt")
    assert theirs["num_patches"].tolist() == ours.tiles_per_image
    assert theirs["pixel_values"].shape == ours.pixel_values.shape
    assert (theirs["pixel_values"] - ours.pixel_values).abs().max().item() == 0.0


def test_transparency_is_where_we_differ_from_transformers(transformers_processor):
    """transformers composites alpha on white; the official loader (and we) drop it. Opaque RGBA agrees."""
    hf = transformers_processor(112, 6)
    opaque = photo(200, 100).convert("RGBA")
    assert torch.equal(
        preprocess(opaque, 112, 1, 6)[0], hf(images=[opaque], return_tensors="pt")["pixel_values"]
    )
    clear = opaque.copy()
    clear.putalpha(0)
    ours = preprocess(clear, 112, 1, 6)[0]
    theirs = hf(images=[clear], return_tensors="pt")["pixel_values"]
    white = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(
        theirs[:, :, 0, 0], white.expand(theirs.shape[0], 3), atol=1e-5
    )  # all white
    assert torch.equal(ours, preprocess(opaque, 112, 1, 6)[0])  # the colours underneath


def test_preprocess_benchmark_runs_and_agrees(capsys, transformers_processor, markdown_tables):
    import argparse
    import json

    from tessera.bench import preprocess as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--sizes",
            "200x100,64x64",
            "--images",
            "2",
            "--rounds",
            "1",
            "--tile-size",
            "112",
            "--max-tiles",
            "6",
            "--threads",
            "2",
            "--json",
        ]
    )
    assert bench.run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["size"] for r in result["rows"]] == ["200x100", "64x64"]
    assert [(r["grid"], r["tiles"]) for r in result["rows"]] == [("2x1", 3), ("1x1", 1)]
    for row in result["rows"]:
        assert set(row["images_per_s"]) == {"transformers", "ours", "ours_fast", "ours_2threads"}
        assert row["max_abs_diff"]["ours"] == 0.0
    assert result["machine"]["nproc"] >= 1 and result["settings"]["threads"] == 2
    [table] = markdown_tables(bench.markdown(result))  # one row per image size, as in the JSON
    rows = [(row["image"], row["grid"], row["tiles"]) for row in table]
    assert rows == [("200x100", "2x1", "3"), ("64x64", "1x1", "1")]
