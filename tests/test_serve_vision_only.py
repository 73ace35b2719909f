"""A vision worker (and a server whose language model runs in vLLM) holds no language-model weights."""

from __future__ import annotations

import copy

import torch

from tessera.bench.loadgen import image_for_tiles
from tessera.routing import RoutingPolicy
from tessera.serve.vision import VisionEncoder, vision_only


def test_vision_only_drops_the_language_model_and_encodes_the_same(tiny):
    full = VisionEncoder(copy.deepcopy(tiny))
    lean_model = vision_only(copy.deepcopy(tiny), "cpu", None)
    assert all(p.is_meta for p in lean_model.language_model.parameters())
    assert not any(p.is_meta for p in lean_model.vision_model.parameters())
    lean = VisionEncoder(lean_model)
    tile = tiny.config.tile_size
    images = [image_for_tiles(4, tile, seed=0), image_for_tiles(1, tile, seed=1)]
    for policy in (RoutingPolicy(), RoutingPolicy.parse("router")):
        want = full.encode(images, policy)
        got = lean.encode(images, policy)
        assert [g.meta for g in got] == [w.meta for w in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(g.features, w.features, rtol=0, atol=0)


def test_vision_only_casts_only_the_vision_side(tiny):
    model = vision_only(copy.deepcopy(tiny), "cpu", torch.bfloat16)
    assert next(model.vision_model.parameters()).dtype == torch.bfloat16
    assert next(model.mlp1.parameters()).dtype == torch.bfloat16
