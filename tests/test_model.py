"""The model: both InternViT variants, pixel shuffle v2, the projectors, KV cache, packing, tile encoding."""

import dataclasses

import pytest
import torch
from conftest import unit_config

from tessera import geometry
from tessera.config import ModelConfig
from tessera.engine import SamplingParams, generate
from tessera.engine.kv_cache import CacheGeometry, SlotKVCache
from tessera.engine.sampling import sample_tokens
from tessera.model.connector import make_mlp1, make_mlp2, pixel_shuffle
from tessera.model.llm import Qwen3ForCausalLM, packed_causal_mask
from tessera.model.vit import InternVisionModel, RMSNorm
from tessera.model.vlm import VisionLanguageModel

IMG = 3  # <IMG_CONTEXT> id of these tiny models


def tiny_config(flash: bool = True, rms: bool = False) -> ModelConfig:
    """56 px tiles, patch 14: 4×4 patches → 4 tokens at 1/4, 1 token at 1/16. GQA 4 heads / 2 kv heads."""
    return unit_config(flash=flash, rms=rms)


@pytest.fixture(scope="module")
def model() -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(tiny_config()).eval()


def prompt(n_image_tokens: int, text=(10, 11, 12)) -> torch.Tensor:
    return torch.tensor([[1, 4] + [IMG] * n_image_tokens + [5, *text]])


# ---- InternViT --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rms", [False, True], ids=["300M-layernorm", "6B-rmsnorm-qknorm"])
def test_vit_variants_run_with_official_names(rms):
    cfg = tiny_config(rms=rms).vision
    vit = InternVisionModel(cfg).eval()
    out = vit(torch.randn(3, 3, 56, 56))
    assert out.shape == (3, 1 + 16, 32) and torch.isfinite(out).all()
    keys = set(vit.state_dict())
    for name in (
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding",
        "encoder.layers.1.attn.qkv.weight",
        "encoder.layers.1.attn.proj.weight",
        "encoder.layers.1.ls1",
        "encoder.layers.1.ls2",
        "encoder.layers.1.norm1.weight",
        "encoder.layers.1.mlp.fc1.weight",
        "encoder.layers.1.mlp.fc2.bias",
    ):
        assert name in keys
    assert ("encoder.layers.0.attn.qkv.bias" in keys) is not rms
    assert ("encoder.layers.0.attn.q_norm.weight" in keys) is rms
    assert (
        "encoder.layers.0.norm1.bias" in keys
    ) is not rms  # LayerNorm has a bias, RMSNorm does not
    assert isinstance(vit.encoder.layers[0].norm1, RMSNorm) is rms


def test_vit_layer_indexing_matches_hidden_states():
    vit = InternVisionModel(tiny_config().vision).eval()
    x = torch.randn(2, 3, 56, 56)
    emb, first, last = vit.hidden_states(x, [0, 1, -1])
    assert torch.equal(emb, vit.embeddings(x))
    assert torch.equal(first, vit.encoder.layers[0](emb))
    assert torch.equal(last, vit(x)) and torch.equal(vit(x, layer=-2), first)
    with pytest.raises(ValueError, match="out of range"):
        vit(x, layer=5)


# ---- connector --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_pixel_shuffle_v2_concatenates_row_major_blocks(ratio):
    k = round(1 / ratio)
    x = torch.randn(2, 8, 8, 3)  # [N, h, w, C]
    y = pixel_shuffle(x, ratio)
    assert y.shape == (2, 8 // k, 8 // k, 3 * k * k)
    for i in range(8 // k):
        for j in range(8 // k):
            block = [
                x[:, i * k + a, j * k + b] for a in range(k) for b in range(k)
            ]  # row-major inside the block
            assert torch.equal(y[:, i, j], torch.cat(block, dim=-1))
    with pytest.raises(ValueError, match="not divisible"):
        pixel_shuffle(torch.randn(1, 6, 6, 2), 0.25)


def test_projector_keys_and_shapes():
    mlp1 = make_mlp1(32, 48, 0.5)
    mlp2 = make_mlp2(32, 48, 0.25)
    assert {k: tuple(v.shape) for k, v in mlp1.state_dict().items() if k.endswith("weight")} == {
        "0.weight": (128,),
        "1.weight": (48, 128),
        "3.weight": (48, 48),
    }
    assert {k: tuple(v.shape) for k, v in mlp2.state_dict().items() if k.endswith("weight")} == {
        "0.weight": (512,),
        "1.weight": (96, 512),
        "4.weight": (96, 96),
        "7.weight": (48, 96),
    }


# ---- tile encoding ----------------------------------------------------------------------------------------


def test_encode_images_mixed_compress_counts_and_order(model):
    cfg = model.config
    pv = torch.randn(5, 3, 56, 56)
    compress = torch.tensor([False, True, True, False, True])
    feats, per_tile = model.encode_images(pv, compress)
    full = geometry.tokens_per_tile(56, 14, cfg.downsample_ratio)
    small = geometry.tokens_per_tile(56, 14, cfg.flash.compressed_downsample_ratio)
    assert per_tile == geometry.routed_tokens(compress.tolist(), full, small) == [4, 1, 1, 4, 1]
    assert feats.shape == (sum(per_tile), cfg.language.hidden_size)
    # each tile's rows are exactly what that tile alone produces through its branch
    start = 0
    for i, c in enumerate(compress.tolist()):
        alone, _ = model.encode_images(pv[i : i + 1], torch.tensor([c]))
        torch.testing.assert_close(feats[start : start + per_tile[i]], alone, atol=1e-6, rtol=1e-5)
        start += per_tile[i]
    # a router hook (callable) sees the last-layer patch tokens and gives the same result as the mask
    seen = []
    hooked, _ = model.encode_images(pv, lambda tokens: seen.append(tokens.shape) or compress)
    assert seen == [(5, 16, 32)] and torch.equal(hooked, feats)
    none, per_tile = model.encode_images(pv)
    assert per_tile == [full] * 5 and none.shape[0] == 5 * full


def test_compress_needs_flash_and_a_mask_per_tile(model):
    plain = VisionLanguageModel(tiny_config(flash=False)).eval()
    assert plain.router is None and not hasattr(plain, "mlp2")
    with pytest.raises(ValueError, match="no mlp2"):
        plain.encode_images(torch.randn(2, 3, 56, 56), torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        model.encode_images(torch.randn(2, 3, 56, 56), torch.tensor([True]))


def test_add_flash_branch_turns_a_plain_model_into_a_flash_one():
    """What ViCO does to an SFT model trained without Flash parts: same keys as a Flash model, 1/4 path untouched."""
    torch.manual_seed(0)
    plain = VisionLanguageModel(tiny_config(flash=False)).to(torch.bfloat16).eval()
    pixels = torch.randn(2, 3, 56, 56, dtype=torch.bfloat16)
    before, _ = plain.encode_images(pixels)
    plain.add_flash_branch()
    assert plain.config.flash.enabled and plain.router is not None
    assert set(plain.state_dict()) == set(VisionLanguageModel(tiny_config(flash=True)).state_dict())
    assert all(p.dtype == torch.bfloat16 for p in plain.mlp2.parameters())
    after, _ = plain.encode_images(pixels)
    assert torch.equal(before, after)
    feats, counts = plain.encode_images(pixels, torch.tensor([True, False]))
    assert counts == [1, 4]  # 1/16 then 1/4
    weights = plain.mlp2[1].weight.clone()
    plain.add_flash_branch()  # a Flash model is left as it is
    assert torch.equal(plain.mlp2[1].weight, weights)


def test_embed_splices_features_and_checks_counts(model):
    feats = torch.randn(4, 48)
    ids = prompt(4)
    embeds = model.embed(ids, feats)
    slots = (ids[0] == IMG).nonzero().flatten()
    assert torch.equal(embeds[0, slots], feats)
    assert torch.equal(embeds[0, 0], model.language_model.embed_tokens.weight[1])
    with pytest.raises(ValueError, match=r"4 <IMG_CONTEXT> tokens.*but 3 image feature rows"):
        model.embed(ids, feats[:3])
    with pytest.raises(ValueError, match=r"4 <IMG_CONTEXT> tokens.*but 0 image feature rows"):
        model.embed(ids, None)


# ---- decoding: KV cache, sampling -------------------------------------------------------------------------


def _greedy(model, ids, feats, n, stop_ids=()):
    """Greedy tokens of the engine's batched generate for one prompt [1, T] (the stop id, when hit, last)."""
    return generate(
        model, [ids[0].tolist()], feats, SamplingParams(max_tokens=n, stop_ids=frozenset(stop_ids))
    ).tokens[0]


def _greedy_uncached(model, ids, feats, n):
    """The reference: recompute the whole sequence at every step, no cache."""
    out = []
    with torch.no_grad():
        embeds = model.embed(ids, feats)  # [1, T, D]
        for _ in range(n):
            out.append(int(model.language_model(embeds)[0, -1].argmax()))
            new = model.language_model.embed_tokens(torch.tensor([[out[-1]]]))  # [1, 1, D]
            embeds = torch.cat([embeds, new], dim=1)  # [1, T+k, D]
    return out


def test_kv_cache_generation_equals_full_recompute(model):
    pv = torch.randn(2, 3, 56, 56)
    feats, per_tile = model.encode_images(pv, torch.tensor([False, True]))
    ids = prompt(sum(per_tile))
    cached = _greedy(model, ids, feats, 12)
    uncached = _greedy_uncached(model, ids, feats, 12)
    assert cached == uncached and len(cached) == 12
    stop = cached[3]
    assert _greedy(model, ids, feats, 12, stop_ids=[stop]) == cached[: cached.index(stop) + 1]
    # incremental logits (prefill in two chunks, then one token) equal one full forward
    full_ids = torch.cat([ids, torch.tensor([cached[:3]])], dim=1)
    with torch.no_grad():
        embeds = model.embed(full_ids, feats)
        ref = model.language_model(embeds, torch.arange(full_ids.shape[1])[None])
        c = model.config.language
        parts, t = [], full_ids.shape[1]
        cache = SlotKVCache(CacheGeometry(c.num_layers, c.num_kv_heads, c.head_dim, 1, t))
        for lo, hi in ((0, 5), (5, t - 1), (t - 1, t)):
            pos = torch.arange(lo, hi)[None]
            parts.append(model.language_model(embeds[:, lo:hi], pos, cache=cache.view(0, pos, hi)))
    torch.testing.assert_close(torch.cat(parts, dim=1), ref, atol=1e-5, rtol=1e-5)


def test_sampling_greedy_nucleus_and_seed(model):
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])

    def draw(temperature=0.0, top_p=1.0, generator=None):
        return sample_tokens(
            logits, [SamplingParams(temperature=temperature, top_p=top_p)], generator
        )[0][0]

    assert draw() == 1
    assert draw(1.0, 1e-6) == 1  # the nucleus keeps only the top token
    draws = {draw(1.0, 0.8, torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {1, 3}  # p(1) + p(3) ≈ 0.92 > 0.8 > p(1): both top tokens, nothing else
    feats, per_tile = model.encode_images(torch.randn(1, 3, 56, 56))
    ids = prompt(sum(per_tile))
    sampled = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = generate(model, [ids[0].tolist()], feats, sampled).tokens
    b = generate(model, [ids[0].tolist()], feats, sampled).tokens
    assert a == b


def test_generate_groups_share_the_prompt_cache_and_top_k_bounds_the_draws(model):
    feats, per_tile = model.encode_images(torch.randn(1, 3, 56, 56))
    ids = prompt(sum(per_tile))[0].tolist()
    short = [1, 5, 10, 11]  # a text-only prompt of another length: ragged rows in one prefill
    alone = generate(model, [ids], feats, SamplingParams(max_tokens=6)).tokens[0]
    grouped = generate(model, [short, ids], feats, SamplingParams(max_tokens=6), group_size=3)
    assert grouped.groups() == [[0, 1, 2], [3, 4, 5]]
    assert (
        grouped.tokens[3:] == [alone] * 3
    )  # each copy of the prompt's cache decodes as the prompt alone
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    draws = {
        sample_tokens(
            logits, [SamplingParams(temperature=1.0, top_k=2)], torch.Generator().manual_seed(s)
        )[0][0]
        for s in range(40)
    }
    assert draws == {1, 3}  # top-2: the two largest logits, both drawn
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)


# ---- packing ----------------------------------------------------------------------------------------------


def test_packed_causal_mask():
    mask = packed_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]))
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],
        dtype=torch.bool,
    )
    assert mask.shape == (1, 1, 5, 5) and torch.equal(mask[0, 0], expected)


def test_packed_logits_equal_separate_forwards(model):
    feats, per_tile = model.encode_images(torch.randn(2, 3, 56, 56), torch.tensor([False, True]))
    a = prompt(sum(per_tile), text=(20, 21, 22, 23))  # sample A: an image of 5 tokens
    b = torch.tensor([[1, 30, 31, 32, 33, 34, 2]])  # sample B: text only
    pad = 2
    packed = torch.cat([a, b, torch.zeros(1, pad, dtype=torch.long)], dim=1)
    segments = torch.tensor([[0] * a.shape[1] + [1] * b.shape[1] + [-1] * pad])
    positions = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1]), torch.arange(pad)])[
        None
    ]
    with torch.no_grad():
        together = model(
            packed,
            image_features=feats,
            position_ids=positions,
            attn_mask=packed_causal_mask(segments),
        )
        alone_a = model(a, image_features=feats)
        alone_b = model(b)
    torch.testing.assert_close(together[:, : a.shape[1]], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        together[:, a.shape[1] : a.shape[1] + b.shape[1]], alone_b, atol=1e-5, rtol=1e-5
    )


def test_tied_head_shares_the_embedding():
    lm = Qwen3ForCausalLM(dataclasses.replace(tiny_config().language, tie_word_embeddings=True))
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    with pytest.raises(ValueError, match="bool"):
        lm(torch.randn(1, 3, 48), attn_mask=torch.ones(1, 1, 3, 3))
