"""ViR module: released key names and arithmetic, the Flash key map, and the compressed branch's token count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tessera.config import FlashConfig, preset
from tessera.model.router import (
    COMPRESS,
    CrossAttentionPooling,
    Gating,
    VisualResolutionRouter,
    build_router_parts,
    flash_hf_to_official,
    flash_official_to_hf,
)


class ReleasedPooling(nn.Module):
    """An independent write-up of the released pooling, using nn.MultiheadAttention calls in the released order."""

    def __init__(self, dim: int, heads: int = 16):
        super().__init__()
        self.query_token = nn.Parameter(torch.randn(1, dim))
        for k in range(1, 5):
            setattr(self, f"attn{k}", nn.MultiheadAttention(dim, heads, batch_first=True))
            setattr(self, f"norm{k}", nn.LayerNorm(dim))

    def forward(self, x):
        q = self.query_token.unsqueeze(0).expand(x.shape[0], -1, -1)
        h = self.norm1(self.attn1(q, x, x)[0])
        for _ in range(3):
            h = self.norm2(self.attn2(h, x, x)[0])
        return h.squeeze(1)


def released_gating(dim: int) -> nn.Module:
    def block():
        return nn.Sequential(
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(4 * dim, dim),
            nn.Dropout(0.1),
            nn.LayerNorm(dim),
        )

    m = nn.Module()
    for k in range(1, 5):
        setattr(m, f"block{k}", block())
    m.gate = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2))
    return m


def test_released_keys_and_shapes_load_strictly_and_match_outputs():
    dim = 64
    torch.manual_seed(0)
    ref_pool, ref_gate = ReleasedPooling(dim).eval(), released_gating(dim).eval()
    pooling, gating = build_router_parts(dim, FlashConfig(enabled=True))
    router = VisualResolutionRouter(pooling, gating).eval()
    state = {f"pooling_before_gating.{k}": v for k, v in ref_pool.state_dict().items()}
    state |= {f"gating.{k}": v for k, v in ref_gate.state_dict().items()}
    router.load_state_dict(state, strict=True)  # same key names and shapes as the release
    x = torch.randn(5, 16, dim)
    with torch.no_grad():
        pooled = ref_pool(x)
        h = pooled
        for k in range(1, 5):
            h = h + getattr(ref_gate, f"block{k}")(h)
        want = torch.softmax(ref_gate.gate(h), dim=-1)
        got = router.probs(x)
    torch.testing.assert_close(router.pooling_before_gating(x), pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(router.p_compress(x), want[:, COMPRESS])


def test_narrow_router_adds_only_proj_in():
    pooling = CrossAttentionPooling(vision_hidden=48, hidden=32, num_heads=4)
    assert pooling.proj_in.weight.shape == (32, 48)
    out = pooling(torch.randn(3, 9, 48))
    assert out.shape == (3, 32)
    with pytest.raises(ValueError, match="divisible"):
        CrossAttentionPooling(48, 30, num_heads=4)
    with pytest.raises(ValueError, match="tile tokens"):
        pooling(torch.randn(9, 48))


def test_multiple_queries_average():
    torch.manual_seed(0)
    pooling = CrossAttentionPooling(32, num_heads=4, num_queries=3).eval()
    x = torch.randn(2, 5, 32)
    single = CrossAttentionPooling(32, num_heads=4).eval()
    single.load_state_dict(
        {k: v[:1] if k == "query_token" else v for k, v in pooling.state_dict().items()}
    )
    assert pooling(x).shape == (2, 32)
    assert not torch.allclose(pooling(x), single(x))


def test_gating_logits_shape_and_block_count():
    g = Gating(16, num_blocks=2)
    assert g(torch.randn(4, 16)).shape == (4, 2)
    assert hasattr(g, "block2") and not hasattr(g, "block3")


def test_flash_key_map_round_trip():
    torch.manual_seed(0)
    cfg = preset("tiny")
    from tessera.model.vlm import VisionLanguageModel

    model = VisionLanguageModel(cfg)
    flash = {
        k: v
        for k, v in model.state_dict().items()
        if k.startswith(("mlp2.", "pooling_before_gating.", "gating."))
    }
    hf = flash_official_to_hf(flash)
    assert "model.mlp2.dense3.weight" in hf and "model.gating.gate_proj.bias" in hf
    assert "model.gating.block4.dense_out.weight" in hf
    h = cfg.flash.router_hidden_size
    assert hf["model.pooling_before_gating.attn2.key.weight"].shape == (h, h)
    back = flash_hf_to_official(hf)
    assert back.keys() == flash.keys()
    for k in flash:
        torch.testing.assert_close(back[k], flash[k])
    with pytest.raises(KeyError):
        flash_official_to_hf({"mlp1.0.weight": torch.zeros(1)})


def test_vlm_exposes_router_sharing_its_weights():
    from tessera.model.vlm import VisionLanguageModel

    model = VisionLanguageModel(preset("tiny"))
    router = model.router
    assert (
        router.gating is model.gating
        and router.pooling_before_gating is model.pooling_before_gating
    )
    assert not any(k.startswith("router.") for k in model.state_dict())
    plain = preset("tiny")
    plain.flash.enabled = False
    assert VisionLanguageModel(plain).router is None


def test_compressed_tile_yields_exactly_one_sixteenth_of_the_patches():
    from tessera.model.vlm import VisionLanguageModel

    cfg = preset("tiny")
    model = VisionLanguageModel(cfg).eval()
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    pv = torch.randn(3, 3, cfg.tile_size, cfg.tile_size)
    with torch.no_grad():
        feats, per_tile = model.encode_images(pv, compress=torch.tensor([True, False, True]))
    assert per_tile == [patches // 16, patches // 4, patches // 16]
    assert cfg.compressed_tokens_per_tile == patches // 16
    assert feats.shape == (sum(per_tile), cfg.language.hidden_size)
