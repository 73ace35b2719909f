"""Routing policy: the released threshold rule, monotonicity, budgets, random at the same count, and the prompt."""

from __future__ import annotations

import pytest
import torch

from tessera.config import preset
from tessera.routing import (
    RoutingError,
    RoutingPolicy,
    decide,
    encode_routed,
    enforce_budget,
    route_tiles,
    threshold_decision,
)

TILES = [5, 1, 7, 3]


def scores(seed: int = 0) -> torch.Tensor:
    return torch.rand(sum(TILES), generator=torch.Generator().manual_seed(seed))


def subset(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a & ~b).sum() == 0)


def test_threshold_rule_is_the_released_one_per_image():
    p = torch.tensor([0.9, 0.2, 0.6, 0.7, 0.4])
    # median 0.6: strictly above it and >= 0.5 → 0.9 and 0.7
    assert threshold_decision(p, [5], 0.5, 0.5).tolist() == [True, False, False, True, False]
    # the absolute threshold alone removes 0.7
    assert threshold_decision(p, [5], 0.5, 0.8).tolist() == [True, False, False, False, False]
    # per image: each image is compared with its own quantile; a one-tile image is never compressed
    both = threshold_decision(torch.tensor([0.9, 0.1, 0.99]), [2, 1], 0.5, 0.0)
    assert both.tolist() == [True, False, False]


@pytest.mark.parametrize("seed", range(5))
def test_thresholds_are_monotone(seed):
    p = scores(seed)
    grid = [0.0, 0.2, 0.5, 0.8, 1.0]
    for rel_lo, rel_hi in zip(grid, grid[1:]):
        assert subset(
            threshold_decision(p, TILES, rel_hi, 0.3), threshold_decision(p, TILES, rel_lo, 0.3)
        )
    for ab_lo, ab_hi in zip(grid, grid[1:]):
        assert subset(
            threshold_decision(p, TILES, 0.3, ab_hi), threshold_decision(p, TILES, 0.3, ab_lo)
        )


@pytest.mark.parametrize("seed", range(5))
def test_budget_is_monotone_and_respected(seed):
    p = scores(seed)
    n = sum(TILES)
    full, small = 16, 4
    base = decide(RoutingPolicy("router"), TILES, full, small, p).compress
    previous = base
    for budget in range(n * full, n * small - 1, -7):
        c = enforce_budget(base, p, budget, full, small)
        tokens = int(c.sum()) * small + int((~c).sum()) * full
        assert tokens <= budget
        assert subset(previous, c) and subset(base, c)
        previous = c
    with pytest.raises(RoutingError, match="below"):
        enforce_budget(base, p, n * small - 1, full, small)


def test_budget_compresses_highest_scores_first():
    p = torch.tensor([0.1, 0.9, 0.5, 0.7])
    c = enforce_budget(torch.zeros(4, dtype=torch.bool), p, 4 * 16 - 2 * 12, 16, 4)
    assert c.tolist() == [False, True, False, True]


@pytest.mark.parametrize("seed", range(3))
def test_random_compresses_as_many_tiles_per_image_as_router(seed):
    p = scores(seed)
    router = decide(RoutingPolicy("router"), TILES, 16, 4, p)
    rand = decide(RoutingPolicy("random", seed=seed), TILES, 16, 4, p)
    start = 0
    for n in TILES:
        assert int(router.compress[start : start + n].sum()) == int(
            rand.compress[start : start + n].sum()
        )
        start += n
    assert rand.visual_tokens == router.visual_tokens
    again = decide(RoutingPolicy("random", seed=seed), TILES, 16, 4, p)
    assert torch.equal(again.compress, rand.compress)


def test_full_and_compressed_and_errors():
    d = decide(RoutingPolicy("full"), TILES, 16, 4)
    assert d.visual_tokens == 16 * sum(TILES) and d.image_tokens == [16 * t for t in TILES]
    d = decide(RoutingPolicy("compressed"), TILES, 16, 4)
    assert d.visual_tokens == 4 * sum(TILES)
    with pytest.raises(RoutingError, match="needs router"):
        decide(RoutingPolicy("router"), TILES, 16, 4)
    with pytest.raises(RoutingError, match="unknown routing mode"):
        RoutingPolicy("half")
    with pytest.raises(RoutingError, match="4 router scores for 3 tiles"):
        decide(RoutingPolicy("router"), [3], 16, 4, torch.rand(4))
    with pytest.raises(RoutingError, match="add up"):
        decide(RoutingPolicy("full"), [3, 0], 16, 4)
    with pytest.raises(RoutingError):
        RoutingPolicy("router", relative_threshold=1.5)


def test_prompt_tokens_equal_feature_rows_under_mixed_routing(tiny):
    pv = torch.randn(7, 3, tiny.config.tile_size, tiny.config.tile_size)
    tiles = [4, 3]
    policy = RoutingPolicy("router", relative_threshold=0.2, absolute_threshold=0.0)
    feats, decision = encode_routed(tiny, pv, tiles, policy)
    assert 0 < decision.compressed_tiles < 7  # mixed
    ids = tiny.tokenizer.build_prompt("what is written?", decision.image_tokens)
    n_ctx = sum(1 for i in ids if i == tiny.config.image_context_token_id)
    assert n_ctx == feats.shape[0] == decision.visual_tokens
    with torch.no_grad():
        logits = tiny(torch.tensor([ids]), image_features=feats)
    assert logits.shape[:2] == (1, len(ids))
    wrong = tiny.tokenizer.build_prompt("what is written?", [tiny.config.tokens_per_tile * 7])
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        tiny.embed(torch.tensor([wrong]), feats)


def test_encode_routed_matches_explicit_mask_and_route_tiles(tiny):
    pv = torch.randn(5, 3, tiny.config.tile_size, tiny.config.tile_size)
    feats, decision = encode_routed(tiny, pv, [5], "router")
    mask = route_tiles(tiny, pv, [5], "router")
    assert torch.equal(mask, decision.compress)
    with torch.no_grad():
        ref, per_tile = tiny.encode_images(pv, compress=mask)
    assert per_tile == decision.tokens_per_tile
    torch.testing.assert_close(feats, ref)
    assert route_tiles(tiny, pv, [5], "full") is None


def test_routing_a_plain_model_fails_loudly():
    from tessera.model.vlm import VisionLanguageModel

    cfg = preset("tiny")
    cfg.flash.enabled = False
    model = VisionLanguageModel(cfg).eval()
    pv = torch.randn(2, 3, cfg.tile_size, cfg.tile_size)
    with pytest.raises(RoutingError, match="Flash"):
        encode_routed(model, pv, [2], "router")
    feats, decision = encode_routed(model, pv, [2], "full")
    assert feats.shape[0] == 2 * cfg.tokens_per_tile


def test_draw_routing_marks_every_tile(tiny, tmp_path):
    from PIL import Image

    from tessera.routing import draw_routing

    img = Image.new("RGB", (230, 110), "white")  # a 2×1 grid plus the thumbnail
    decision = draw_routing(tiny, img, "router", str(tmp_path / "r.png"))
    assert decision.compress.numel() == 3 and decision.p_compress is not None
    out = Image.open(tmp_path / "r.png")
    assert out.width > 2 * tiny.config.tile_size and out.height > tiny.config.tile_size
    with pytest.raises(RoutingError):
        draw_routing(tiny, img, RoutingPolicy("router", budget=1), str(tmp_path / "x.png"))
