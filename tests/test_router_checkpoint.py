"""An official-layout InternVL3.5-Flash checkpoint (tiny, random, written by hand) loads, routes and converts.

The router weights come from an independent write-up of the released modules (tests/test_router.py), stored
under the released key names; the config.json has only the fields a released Flash config.json has.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_router import ReleasedPooling, released_gating  # noqa: E402

import tessera
from tessera.model.checkpoint import convert, read_weight_names
from tessera.routing import RoutingPolicy, decide, encode_routed

CV, CL = 32, 48


def official_config(img_context_id: int) -> dict:
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": "internvl2_5",
        "downsample_ratio": 0.5,
        "force_image_size": 56,
        "select_layer": -1,
        "ps_version": "v2",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 4,
        "flash_mode": True,
        "flash_relative_threshold": 0.25,
        "flash_absolute_threshold": 0.1,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "image_size": 56,
            "patch_size": 14,
            "hidden_size": CV,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "norm_type": "layer_norm",
            "qkv_bias": True,
            "qk_normalization": False,
            "layer_norm_eps": 1e-6,
            "initializer_factor": 0.1,
            "hidden_act": "gelu",
        },
        "llm_config": {
            "architectures": ["Qwen3ForCausalLM"],
            "vocab_size": 1024,
            "hidden_size": CL,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
        },
    }


def released_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every weight of a released-architecture Flash model, under the official key names."""
    from tessera.config import FlashConfig, LanguageConfig, ModelConfig, VisionConfig
    from tessera.model.vlm import VisionLanguageModel

    torch.manual_seed(seed)
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=56,
            patch_size=14,
            hidden_size=CV,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
        ),
        language=LanguageConfig(
            vocab_size=1024,
            hidden_size=CL,
            intermediate_size=96,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=10_000.0,
            tie_word_embeddings=False,
        ),
        flash=FlashConfig(enabled=True),
        max_tiles=4,
        image_context_token_id=3,
    )
    state = {
        k: v
        for k, v in VisionLanguageModel(cfg).state_dict().items()
        if not k.startswith(("pooling_before_gating.", "gating."))
    }  # ViT, mlp1, mlp2, LLM: identity names
    pooling, gating = ReleasedPooling(CV), released_gating(CV)
    state |= {f"pooling_before_gating.{k}": v for k, v in pooling.state_dict().items()}
    state |= {f"gating.{k}": v for k, v in gating.state_dict().items()}
    return {k: v.contiguous().clone() for k, v in state.items()}, pooling.eval(), gating.eval()


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("flash-official")
    weights, pooling, gating = released_weights()
    save_file(weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(official_config(tokenizer.img_context_id)))
    tokenizer.save(path)
    return path, pooling, gating


def reference_probs(pooling, gating, tokens: torch.Tensor) -> torch.Tensor:
    h = pooling(tokens)
    for k in range(1, 5):
        h = h + getattr(gating, f"block{k}")(h)
    return torch.softmax(gating.gate(h), -1)


def test_official_flash_checkpoint_loads_with_its_router_and_thresholds(official_dir):
    path, pooling, gating = official_dir
    model = tessera.load(path).eval()
    flash = model.config.flash
    assert flash.enabled and flash.relative_threshold == 0.25 and flash.absolute_threshold == 0.1
    assert (
        model.config.compressed_tokens_per_tile == 1 and model.config.tokens_per_tile == 4
    )  # 4×4 patches
    pv = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        grid = model.vision_tokens(pv)
        tokens = grid.reshape(5, -1, CV)
        torch.testing.assert_close(
            model.router.probs(tokens),
            reference_probs(pooling, gating, tokens),
            rtol=1e-5,
            atol=1e-5,
        )
        feats, decision = encode_routed(model, pv, [5], "router")
        p = reference_probs(pooling, gating, tokens)[:, 0]
    q = torch.quantile(p, 0.25)  # the released rule with this config's thresholds
    assert decision.compress.tolist() == ((p > q) & (p >= 0.1)).tolist()
    assert feats.shape[0] == decision.visual_tokens


def test_official_flash_checkpoint_converts_to_hf_and_back(official_dir, tmp_path):
    path, _, _ = official_dir
    model = tessera.load(path).eval()
    convert(path, tmp_path / "hf", to="hf")
    hf_keys = read_weight_names(tmp_path / "hf")
    assert (
        "model.pooling_before_gating.attn1.query.weight" in hf_keys
        and "model.mlp2.dense1.weight" in hf_keys
    )
    assert "model.gating.block4.dense_in.weight" in hf_keys
    back = tessera.load(tmp_path / "hf").eval()
    convert(tmp_path / "hf", tmp_path / "tessera", to="tessera")
    again = tessera.load(tmp_path / "tessera").eval()
    pv = torch.randn(3, 3, 56, 56)
    for other in (back, again):
        assert other.config.flash == model.config.flash
        with torch.no_grad():
            a, da = encode_routed(model, pv, [3], RoutingPolicy("router", relative_threshold=0.0))
            b, db = encode_routed(other, pv, [3], RoutingPolicy("router", relative_threshold=0.0))
        assert torch.equal(da.compress, db.compress)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(da.p_compress, db.p_compress)
    assert decide(RoutingPolicy("compressed"), [3], 4, 1).visual_tokens == 3
