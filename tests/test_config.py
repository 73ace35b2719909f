"""Configs: presets carry the real InternVL3.5 shapes; config.json round-trips; bad fields are named."""

import json

import pytest

from tessera.config import PRESETS, ConfigError, ModelConfig, preset


@pytest.mark.parametrize(
    "name, hidden, layers, heads, tied",
    [
        ("internvl3_5-1b", 1024, 28, 16, True),  # Qwen3-0.6B
        ("internvl3_5-2b", 2048, 28, 16, True),  # Qwen3-1.7B
        ("internvl3_5-4b", 2560, 36, 32, True),  # Qwen3-4B
        ("internvl3_5-8b", 4096, 36, 32, False),  # Qwen3-8B
    ],
)
def test_real_presets_pair_internvit_300m_with_qwen3(name, hidden, layers, heads, tied):
    c = preset(name)
    assert (c.vision.hidden_size, c.vision.num_layers, c.vision.num_heads, c.vision.patch_size) == (
        1024,
        24,
        16,
        14,
    )
    assert (c.language.hidden_size, c.language.num_layers, c.language.num_heads) == (
        hidden,
        layers,
        heads,
    )
    assert (c.language.num_kv_heads, c.language.head_dim, c.language.tie_word_embeddings) == (
        8,
        128,
        tied,
    )
    assert (c.tokens_per_tile, c.compressed_tokens_per_tile) == (256, 64)
    assert not c.flash.enabled and preset(name + "-flash").flash.enabled


def test_tiny_preset_geometry():
    c = preset("tiny")
    assert (c.tile_size, c.tokens_per_tile, c.compressed_tokens_per_tile, c.max_tiles) == (
        112,
        16,
        4,
        6,
    )


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_round_trips_through_config_json(tmp_path, name):
    c = preset(name)
    c.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == c


def test_unknown_fields_are_named_with_their_path():
    data = preset("tiny").to_dict()
    data["language"]["rope_kind"] = 2
    data["colour"] = "red"
    with pytest.raises(ConfigError, match=r"colour, language\.rope_kind"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    "section, field, value, message",
    [
        ("vision", "num_heads", 5, "divisible"),
        ("language", "num_kv_heads", 3, "multiple of language.num_kv_heads"),
        (None, "downsample_ratio", 0.3, "downsample_ratio"),
        (None, "max_tiles", 0, "min_tiles"),
        (None, "image_context_token_id", 5000, "outside vocab_size"),
    ],
)
def test_inconsistent_values_fail_with_a_message(section, field, value, message):
    data = preset("tiny").to_dict()
    (data[section] if section else data)[field] = value
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_bad_json_and_unknown_preset(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("internvl3_5-20b-a4b-flash")  # no Flash variant of the GPT-OSS model
    assert json.loads(json.dumps(preset("tiny").to_dict()))["preset"] == "tiny"
