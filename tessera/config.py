"""Typed configs for every component, the presets, and strict (de)serialisation to config.json.

One dataclass per component; derived values are properties, never stored. `ModelConfig.from_dict`
rejects unknown fields and inconsistent values with a message that names them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """An invalid, inconsistent or unknown configuration field."""


@dataclass
class VisionConfig:
    """InternViT. Defaults are InternViT-300M-448px-V2.5 (the tower of InternVL3.5-1B..8B)."""

    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    qkv_bias: bool = True
    qk_normalization: bool = False
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.1  # official `initializer_factor`: initial value of ls1 / ls2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> None:
        _require(self.hidden_size % self.num_heads == 0, "vision.hidden_size must be divisible by vision.num_heads")
        _require(self.image_size % self.patch_size == 0, "vision.image_size must be a multiple of vision.patch_size")
        _require(self.norm_type in ("layer_norm", "rms_norm"), f"vision.norm_type {self.norm_type!r} is not layer_norm|rms_norm")


@dataclass
class LanguageConfig:
    """Qwen3-style decoder. Defaults are Qwen3-0.6B (the LLM of InternVL3.5-1B)."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True

    def validate(self) -> None:
        _require(self.num_heads % self.num_kv_heads == 0, "language.num_heads must be a multiple of language.num_kv_heads")
        _require(self.head_dim % 2 == 0, "language.head_dim must be even (RoPE rotates pairs)")


@dataclass
class FlashConfig:
    """InternVL3.5-Flash: the Visual Resolution Router and the 1/16 branch (mlp2).

    `enabled=False` means a plain InternVL3.5 model (no mlp2, no router weights).
    A tile is compressed when p(compress) >= absolute_threshold and p(compress) is at or above the
    `relative_threshold` quantile of its image's tiles.
    """

    enabled: bool = False
    compressed_downsample_ratio: float = 0.25  # 1/16 of the patch tokens
    router_hidden_size: int = 0  # 0 → vision.hidden_size (released: no projection, the router works at Cv)
    router_num_blocks: int = 4  # residual MLP blocks of `gating` (released: block1..block4)
    router_num_queries: int = 1  # learned pooling queries (released: one, `query_token` [1, Cv])
    router_num_heads: int = 16  # heads of the pooling cross-attention (released: 16)
    relative_threshold: float = 0.5
    absolute_threshold: float = 0.5


@dataclass
class ModelConfig:
    """The whole InternVL3.5 model: ViT → pixel shuffle → MLP → LLM, plus tiling and prompt settings."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    flash: FlashConfig = field(default_factory=FlashConfig)
    downsample_ratio: float = 0.5  # pixel shuffle at 1/4 of the patch tokens
    select_layer: int = -1  # ViT layer whose output feeds the connector
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    template: str = "internvl2_5"
    # token ids fixed by the tokenizer shipped with the checkpoint
    image_context_token_id: int = 151671
    preset: str = ""

    @property
    def tile_size(self) -> int:
        return self.vision.image_size

    @property
    def tokens_per_tile(self) -> int:
        from tessera.geometry import tokens_per_tile

        return tokens_per_tile(self.vision.image_size, self.vision.patch_size, self.downsample_ratio)

    @property
    def compressed_tokens_per_tile(self) -> int:
        from tessera.geometry import tokens_per_tile

        return tokens_per_tile(self.vision.image_size, self.vision.patch_size, self.flash.compressed_downsample_ratio)

    def validate(self) -> "ModelConfig":
        self.vision.validate()
        self.language.validate()
        from tessera.geometry import tokens_per_tile

        for name, ratio in (("downsample_ratio", self.downsample_ratio), ("flash.compressed_downsample_ratio", self.flash.compressed_downsample_ratio)):
            try:
                tokens_per_tile(self.vision.image_size, self.vision.patch_size, ratio)
            except ValueError as e:
                raise ConfigError(f"{name}={ratio}: {e}") from None
        _require(1 <= self.min_tiles <= self.max_tiles, f"need 1 <= min_tiles ({self.min_tiles}) <= max_tiles ({self.max_tiles})")
        _require(0 <= self.image_context_token_id < self.language.vocab_size,
                 f"image_context_token_id {self.image_context_token_id} outside vocab_size {self.language.vocab_size}")
        _require(-self.vision.num_layers <= self.select_layer < self.vision.num_layers,
                 f"select_layer {self.select_layer} out of range for {self.vision.num_layers} ViT layers")
        return self

    # ---- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _build(cls, data, "").validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _build(cls: type, data: dict[str, Any], prefix: str):
    """Recursively build a dataclass from a dict; every unknown field, at any depth, is named in one error."""
    unknown = _unknown_fields(cls, data, prefix)
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        sub = _SUBCONFIGS.get((cls, name))
        kwargs[name] = _build(sub, value, f"{prefix}{name}.") if sub else value
    return cls(**kwargs)


def _unknown_fields(cls: type, data: Any, prefix: str) -> list[str]:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [prefix + k for k in data if k not in names]
    for name, value in data.items():
        sub = _SUBCONFIGS.get((cls, name))
        if sub:
            unknown += _unknown_fields(sub, value, f"{prefix}{name}.")
    return unknown


_SUBCONFIGS = {(ModelConfig, "vision"): VisionConfig, (ModelConfig, "language"): LanguageConfig, (ModelConfig, "flash"): FlashConfig}


# ---- presets ------------------------------------------------------------------------------------

def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> LanguageConfig:
    return LanguageConfig(hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads,
                          num_kv_heads=8, head_dim=128, tie_word_embeddings=tied)


_REAL_LLMS = {
    # InternVL3.5 size → Qwen3 decoder (hidden, intermediate, layers, heads, tied head)
    "1b": _qwen3(1024, 3072, 28, 16, True),  # Qwen3-0.6B
    "2b": _qwen3(2048, 6144, 28, 16, True),  # Qwen3-1.7B
    "4b": _qwen3(2560, 9728, 36, 32, True),  # Qwen3-4B
    "8b": _qwen3(4096, 12288, 36, 32, False),  # Qwen3-8B
}


def tiny_config() -> ModelConfig:
    """The world's model: 112 px tiles (8×8 patches → 16 tokens at 1/4, 4 at 1/16), trainable on 2 CPU cores."""
    return ModelConfig(
        vision=VisionConfig(image_size=112, patch_size=14, hidden_size=192, num_layers=6, num_heads=3, intermediate_size=768),
        # sized so that the Flash model fits 15 MiB in bf16 (7.7 M parameters): the world's tokenizer needs < 512
        # ids, a 2× MLP suffices for its short answers, and the router works at half the ViT width
        language=LanguageConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4,
                                num_kv_heads=2, head_dim=64, rope_theta=10_000.0, max_position_embeddings=2048,
                                tie_word_embeddings=True),
        flash=FlashConfig(enabled=True, router_hidden_size=64),
        max_tiles=6,
        image_context_token_id=3,  # fixed by tessera.chat's special-token order
        preset="tiny",
    )


def preset(name: str) -> ModelConfig:
    """A named preset: `tiny`, or `internvl3_5-{1b,2b,4b,8b}[-flash]`."""
    if name == "tiny":
        return tiny_config().validate()
    base, flash = (name[: -len("-flash")], True) if name.endswith("-flash") else (name, False)
    size = base.removeprefix("internvl3_5-")
    if not base.startswith("internvl3_5-") or size not in _REAL_LLMS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    language = dataclasses.replace(_REAL_LLMS[size])
    return ModelConfig(language=language, flash=FlashConfig(enabled=flash), preset=name).validate()


PRESETS = ["tiny"] + [f"internvl3_5-{s}{f}" for s in _REAL_LLMS for f in ("", "-flash")]
