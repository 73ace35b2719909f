"""Typed configs for every component, the presets, and strict (de)serialisation to config.json.

One dataclass per component; derived values are properties, never stored. `ModelConfig.from_dict`
rejects unknown fields and inconsistent values with a message that names them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tessera.geometry import tokens_per_tile


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
        _require(
            self.hidden_size % self.num_heads == 0,
            "vision.hidden_size must be divisible by vision.num_heads",
        )
        _require(
            self.image_size % self.patch_size == 0,
            "vision.image_size must be a multiple of vision.patch_size",
        )
        _require(
            self.norm_type in ("layer_norm", "rms_norm"),
            f"vision.norm_type {self.norm_type!r} is not layer_norm|rms_norm",
        )


ARCHITECTURES = ("qwen3", "qwen3_moe", "gpt_oss")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class RopeScaling:
    """RoPE frequency scaling: `default` (none) or `yarn` (GPT-OSS: factor 32 over 4096 original positions).

    `attention_factor` 0 means YaRN's default 0.1·ln(factor) + 1 (it scales cos and sin)."""

    rope_type: Literal["default", "yarn"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 0.0


@dataclass
class LanguageConfig:
    """The decoder. Defaults are Qwen3-0.6B (the LLM of InternVL3.5-1B).

    architecture: `qwen3` (dense), `qwen3_moe` (Qwen3-30B-A3B / 235B-A22B: sparse MoE MLPs) or `gpt_oss`
    (GPT-OSS-20B: MoE with clamped SwiGLU experts, attention sinks and biases, no q/k norm, sliding-window
    layers from `layer_types`, YaRN RoPE).
    """

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
    architecture: Literal["qwen3", "qwen3_moe", "gpt_oss"] = "qwen3"
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # mixture of experts (qwen3_moe, gpt_oss)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # qwen3_moe expert width (gpt_oss experts use intermediate_size)
    norm_topk_prob: bool = (
        True  # qwen3_moe: renormalise the top-k routing probabilities to sum to 1
    )
    decoder_sparse_step: int = 1  # qwen3_moe: layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in training
    # gpt_oss
    sliding_window: int = 0  # keys a sliding layer sees (its own position included)
    layer_types: list[str] = field(
        default_factory=list
    )  # per layer full_attention | sliding_attention; [] = full
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @property
    def qk_norm(self) -> bool:
        return self.architecture != "gpt_oss"

    @property
    def attention_bias(self) -> bool:
        return self.architecture == "gpt_oss"

    @property
    def attention_sinks(self) -> bool:
        return self.architecture == "gpt_oss"

    @property
    def is_moe(self) -> bool:
        return self.architecture != "qwen3"

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has a mixture-of-experts MLP."""
        if self.architecture == "gpt_oss":
            return True
        return (
            self.architecture == "qwen3_moe"
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def window(self, layer_idx: int) -> int:
        """The sliding window of layer `layer_idx`, 0 for a full-attention layer."""
        if self.layer_types and self.layer_types[layer_idx] == "sliding_attention":
            return self.sliding_window
        return 0

    def validate(self) -> None:
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "language.num_heads must be a multiple of language.num_kv_heads",
        )
        _require(self.head_dim % 2 == 0, "language.head_dim must be even (RoPE rotates pairs)")
        _require(
            self.architecture in ARCHITECTURES,
            f"language.architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}",
        )
        _require(
            self.rope_scaling.rope_type in ("default", "yarn"),
            f"language.rope_scaling.rope_type {self.rope_scaling.rope_type!r} is not default|yarn",
        )
        if self.architecture == "qwen3":
            _require(
                self.num_experts == 0,
                "language.num_experts > 0 needs architecture qwen3_moe or gpt_oss",
            )
        else:
            _require(
                self.num_experts > 0 and 0 < self.num_experts_per_tok <= self.num_experts,
                f"language: a {self.architecture} model needs num_experts > 0 and 0 < num_experts_per_tok <= "
                f"num_experts (got {self.num_experts}, {self.num_experts_per_tok})",
            )
        if self.architecture == "qwen3_moe":
            _require(
                self.moe_intermediate_size > 0,
                "language.moe_intermediate_size must be > 0 for qwen3_moe",
            )
            _require(self.decoder_sparse_step >= 1, "language.decoder_sparse_step must be >= 1")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
            _require(not bad, f"language.mlp_only_layers {bad} outside [0, {self.num_layers})")
        if self.layer_types:
            _require(
                len(self.layer_types) == self.num_layers,
                f"language.layer_types has {len(self.layer_types)} entries for {self.num_layers} layers",
            )
            odd = sorted(set(self.layer_types) - set(LAYER_TYPES))
            _require(
                not odd,
                f"language.layer_types: unknown type(s) {odd} (use {', '.join(LAYER_TYPES)})",
            )
            _require(
                "sliding_attention" not in self.layer_types or self.sliding_window > 0,
                "language: sliding_attention layers need sliding_window > 0",
            )


@dataclass
class FlashConfig:
    """InternVL3.5-Flash: the Visual Resolution Router and the 1/16 branch (mlp2).

    `enabled=False` means a plain InternVL3.5 model (no mlp2, no router weights).
    A tile is compressed when p(compress) >= absolute_threshold and p(compress) is at or above the
    `relative_threshold` quantile of its image's tiles.
    """

    enabled: bool = False
    compressed_downsample_ratio: float = 0.25  # 1/16 of the patch tokens
    router_hidden_size: int = (
        0  # 0 → vision.hidden_size (released: no projection, the router works at Cv)
    )
    router_num_blocks: int = 4  # residual MLP blocks of `gating` (released: block1..block4)
    router_num_queries: int = 1  # learned pooling queries (released: one, `query_token` [1, Cv])
    router_num_heads: int = 16  # heads of the pooling cross-attention (released: 16)
    relative_threshold: float = 0.5
    absolute_threshold: float = 0.5
    # Tessera's question-aware router (tessera.model.question_router; absent from released checkpoints): the
    # same pooling and gating, conditioned on a text embedding of the question. Its own thresholds, same rule.
    question_router: bool = False
    question_relative_threshold: float = 0.0
    question_absolute_threshold: float = 0.5

    def validate(self) -> None:
        for name in (
            "relative_threshold",
            "absolute_threshold",
            "question_relative_threshold",
            "question_absolute_threshold",
        ):
            value = getattr(self, name)
            _require(0.0 <= value <= 1.0, f"flash.{name} must lie in [0, 1], got {value}")
        _require(
            self.enabled or not self.question_router,
            "flash.question_router needs flash.enabled (it routes between mlp1 and mlp2)",
        )


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
        return tokens_per_tile(
            self.vision.image_size, self.vision.patch_size, self.downsample_ratio
        )

    @property
    def compressed_tokens_per_tile(self) -> int:
        return tokens_per_tile(
            self.vision.image_size, self.vision.patch_size, self.flash.compressed_downsample_ratio
        )

    def validate(self) -> ModelConfig:
        self.vision.validate()
        self.language.validate()
        self.flash.validate()
        for name, ratio in (
            ("downsample_ratio", self.downsample_ratio),
            ("flash.compressed_downsample_ratio", self.flash.compressed_downsample_ratio),
        ):
            try:
                tokens_per_tile(self.vision.image_size, self.vision.patch_size, ratio)
            except ValueError as e:
                raise ConfigError(f"{name}={ratio}: {e}") from None
        _require(
            1 <= self.min_tiles <= self.max_tiles,
            f"need 1 <= min_tiles ({self.min_tiles}) <= max_tiles ({self.max_tiles})",
        )
        _require(
            0 <= self.image_context_token_id < self.language.vocab_size,
            f"image_context_token_id {self.image_context_token_id} outside vocab_size {self.language.vocab_size}",
        )
        _require(
            -self.vision.num_layers <= self.select_layer < self.vision.num_layers,
            f"select_layer {self.select_layer} out of range for {self.vision.num_layers} ViT layers",
        )
        return self

    # ---- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _build(cls, data, "").validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
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
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} must be an object, got {type(data).__name__}"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [prefix + k for k in data if k not in names]
    for name, value in data.items():
        sub = _SUBCONFIGS.get((cls, name))
        if sub:
            unknown += _unknown_fields(sub, value, f"{prefix}{name}.")
    return unknown


_SUBCONFIGS = {
    (ModelConfig, "vision"): VisionConfig,
    (ModelConfig, "language"): LanguageConfig,
    (ModelConfig, "flash"): FlashConfig,
    (LanguageConfig, "rope_scaling"): RopeScaling,
}


# ---- presets ------------------------------------------------------------------------------------


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> LanguageConfig:
    return LanguageConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=tied,
    )


def _qwen3_moe(
    hidden: int, intermediate: int, expert: int, layers: int, heads: int
) -> LanguageConfig:
    """A Qwen3-MoE decoder: 128 experts, top-8, renormalised, every layer sparse, 4 KV heads, untied head."""
    return LanguageConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=4,
        head_dim=128,
        tie_word_embeddings=False,
        architecture="qwen3_moe",
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=expert,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        router_aux_loss_coef=0.001,
    )


def _gpt_oss_20b() -> LanguageConfig:
    """GPT-OSS-20B (transformers' GptOssConfig with num_hidden_layers 24, num_local_experts 32)."""
    return LanguageConfig(
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_layers=24,
        num_heads=64,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=150_000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        architecture="gpt_oss",
        rope_scaling=RopeScaling(
            rope_type="yarn",
            factor=32.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
        ),
        num_experts=32,
        num_experts_per_tok=4,
        router_aux_loss_coef=0.9,
        sliding_window=128,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
    )


def _intern_vit_6b() -> VisionConfig:
    """InternViT-6B-448px-V2.5, the tower of InternVL3.5-38B and -241B-A28B."""
    return VisionConfig(
        hidden_size=3200,
        num_layers=45,
        num_heads=25,
        intermediate_size=12800,
        norm_type="rms_norm",
        qkv_bias=False,
        qk_normalization=True,
    )


_REAL_LLMS = {
    # InternVL3.5 size → its decoder (dense: hidden, intermediate, layers, heads, tied head)
    "1b": _qwen3(1024, 3072, 28, 16, True),  # Qwen3-0.6B
    "2b": _qwen3(2048, 6144, 28, 16, True),  # Qwen3-1.7B
    "4b": _qwen3(2560, 9728, 36, 32, True),  # Qwen3-4B
    "8b": _qwen3(4096, 12288, 36, 32, False),  # Qwen3-8B
    "14b": _qwen3(5120, 17408, 40, 40, False),  # Qwen3-14B
    "38b": _qwen3(5120, 25600, 64, 64, False),  # Qwen3-32B
    "20b-a4b": _gpt_oss_20b(),  # GPT-OSS-20B
    "30b-a3b": _qwen3_moe(2048, 6144, 768, 48, 32),  # Qwen3-30B-A3B
    "241b-a28b": _qwen3_moe(4096, 12288, 1536, 94, 64),  # Qwen3-235B-A22B
}
_VIT_6B_SIZES = ("38b", "241b-a28b")  # the rest use InternViT-300M (VisionConfig's defaults)
_NO_FLASH = ("20b-a4b",)  # Flash (ViR) checkpoints are released for the Qwen3-based sizes only
_GPT_OSS_TEMPLATE = "internvl3_5_gpt_oss"


def tiny_config() -> ModelConfig:
    """The world's model: 112 px tiles (8×8 patches → 16 tokens at 1/4, 4 at 1/16), trainable on 2 CPU cores."""
    return ModelConfig(
        vision=VisionConfig(
            image_size=112,
            patch_size=14,
            hidden_size=192,
            num_layers=6,
            num_heads=3,
            intermediate_size=768,
        ),
        # sized so that the Flash model fits 15 MiB in bf16 (7.7 M parameters): the world's tokenizer needs < 512
        # ids, a 2× MLP suffices for its short answers, and the router works at half the ViT width
        language=LanguageConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            rope_theta=10_000.0,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        ),
        flash=FlashConfig(enabled=True, router_hidden_size=64),
        max_tiles=6,
        image_context_token_id=3,  # fixed by tessera.chat's special-token order
        preset="tiny",
    )


def preset(name: str) -> ModelConfig:
    """A named preset: `tiny`, or `internvl3_5-<size>[-flash]` for the nine InternVL3.5 sizes (see PRESETS)."""
    if name == "tiny":
        return tiny_config().validate()
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    base, flash = (name[: -len("-flash")], True) if name.endswith("-flash") else (name, False)
    size = base.removeprefix("internvl3_5-")
    language = copy.deepcopy(_REAL_LLMS[size])
    vision = _intern_vit_6b() if size in _VIT_6B_SIZES else VisionConfig()
    template = _GPT_OSS_TEMPLATE if language.architecture == "gpt_oss" else "internvl2_5"
    return ModelConfig(
        vision=vision,
        language=language,
        flash=FlashConfig(enabled=flash),
        template=template,
        preset=name,
    ).validate()


PRESETS = ["tiny"] + [
    f"internvl3_5-{s}{f}" for s in _REAL_LLMS for f in (("",) if s in _NO_FLASH else ("", "-flash"))
]
