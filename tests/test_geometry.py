"""tessera.geometry against the two references: the official InternVL `dynamic_preprocess` (what the model was
trained with) and transformers' `get_optimal_tiled_canvas` (what transformers' InternVL processor uses)."""

from __future__ import annotations

import random
from fractions import Fraction
from itertools import combinations

import pytest

from tessera.config import preset, tiny_config
from tessera.geometry import (
    candidate_grids,
    num_tiles,
    routed_tokens,
    tile_grid,
    tokens_of_images,
    tokens_per_image,
    tokens_per_tile,
)


@pytest.fixture(scope="module")
def got_ocr2():
    """transformers' GOT-OCR2 image processing module (InternVL's processor uses its tiling); a test extra."""
    return pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")


@pytest.fixture(scope="module")
def hf_grid(got_ocr2):
    return got_ocr2.get_optimal_tiled_canvas.__wrapped__  # bypass its 100-entry lru_cache


def official_candidates(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """The official candidate list, written the way InternVL's dynamic_preprocess builds it: a Python set of
    (i, j) pairs, sorted by i·j (a stable sort, so inside one tile count the set's iteration order stays)."""
    pairs = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(pairs, key=lambda g: g[0] * g[1])


def random_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    """Photo sizes, thin strips, tiny images and exact multiples of common ratios."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            sizes.append((rng.randint(1, 8000), rng.randint(1, 8000)))
        elif kind < 0.7:
            sizes.append((rng.randint(1, 64), rng.randint(1, 64)))
        elif kind < 0.85:
            w = rng.randint(1, 30)
            h = rng.randint(1, 30)
            k = rng.randint(1, 400)
            sizes.append((w * k, h * k))  # exact rational aspects, where ties live
        else:
            long_side, short = rng.randint(2000, 20000), rng.randint(1, 200)
            sizes.append((long_side, short) if rng.random() < 0.5 else (short, long_side))
    return sizes


@pytest.mark.parametrize("max_tiles", [6, 12, 24])
def test_candidates_are_the_official_list_and_the_transformers_set(max_tiles, got_ocr2):
    ours = list(candidate_grids(1, max_tiles))
    assert ours == official_candidates(1, max_tiles)
    assert sorted(ours) == sorted(got_ocr2.get_all_supported_aspect_ratios(1, max_tiles))
    areas = [c * r for c, r in ours]
    assert areas == sorted(areas) and len(set(ours)) == len(ours)


@pytest.mark.parametrize("max_tiles", [6, 12, 24])
@pytest.mark.parametrize("tile_size", [448, 112])
def test_tile_grid_equals_transformers_on_random_sizes(max_tiles, tile_size, hf_grid):
    for width, height in random_sizes(3000, seed=max_tiles * 1000 + tile_size):
        ours = tile_grid(width, height, tile_size, 1, max_tiles)
        assert ours == hf_grid((height, width), (tile_size, tile_size), 1, max_tiles), (
            width,
            height,
        )


@pytest.mark.parametrize("max_tiles", [6, 12, 24])
@pytest.mark.parametrize("min_tiles", [1, 2, 3])
def test_equal_tile_count_ties_never_decide_when_min_tiles_is_small(min_tiles, max_tiles, hf_grid):
    """The two candidate orders differ only inside one tile count, so they can disagree only where two grids
    with the same tile count are *exactly* the closest (the tie rule then picks by order). Exact float ties
    happen only at exact rational midpoints of two grid ratios, so enumerating those midpoints is exhaustive:
    with min_tiles <= 3 a third grid is always strictly closer, and the grids agree at every scale."""
    grids = candidate_grids(min_tiles, max_tiles)
    for g1, g2 in combinations(grids, 2):
        if g1[0] * g1[1] != g2[0] * g2[1]:
            continue
        mid = (Fraction(*g1) + Fraction(*g2)) / 2
        p, q = mid.numerator, mid.denominator
        diffs = {g: abs(p / q - g[0] / g[1]) for g in grids}
        best = min(diffs.values())
        assert not (diffs[g1] == best and diffs[g2] == best), (g1, g2)
        for k in (1, 7, 60, 400):
            assert tile_grid(p * k, q * k, 448, min_tiles, max_tiles) == hf_grid(
                (q * k, p * k), (448, 448), min_tiles, max_tiles
            )


def test_exact_tie_between_equal_tile_counts_follows_the_official_order(hf_grid):
    """min = max = 24, aspect exactly 15:1: (24, 1) and (12, 2) are both off by exactly 9 (24 − 15 = 15 − 6).
    The official set order visits (24, 1) before (12, 2); transformers visits (12, 2) first. The later one wins
    the tie when the image's area exceeds half a 24-tile canvas (0.5·448²·24 = 2,408,448 px). So the two
    implementations give opposite answers at every scale; we follow the official order, which is what the
    model was trained with (and the candidate order is pinned here in case a Python release changes set order)."""
    order = candidate_grids(24, 24)
    assert order.index((24, 1)) < order.index((12, 2))
    assert official_candidates(24, 24) == list(order)
    half_canvas = 0.5 * 448 * 448 * 24
    small, large = (15 * 40, 40), (15 * 500, 500)
    assert small[0] * small[1] < half_canvas < large[0] * large[1]
    assert tile_grid(*small, 448, 24, 24) == (24, 1)
    assert tile_grid(*large, 448, 24, 24) == (12, 2)
    assert hf_grid(small[::-1], (448, 448), 24, 24) == (12, 2)
    assert hf_grid(large[::-1], (448, 448), 24, 24) == (24, 1)


def test_equal_ratio_ties_grow_the_grid_with_the_image():
    """(1,1), (2,2), (3,3) are equally close for a square: the later one wins once the image's area exceeds
    half of its canvas (0.5·448²·4 = 401,408 px for 2×2; 0.5·448²·9 = 903,168 px for 3×3)."""
    assert tile_grid(448, 448) == (1, 1)
    assert tile_grid(633, 633) == (1, 1)  # 400,689 px
    assert tile_grid(634, 634) == (2, 2)  # 401,956 px
    assert tile_grid(950, 950) == (2, 2)  # 902,500 px
    assert tile_grid(951, 951) == (3, 3)  # 904,401 px
    assert tile_grid(5000, 5000) == (3, 3)  # 4×4 = 16 tiles is over max_tiles 12
    assert tile_grid(5000, 5000, max_tiles=16) == (4, 4)


def test_closest_aspect_wins_regardless_of_size(hf_grid):
    assert tile_grid(1000, 600, max_tiles=24) == (5, 3)  # aspect exactly 5/3: (5, 3) is exact
    assert tile_grid(1000, 600) == (3, 2)  # 15 tiles is over 12: 3/2 is the closest left
    # aspect 13/12 is closest to 1:1; which square grid then depends on the area (equal-ratio tie rule)
    assert tile_grid(130, 120) == (1, 1)
    assert tile_grid(1300, 1200) == (3, 3)
    assert tile_grid(1920, 1080) == (4, 2)
    assert tile_grid(1080, 1920) == (2, 4)
    assert tile_grid(40000, 10) == (12, 1)
    assert tile_grid(10, 40000, max_tiles=6) == (1, 6)
    assert tile_grid(4000, 3000, min_tiles=2, max_tiles=2) in {(2, 1), (1, 2)}
    assert tile_grid(4000, 3000, min_tiles=2, max_tiles=2) == hf_grid(
        (3000, 4000), (448, 448), 2, 2
    )


def test_tile_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        tile_grid(0, 10)
    with pytest.raises(ValueError, match="min_tiles"):
        tile_grid(10, 10, min_tiles=3, max_tiles=2)


def test_num_tiles_thumbnail_rule():
    assert num_tiles(448, 448) == 1  # one tile: no thumbnail
    assert num_tiles(1920, 1080) == 4 * 2 + 1
    assert num_tiles(1920, 1080, use_thumbnail=False) == 8
    assert num_tiles(200, 100, 112, 1, 6) == 2 + 1  # tiny preset tiles


def test_tokens_per_tile():
    assert tokens_per_tile(448, 14, 0.5) == 256  # InternVL3.5: 32×32 patches → 16×16 at 1/4
    assert tokens_per_tile(448, 14, 0.25) == 64  # Flash 1/16 branch
    assert tokens_per_tile(112, 14, 0.5) == 16  # tiny: 8×8 patches → 4×4
    assert tokens_per_tile(112, 14, 0.25) == 4
    assert tokens_per_tile(448, 14, 1.0) == 1024  # no shuffle
    with pytest.raises(ValueError, match="multiple of patch size"):
        tokens_per_tile(450, 14)
    with pytest.raises(ValueError, match="downsample ratio"):
        tokens_per_tile(448, 14, 1 / 3)  # 32 patches per side are not divisible by 3
    with pytest.raises(ValueError, match="downsample ratio"):
        tokens_per_tile(448, 14, 0.3)  # not 1/k


def test_tokens_match_the_configs():
    assert tiny_config().tokens_per_tile == 16 and tiny_config().compressed_tokens_per_tile == 4
    cfg = preset("internvl3_5-1b-flash")
    assert (cfg.tokens_per_tile, cfg.compressed_tokens_per_tile) == (256, 64)


def test_tokens_per_image_matches_transformers_patch_count(got_ocr2):
    """transformers' processor counts patches with the same rule (grid + thumbnail when > 1) × 256 tokens."""
    processor = got_ocr2.GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=12
    )
    for width, height in random_sizes(300, seed=5):
        expected = processor.get_number_of_image_patches(height, width) * 256
        assert tokens_per_image(width, height) == expected, (width, height)
    assert tokens_per_image(1920, 1080) == 9 * 256
    assert tokens_per_image(1920, 1080, downsample_ratio=0.25) == 9 * 64
    assert (
        tokens_per_image(300, 200, 112, 14, 0.5, 1, 6, use_thumbnail=False) == 6 * 16
    )  # 3:2 → (3, 2) exactly


def test_routed_tokens():
    assert routed_tokens([False, True, True], 256, 64) == [256, 64, 64]
    assert sum(routed_tokens([], 256, 64)) == 0


def test_tokens_of_images():
    assert tokens_of_images([1, 3], 16) == [16, 48]  # one count for every tile
    assert tokens_of_images([2, 1], [16, 4, 4]) == [
        20,
        4,
    ]  # per-tile counts of a routing decision, in order
    with pytest.raises(ValueError, match="per-tile counts"):
        tokens_of_images([2, 2], [16, 4, 4])
