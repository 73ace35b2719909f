"""Pure integer geometry: the tile grid and every visual-token count.

The one source of truth for "how many tokens": the image processor, the model, the chat template and the
servers all ask here.
"""

from __future__ import annotations

from functools import cache


@cache
def candidate_grids(min_tiles: int = 1, max_tiles: int = 12) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with min_tiles <= cols*rows <= max_tiles, ordered by tile count.

    Within one tile count the order is InternVL's own (`dynamic_preprocess` builds a Python set of
    (i, j) pairs and sorts it by area). It decides the winner when two transposed grids are exactly
    equally close to the image's aspect ratio, so it is reproduced literally.
    """
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles ({min_tiles}) <= max_tiles ({max_tiles})")
    pairs = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(pairs, key=lambda g: g[0] * g[1]))


def tile_grid(
    width: int, height: int, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12
) -> tuple[int, int]:
    """InternVL's dynamic-resolution grid (cols, rows) for a width×height image.

    Candidates are visited in `candidate_grids` order; the closest aspect ratio wins, and on an exact tie
    the later candidate replaces the current one only when the image's area exceeds half the area of that
    candidate's canvas (S²·cols·rows / 2). Equal-ratio ties ((1, 1) vs (2, 2)) therefore grow the grid with
    the image. transformers' `get_optimal_tiled_canvas` applies the same rule over a different order inside
    one tile count. Both orders give the same grid for every image size whenever min_tiles <= 3 (every
    InternVL configuration; checked exhaustively for max_tiles <= 40). With a larger min_tiles they can
    differ on an exact tie between two grids of equal tile count, e.g. min = max = 24 at aspect exactly 15:1;
    tests/test_geometry.py pins both sides of that case.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(
    width: int,
    height: int,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
) -> int:
    """Tiles fed to the ViT for one image: the grid, plus a thumbnail when the grid has more than one tile."""
    cols, rows = tile_grid(width, height, tile_size, min_tiles, max_tiles)
    return cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0)


def tokens_per_tile(
    tile_size: int = 448, patch_size: int = 14, downsample_ratio: float = 0.5
) -> int:
    """Visual tokens one tile becomes after pixel shuffle: (tile/patch · ratio)².

    448/14 = 32 patches per side → 16×16 = 256 tokens at ratio 1/2 (1/4 of the tokens), 8×8 = 64 at 1/4 (1/16).
    """
    if tile_size % patch_size:
        raise ValueError(f"tile size {tile_size} is not a multiple of patch size {patch_size}")
    side = tile_size // patch_size
    inv = round(1 / downsample_ratio)
    if abs(inv * downsample_ratio - 1) > 1e-9 or side % inv:
        raise ValueError(
            f"downsample ratio {downsample_ratio} must be 1/k with k dividing {side} patches per side"
        )
    return (side // inv) ** 2


def tokens_per_image(
    width: int,
    height: int,
    tile_size: int = 448,
    patch_size: int = 14,
    downsample_ratio: float = 0.5,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
) -> int:
    """Visual tokens for one image at a single resolution for every tile (thumbnail included)."""
    tiles = num_tiles(width, height, tile_size, min_tiles, max_tiles, use_thumbnail)
    return tiles * tokens_per_tile(tile_size, patch_size, downsample_ratio)


def routed_tokens(compress: list[bool], full_tokens: int, compressed_tokens: int) -> list[int]:
    """Per-tile token counts under a routing decision (True = compress to the 1/16 branch)."""
    return [compressed_tokens if c else full_tokens for c in compress]


def tokens_of_images(tiles_per_image: list[int], tokens_per_tile: int | list[int]) -> list[int]:
    """Visual tokens per image (what each `<img>` of the prompt carries) for images of tiles_per_image[i] tiles
    each: at one count for every tile, or from per-tile counts in prompt order (a routing decision's)."""
    if isinstance(tokens_per_tile, int):
        return [n * tokens_per_tile for n in tiles_per_image]
    if sum(tiles_per_image) != len(tokens_per_tile):
        raise ValueError(
            f"{len(tokens_per_tile)} per-tile counts for images of {tiles_per_image} tiles"
        )
    out, start = [], 0
    for n in tiles_per_image:
        out.append(sum(tokens_per_tile[start : start + n]))
        start += n
    return out
