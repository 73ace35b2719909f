"""Checkpoints: the three layouts, bit-identical round trips, strict loading with clear errors, `tessera convert`."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import unit_config
from safetensors.torch import load_file, save_file

from tessera.chat import build_tokenizer, fallback_corpus
from tessera.cli import main as cli
from tessera.config import ConfigError, ModelConfig
from tessera.model.checkpoint import (
    CheckpointError,
    convert,
    load_checkpoint,
    load_config,
    save_checkpoint,
)
from tessera.model.vlm import VisionLanguageModel


def tiny_config(flash: bool = False, tied: bool = False, rms: bool = False) -> ModelConfig:
    # a vocabulary the shared tokenizer fits; relative threshold 0.3 so the official layout's round trip shows it
    return unit_config(
        flash=flash, tied=tied, rms=rms, vocab_size=320, relative_threshold=0.3, preset="unit"
    )


def random_model(config: ModelConfig, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    model = VisionLanguageModel(config)
    with (
        torch.no_grad()
    ):  # move norms and layer scales off their init so a swapped tensor would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p))
    return model.eval()


def assert_same_weights(a: VisionLanguageModel, b: VisionLanguageModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(fallback_corpus(), vocab_size=300)


@pytest.mark.parametrize(
    "flash,tied,rms", [(False, False, False), (True, True, True)], ids=["plain", "flash-tied-rms"]
)
def test_official_tessera_hf_tessera_round_trip_is_bit_identical(
    tmp_path, tokenizer, flash, tied, rms
):
    model = random_model(tiny_config(flash, tied, rms))
    model.tokenizer = tokenizer
    save_checkpoint(model, tmp_path / "official", layout="official")
    raw = json.loads((tmp_path / "official/config.json").read_text())
    assert raw["architectures"] == ["InternVLChatModel"] and raw["ps_version"] == "v2"
    keys = set(load_file(tmp_path / "official/model.safetensors"))
    assert {
        "vision_model.embeddings.class_embedding",
        "mlp1.3.weight",
        "language_model.model.layers.1.self_attn.k_norm.weight",
    } <= keys
    assert ("language_model.lm_head.weight" in keys) is not tied
    assert ("mlp2.7.weight" in keys and "gating.gate.1.weight" in keys) is flash

    convert(tmp_path / "official", tmp_path / "tessera", to="tessera")
    convert(tmp_path / "tessera", tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "back", to="tessera")
    for folder, layout in (
        ("official", "official"),
        ("tessera", "tessera"),
        ("hf", "hf"),
        ("back", "tessera"),
    ):
        config, found = load_config(tmp_path / folder)
        assert found == layout and config == model.config, folder
        loaded = load_checkpoint(tmp_path / folder)
        assert_same_weights(model, loaded)
        assert loaded.tokenizer is not None and loaded.tokenizer.img_context_id == 3
    assert (tmp_path / "back/tokenizer.json").read_bytes() == (
        tmp_path / "official/tokenizer.json"
    ).read_bytes()
    hf_keys = set(load_file(tmp_path / "hf/model.safetensors"))
    assert "model.vision_tower.encoder.layer.0.attention.q_proj.weight" in hf_keys
    assert ("model.vision_tower.encoder.layer.0.attention.q_proj.bias" in hf_keys) is not rms
    assert ("lm_head.weight" in hf_keys) is not tied


def test_official_config_without_our_block_uses_the_tokenizer(tmp_path, tokenizer):
    model = random_model(tiny_config(flash=True))
    model.tokenizer = tokenizer
    save_checkpoint(model, tmp_path, layout="official")
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["tessera_config"]  # what a real OpenGVLab config.json looks like
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config, layout = load_config(tmp_path)
    assert layout == "official" and config.flash.enabled and config.flash.router_num_blocks == 4
    assert (
        config.image_context_token_id == tokenizer.img_context_id
        and config.flash.relative_threshold == 0.3
    )
    assert config.preset == "" and dataclasses.replace(config, preset="unit") == model.config
    assert_same_weights(model, load_checkpoint(tmp_path))


def test_pre_4_52_transformers_keys_load(tmp_path):
    model = random_model(tiny_config())
    save_checkpoint(model, tmp_path, layout="hf")
    state = load_file(tmp_path / "model.safetensors")
    legacy = {}
    for (
        k,
        v,
    ) in state.items():  # the layout of InternVL3-*-hf checkpoints saved before transformers 4.52
        k = k.replace("model.language_model.", "language_model.model.").replace(
            "model.vision_tower.", "vision_tower."
        )
        k = k.replace("model.multi_modal_projector.", "multi_modal_projector.")
        legacy["language_model.lm_head.weight" if k == "lm_head.weight" else k] = v
    save_file(legacy, tmp_path / "model.safetensors")
    assert_same_weights(model, load_checkpoint(tmp_path))


def test_sharded_checkpoint_loads(tmp_path):
    model = random_model(tiny_config())
    save_checkpoint(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in shards.items():
        save_file({k: state[k] for k in part}, tmp_path / file)
    index = {"weight_map": {k: f for f, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_weights(model, load_checkpoint(tmp_path))


def test_dtype_cast_on_load(tmp_path):
    save_checkpoint(random_model(tiny_config(tied=True)), tmp_path)
    model = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight


# ---- bad checkpoints: every error names the problem -------------------------------------------------------


@pytest.fixture
def good(tmp_path) -> Path:
    save_checkpoint(random_model(tiny_config()), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_key_is_named(good):
    _edit_weights(good, lambda s: s.pop("mlp1.1.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: mlp1\.1\.weight"):
        load_checkpoint(good)


def test_unexpected_key_is_named(good):
    _edit_weights(good, lambda s: s.update({"vision_model.encoder.layers.9.ls1": torch.zeros(32)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected keys: vision_model\.encoder\.layers\.9\.ls1"
    ):
        load_checkpoint(good)


def test_wrong_shape_is_named(good):
    _edit_weights(good, lambda s: s.update({"mlp1.0.weight": torch.zeros(127)}))
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatches: mlp1\.0\.weight \(127,\) \(model expects \(128,\)\)",
    ):
        load_checkpoint(good)


def test_garbage_weights_file(good):
    (good / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
        load_checkpoint(good)


def test_pickle_weights_are_refused(good):
    (good / "model.safetensors").unlink()
    (good / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle files are never loaded"):
        load_checkpoint(good)


def test_unknown_config_field(good):
    raw = json.loads((good / "config.json").read_text())
    raw["vision"]["patch_sise"] = 14
    (good / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"unknown config field\(s\): vision\.patch_sise"):
        load_checkpoint(good)


def test_bad_config_json_and_unsupported_layouts(good):
    (good / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(good)
    (good / "config.json").write_text(
        json.dumps({"architectures": ["LlavaForConditionalGeneration"]})
    )
    with pytest.raises(
        ConfigError, match="unsupported architecture 'LlavaForConditionalGeneration'"
    ):
        load_checkpoint(good)
    official = VisionLanguageModel(tiny_config())
    save_checkpoint(official, good, layout="official")
    raw = json.loads((good / "config.json").read_text())
    raw["llm_config"]["architectures"] = ["Qwen2ForCausalLM"]
    (good / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="'Qwen2ForCausalLM' is not supported"):
        load_checkpoint(good)


def test_official_layout_refuses_a_router_the_release_cannot_hold(tmp_path):
    config = tiny_config(flash=True)
    config.flash.router_hidden_size = 16  # Tessera's narrower router (the tiny preset uses one)
    with pytest.raises(ConfigError, match="router_hidden_size=16 is a Tessera extension"):
        save_checkpoint(random_model(config), tmp_path / "official", layout="official")
    assert not (tmp_path / "official").exists()
    save_checkpoint(random_model(config), tmp_path / "hf", layout="hf")  # the hf layout keeps it
    assert load_config(tmp_path / "hf")[0] == config


def test_tied_head_that_differs_is_refused(tmp_path):
    save_checkpoint(random_model(tiny_config(tied=False)), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["language"]["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="stored LM head differs from embed_tokens"):
        load_checkpoint(tmp_path)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


# ---- the command ------------------------------------------------------------------------------------------


def test_cli_convert(good, tmp_path, capsys):
    assert cli(["convert", str(good), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "tessera layout" in capsys.readouterr().out
    assert load_config(tmp_path / "hf")[1] == "hf"
    assert (
        cli(["convert", str(good), str(tmp_path / "hf"), "--to", "hf"]) == 2
    )  # refuses to overwrite
    assert "--force" in capsys.readouterr().out
    (good / "model.safetensors").write_bytes(b"junk")
    assert cli(["convert", str(good), str(tmp_path / "x"), "--to", "tessera"]) == 1
    assert "not a valid safetensors file" in capsys.readouterr().out


def test_cli_convert_casts_to_bfloat16_and_carries_the_critic(good, tmp_path):
    from tessera.best_of_n import Critic, CriticConfig

    Critic(CriticConfig()).save(good / "critic")
    assert (
        cli(
            ["convert", str(good), str(tmp_path / "bf16"), "--to", "tessera", "--dtype", "bfloat16"]
        )
        == 0
    )
    Critic.load(tmp_path / "bf16")
    src, half = load_checkpoint(good), load_checkpoint(tmp_path / "bf16")
    for (name, a), (_, b) in zip(src.state_dict().items(), half.state_dict().items()):
        assert b.dtype == torch.bfloat16, name
        assert torch.equal(a.to(torch.bfloat16), b), name
