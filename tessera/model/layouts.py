"""Checkpoint layouts: config.json ⇄ ModelConfig and state-dict key maps.

Three layouts, told apart by config.json:
- tessera: our `ModelConfig` as JSON; keys are `VisionLanguageModel.state_dict()` names.
- official (OpenGVLab InternVL3.5, `architectures: ["InternVLChatModel"]`): `vision_config` + `llm_config`;
  keys vision_model.*, mlp1.*, (mlp2.*, pooling_before_gating.*, gating.* for Flash), language_model.model.*,
  language_model.lm_head.weight. Our module names are the official ones, so the key map is the identity.
- hf (transformers, `architectures: ["InternVLForConditionalGeneration"]`): `vision_config` + `text_config`;
  keys model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.weight, with the
  ViT's fused qkv split into q/k/v_proj (transformers' convert_internvl_weights_to_hf.py). Flash-only weights
  use the transformers InternvlFlash port's names (tessera.model.router). Checkpoints saved before
  transformers 4.52 (vision_tower.*, language_model.model.*, language_model.lm_head.*) are read too.

Fields a layout cannot express (the preset name, router sizes, tiling limits for hf) travel in a
`tessera_config` block inside config.json; the layout's own fields always win over it.

Tessera's question-aware router (tessera.model.question_router) has no counterpart in either released layout.
It travels under its own Tessera-only prefix, with its tensors under Tessera's names: `question_router.*` at the
top level of the official layout, `model.question_router.*` in the hf layout (InternVL's and transformers'
loaders report such keys as unused and ignore them). Its weights switch it on when a checkpoint is read
(`flash.question_router`), and its thresholds travel in `tessera_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tessera.config import (
    ConfigError,
    FlashConfig,
    LanguageConfig,
    ModelConfig,
    RopeScaling,
    VisionConfig,
)
from tessera.model.router import flash_hf_to_official, flash_official_to_hf

OFFICIAL_ARCH = "InternVLChatModel"
HF_ARCH = "InternVLForConditionalGeneration"
QWEN3_IMG_CONTEXT_ID = 151671  # <IMG_CONTEXT> in the InternVL3.5 (Qwen3) tokenizer
FLASH_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")
QUESTION_ROUTER_PREFIX = "question_router."  # Tessera-only: the question-aware router's keys
QUESTION_ROUTER_FIELDS = ("question_relative_threshold", "question_absolute_threshold")


def detect_layout(raw: dict[str, Any]) -> str:
    """'tessera', 'official' or 'hf' from a parsed config.json."""
    archs = raw.get("architectures")
    if archs is None:
        return "tessera"
    if not isinstance(archs, list) or not archs:
        raise ConfigError(f"config.json: 'architectures' must be a non-empty list, got {archs!r}")
    if archs[0] == OFFICIAL_ARCH:
        return "official"
    if archs[0] == HF_ARCH:
        return "hf"
    raise ConfigError(
        f"config.json: unsupported architecture {archs[0]!r} (expected {OFFICIAL_ARCH} or {HF_ARCH})"
    )


# ---- config: shared pieces ----------------------------------------------------------------------------


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise ConfigError(f"config.json: {where}.{key} is missing")
    return d[key]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.json: {message}")


# llm_config.architectures[0] (official) / text_config.model_type (hf) → LanguageConfig.architecture
LLM_ARCHS = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
}
_ARCH_NAMES = {v: k for k, v in LLM_ARCHS.items()}


def _rope(d: dict, where: str, architecture: str) -> tuple[float, RopeScaling]:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    default_theta = 150_000.0 if architecture == "gpt_oss" else 10_000.0
    theta = float(d.get("rope_theta", rope.get("rope_theta", default_theta)))
    if kind == "default":
        return theta, RopeScaling()
    _check(
        kind == "yarn",
        f"{where}: RoPE scaling {rope!r} is not supported (Tessera implements default and yarn)",
    )
    _check(
        not rope.get("mscale") and not rope.get("mscale_all_dim"),
        f"{where}: YaRN mscale is not supported",
    )
    return theta, RopeScaling(
        rope_type="yarn",
        factor=float(_need(rope, "factor", f"{where}.rope_scaling")),
        original_max_position_embeddings=int(
            _need(rope, "original_max_position_embeddings", f"{where}.rope_scaling")
        ),
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        truncate=bool(rope.get("truncate", True)),
        attention_factor=float(rope.get("attention_factor") or 0.0),
    )


def _qwen3_language(d: dict, where: str, architecture: str = "qwen3") -> LanguageConfig:
    """The LLM config (official `llm_config` or transformers `text_config`) of a Qwen3, Qwen3-MoE or GPT-OSS decoder."""
    heads = _need(d, "num_attention_heads", where)
    hidden = _need(d, "hidden_size", where)
    theta, scaling = _rope(d, where, architecture)
    _check(
        d.get("hidden_act", "silu") == "silu",
        f"{where}.hidden_act must be silu, got {d.get('hidden_act')!r}",
    )
    gpt_oss = architecture == "gpt_oss"
    _check(
        bool(d.get("attention_bias", gpt_oss)) == gpt_oss,
        f"{where}.attention_bias={d.get('attention_bias')} is not supported for {architecture} "
        f"({'GPT-OSS always has biases' if gpt_oss else 'Qwen3 has none'})",
    )
    _check(
        not d.get("use_sliding_window", False), f"{where}.use_sliding_window=True is not supported"
    )
    extra: dict[str, Any] = {}
    if architecture == "qwen3_moe":
        extra = dict(
            num_experts=d.get("num_experts", d.get("num_local_experts", 0)),
            num_experts_per_tok=_need(d, "num_experts_per_tok", where),
            moe_intermediate_size=_need(d, "moe_intermediate_size", where),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            decoder_sparse_step=d.get("decoder_sparse_step", 1),
            mlp_only_layers=list(d.get("mlp_only_layers") or []),
            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
        )
    elif gpt_oss:
        layers = _need(d, "num_hidden_layers", where)
        types = d.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ]
        extra = dict(
            num_experts=d.get("num_local_experts", d.get("num_experts", 0)),
            num_experts_per_tok=_need(d, "num_experts_per_tok", where),
            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
            sliding_window=d.get("sliding_window") or 0,
            layer_types=list(types),
            swiglu_alpha=d.get("swiglu_alpha", 1.702),
            swiglu_limit=d.get("swiglu_limit", 7.0),
        )
    return LanguageConfig(
        vocab_size=_need(d, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_need(d, "intermediate_size", where),
        num_layers=_need(d, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        rope_theta=theta,
        rms_norm_eps=d.get("rms_norm_eps", 1e-5 if gpt_oss else 1e-6),
        max_position_embeddings=d.get("max_position_embeddings", 131072 if gpt_oss else 40960),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        architecture=architecture,
        rope_scaling=scaling,
        **extra,
    )


def _qwen3_dict(lang: LanguageConfig) -> dict[str, Any]:
    """The LLM config in transformers' terms (Qwen3Config / Qwen3MoeConfig / GptOssConfig)."""
    out: dict[str, Any] = {
        "model_type": lang.architecture,
        "vocab_size": lang.vocab_size,
        "hidden_size": lang.hidden_size,
        "intermediate_size": lang.intermediate_size,
        "num_hidden_layers": lang.num_layers,
        "num_attention_heads": lang.num_heads,
        "num_key_value_heads": lang.num_kv_heads,
        "head_dim": lang.head_dim,
        "rope_theta": lang.rope_theta,
        "rms_norm_eps": lang.rms_norm_eps,
        "hidden_act": "silu",
        "max_position_embeddings": lang.max_position_embeddings,
        "tie_word_embeddings": lang.tie_word_embeddings,
        "attention_bias": lang.attention_bias,
    }
    if lang.architecture != "gpt_oss":
        out["use_sliding_window"] = False
    if lang.architecture == "qwen3_moe":
        out.update(
            num_experts=lang.num_experts,
            num_experts_per_tok=lang.num_experts_per_tok,
            moe_intermediate_size=lang.moe_intermediate_size,
            norm_topk_prob=lang.norm_topk_prob,
            decoder_sparse_step=lang.decoder_sparse_step,
            mlp_only_layers=list(lang.mlp_only_layers),
            router_aux_loss_coef=lang.router_aux_loss_coef,
        )
    elif lang.architecture == "gpt_oss":
        out.update(
            num_local_experts=lang.num_experts,
            num_experts_per_tok=lang.num_experts_per_tok,
            router_aux_loss_coef=lang.router_aux_loss_coef,
            sliding_window=lang.sliding_window or None,
            layer_types=list(lang.layer_types) or ["full_attention"] * lang.num_layers,
            swiglu_alpha=lang.swiglu_alpha,
            swiglu_limit=lang.swiglu_limit,
        )
    return out


def _rope_dict(lang: LanguageConfig) -> dict[str, Any]:
    """transformers' `rope_parameters` (also written as `rope_scaling` for older readers)."""
    r = lang.rope_scaling
    if r.rope_type == "default":
        return {"rope_type": "default", "rope_theta": lang.rope_theta}
    out = {
        "rope_type": "yarn",
        "rope_theta": lang.rope_theta,
        "factor": r.factor,
        "original_max_position_embeddings": r.original_max_position_embeddings,
        "beta_fast": r.beta_fast,
        "beta_slow": r.beta_slow,
        "truncate": r.truncate,
    }
    if r.attention_factor:
        out["attention_factor"] = r.attention_factor
    return out


def _overlay(derived: ModelConfig, raw: dict[str, Any], tiling_from_embedded: bool) -> ModelConfig:
    """Fill what the layout cannot express (preset, router sizes, and for hf the tiling) from `tessera_config`."""
    embedded = raw.get("tessera_config")
    if embedded is None:
        return derived.validate()
    base = ModelConfig.from_dict(embedded)
    kept = {
        f.name: getattr(base.flash, f.name)
        for f in dataclasses.fields(FlashConfig)
        if f.name.startswith("router_") or f.name in QUESTION_ROUTER_FIELDS
    }
    # weights switch the question router on; an embedded config that names it without them fails when the
    # weights are checked (tessera.model.checkpoint), rather than silently giving a model without it
    kept["question_router"] = derived.flash.question_router or base.flash.question_router
    for name in ("relative_threshold", "absolute_threshold"):  # written only for Flash models
        if f"flash_{name}" not in raw:
            kept[name] = getattr(base.flash, name)
    extra: dict[str, Any] = {"preset": base.preset}
    if tiling_from_embedded:
        extra.update(
            min_tiles=base.min_tiles,
            max_tiles=base.max_tiles,
            use_thumbnail=base.use_thumbnail,
            template=base.template,
        )
    return dataclasses.replace(
        derived, flash=dataclasses.replace(derived.flash, **kept), **extra
    ).validate()


def _flash(raw: dict[str, Any], keys: set[str], prefix: str, ratio: float) -> FlashConfig:
    """Flash settings: enabled by threshold fields in config.json or by Flash-only weights."""
    flash_keys = tuple(prefix + p for p in FLASH_PREFIXES)
    enabled = any(
        k in raw for k in ("flash_mode", "flash_relative_threshold", "flash_absolute_threshold")
    ) or any(k.startswith(flash_keys) for k in keys)
    blocks = len(
        {k[len(prefix) :].split(".")[1] for k in keys if k.startswith(prefix + "gating.block")}
    )
    return FlashConfig(
        enabled=enabled,
        compressed_downsample_ratio=ratio * ratio,
        relative_threshold=raw.get("flash_relative_threshold", 0.5),
        absolute_threshold=raw.get("flash_absolute_threshold", 0.5),
        question_router=any(k.startswith(prefix + QUESTION_ROUTER_PREFIX) for k in keys),
        **({"router_num_blocks": blocks} if blocks else {}),
    )


# ---- config: official ---------------------------------------------------------------------------------


def official_to_config(
    raw: dict[str, Any], keys: set[str], img_context_id: int | None
) -> ModelConfig:
    """ModelConfig from an official InternVL3.5 config.json (+ weight names, + tokenizer's <IMG_CONTEXT> id)."""
    v, l = _need(raw, "vision_config", "config"), _need(raw, "llm_config", "config")
    arch = (l.get("architectures") or ["?"])[0]
    _check(
        arch in LLM_ARCHS,
        f"llm_config architecture {arch!r} is not supported (Tessera implements "
        f"{', '.join(LLM_ARCHS)})",
    )
    _check(
        raw.get("ps_version", "v1") == "v2",
        f"ps_version {raw.get('ps_version', 'v1')!r} is not supported (InternVL3.5 uses v2)",
    )
    _check(
        v.get("hidden_act", "gelu") == "gelu",
        f"vision_config.hidden_act must be gelu, got {v.get('hidden_act')!r}",
    )
    vision = VisionConfig(
        image_size=raw.get("force_image_size") or _need(v, "image_size", "vision_config"),
        patch_size=_need(v, "patch_size", "vision_config"),
        num_channels=v.get("num_channels", 3),
        hidden_size=_need(v, "hidden_size", "vision_config"),
        num_layers=_need(v, "num_hidden_layers", "vision_config"),
        num_heads=_need(v, "num_attention_heads", "vision_config"),
        intermediate_size=_need(v, "intermediate_size", "vision_config"),
        # absent fields take the official InternVisionConfig defaults
        norm_type=v.get("norm_type", "rms_norm"),
        qkv_bias=v.get("qkv_bias", False),
        qk_normalization=v.get("qk_normalization", True),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        layer_scale_init=v.get("initializer_factor", 0.1),
    )
    ratio = raw.get("downsample_ratio", 0.5)
    if img_context_id is None:
        img_context_id = (raw.get("tessera_config") or {}).get(
            "image_context_token_id", QWEN3_IMG_CONTEXT_ID
        )
    derived = ModelConfig(
        vision=vision,
        language=_qwen3_language(l, "llm_config", LLM_ARCHS[arch]),
        flash=_flash(raw, keys, "", ratio),
        downsample_ratio=ratio,
        select_layer=raw.get("select_layer", -1),
        min_tiles=raw.get("min_dynamic_patch", 1),
        max_tiles=raw.get("max_dynamic_patch", 12),
        use_thumbnail=raw.get("use_thumbnail", True),
        template=raw.get("template") or "internvl2_5",
        image_context_token_id=img_context_id,
    )
    return _overlay(derived, raw, tiling_from_embedded=False)


def config_to_official(config: ModelConfig) -> dict[str, Any]:
    vc, lc, fc = config.vision, config.language, config.flash
    _check(
        not fc.enabled or abs(fc.compressed_downsample_ratio - config.downsample_ratio**2) < 1e-9,
        "the official layout fixes the Flash ratio to downsample_ratio² "
        f"({config.downsample_ratio**2}), this model uses {fc.compressed_downsample_ratio}",
    )
    if fc.enabled:  # the released Flash code builds exactly this router
        released = {
            "router_hidden_size": (0, vc.hidden_size),
            "router_num_queries": (1,),
            "router_num_blocks": (4,),
            "router_num_heads": (16,),
        }
        odd = [
            f"flash.{k}={getattr(fc, k)}"
            for k, ok in released.items()
            if getattr(fc, k, ok[0]) not in ok
        ]
        _check(
            not odd,
            f"the official layout holds only the released router; {', '.join(odd)} is a Tessera extension "
            "(use the tessera or hf layout)",
        )
    raw: dict[str, Any] = {
        "architectures": [OFFICIAL_ARCH],
        "model_type": "internvl_chat",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "image_size": vc.image_size,
            "patch_size": vc.patch_size,
            "num_channels": vc.num_channels,
            "hidden_size": vc.hidden_size,
            "num_hidden_layers": vc.num_layers,
            "num_attention_heads": vc.num_heads,
            "intermediate_size": vc.intermediate_size,
            "norm_type": vc.norm_type,
            "qkv_bias": vc.qkv_bias,
            "qk_normalization": vc.qk_normalization,
            "layer_norm_eps": vc.layer_norm_eps,
            "initializer_factor": vc.layer_scale_init,
            "hidden_act": "gelu",
            "use_flash_attn": False,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        },
        "llm_config": {
            "architectures": [_ARCH_NAMES[lc.architecture]],
            **_qwen3_dict(lc),
            **({"rope_scaling": _rope_dict(lc)} if lc.rope_scaling.rope_type != "default" else {}),
        },
        "select_layer": config.select_layer,
        "force_image_size": vc.image_size,
        "downsample_ratio": config.downsample_ratio,
        "template": config.template,
        "dynamic_image_size": True,
        "use_thumbnail": config.use_thumbnail,
        "ps_version": "v2",
        "min_dynamic_patch": config.min_tiles,
        "max_dynamic_patch": config.max_tiles,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "pad2square": False,
    }
    if fc.enabled:
        raw.update(
            flash_mode=True,
            flash_relative_threshold=fc.relative_threshold,
            flash_absolute_threshold=fc.absolute_threshold,
        )
    raw["tessera_config"] = config.to_dict()
    return raw


# ---- config: transformers -----------------------------------------------------------------------------


def hf_to_config(raw: dict[str, Any], keys: set[str]) -> ModelConfig:
    """ModelConfig from a transformers InternVLConfig config.json."""
    v, t = _need(raw, "vision_config", "config"), _need(raw, "text_config", "config")
    kinds = tuple(LLM_ARCHS.values())
    _check(
        t.get("model_type") in kinds,
        f"text_config.model_type {t.get('model_type')!r} is not supported (need one of {', '.join(kinds)})",
    )
    _check(
        v.get("use_mean_pooling", True),
        "vision_config.use_mean_pooling=False adds a final ViT LayerNorm that "
        "InternVL checkpoints do not have",
    )
    _check(
        v.get("use_absolute_position_embeddings", True),
        "vision_config.use_absolute_position_embeddings must be true",
    )
    _check(
        v.get("hidden_act", "gelu") == "gelu",
        f"vision_config.hidden_act must be gelu, got {v.get('hidden_act')!r}",
    )
    _check(raw.get("projector_hidden_act", "gelu") == "gelu", "projector_hidden_act must be gelu")
    _check(
        raw.get("vision_feature_select_strategy", "default") == "default",
        "vision_feature_select_strategy must be 'default' (drop the CLS token)",
    )
    layer = raw.get("vision_feature_layer", -1)
    _check(isinstance(layer, int), f"vision_feature_layer must be one int, got {layer!r}")

    def side(value, name):
        if isinstance(value, (list, tuple)):
            _check(
                len(value) == 2 and value[0] == value[1],
                f"vision_config.{name} must be square, got {value!r}",
            )
            return value[0]
        return value

    vision = VisionConfig(
        image_size=side(_need(v, "image_size", "vision_config"), "image_size"),
        patch_size=side(_need(v, "patch_size", "vision_config"), "patch_size"),
        num_channels=v.get("num_channels", 3),
        hidden_size=_need(v, "hidden_size", "vision_config"),
        num_layers=_need(v, "num_hidden_layers", "vision_config"),
        num_heads=_need(v, "num_attention_heads", "vision_config"),
        intermediate_size=_need(v, "intermediate_size", "vision_config"),
        norm_type=v.get("norm_type", "layer_norm"),
        qkv_bias=v.get("attention_bias", False),
        qk_normalization=v.get("use_qk_norm", False),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        layer_scale_init=v.get("layer_scale_init_value", 0.1),
    )
    language = _qwen3_language(t, "text_config", t["model_type"])
    language.tie_word_embeddings = bool(
        raw.get("tie_word_embeddings", t.get("tie_word_embeddings", True))
    )
    ratio = raw.get("downsample_ratio", 0.5)
    derived = ModelConfig(
        vision=vision,
        language=language,
        flash=_flash(raw, keys, "model.", ratio),
        downsample_ratio=ratio,
        select_layer=layer,
        image_context_token_id=_need(raw, "image_token_id", "config"),
    )
    return _overlay(derived, raw, tiling_from_embedded=True)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    vc, lc = config.vision, config.language
    text = _qwen3_dict(lc)
    text["rope_parameters"] = _rope_dict(lc)
    raw: dict[str, Any] = {
        "architectures": [HF_ARCH],
        "model_type": "internvl",
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": vc.hidden_size,
            "num_hidden_layers": vc.num_layers,
            "num_attention_heads": vc.num_heads,
            "intermediate_size": vc.intermediate_size,
            "image_size": [vc.image_size, vc.image_size],
            "patch_size": [vc.patch_size, vc.patch_size],
            "num_channels": vc.num_channels,
            "norm_type": vc.norm_type,
            "attention_bias": vc.qkv_bias,
            "use_qk_norm": vc.qk_normalization,
            "layer_norm_eps": vc.layer_norm_eps,
            "layer_scale_init_value": vc.layer_scale_init,
            "hidden_act": "gelu",
            # mean pooling True keeps the final ViT norm an Identity (InternViT has none); it is never used to pool here
            "use_mean_pooling": True,
            "use_absolute_position_embeddings": True,
            "use_mask_token": False,
            "hidden_dropout_prob": 0.0,
            "attention_dropout": 0.0,
            "projection_dropout": 0.0,
        },
        "text_config": text,
        "image_token_id": config.image_context_token_id,
        "image_seq_length": config.tokens_per_tile,
        "downsample_ratio": config.downsample_ratio,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": config.select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": lc.tie_word_embeddings,
    }
    if config.flash.enabled:
        raw.update(
            flash_relative_threshold=config.flash.relative_threshold,
            flash_absolute_threshold=config.flash.absolute_threshold,
        )
    raw["tessera_config"] = config.to_dict()
    return raw


# ---- keys: tessera ⇄ transformers ---------------------------------------------------------------------

_VIT_EMBED = {
    "class_embedding": "cls_token",
    "position_embedding": "position_embeddings",
    "patch_embedding.weight": "patch_embeddings.projection.weight",
    "patch_embedding.bias": "patch_embeddings.projection.bias",
}
_VIT_LAYER = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "ls1": "lambda_1",
    "ls2": "lambda_2",
    "attn.proj": "attention.projection_layer",
    "attn.q_norm": "attention.q_norm",
    "attn.k_norm": "attention.k_norm",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_PROJ = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
_VT, _HVT = "vision_model.", "model.vision_tower."


def _swap_prefix(rest: str, table: dict[str, str]) -> str | None:
    """Rename the leading component(s) of `rest` using `table` (longest match wins)."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old) :]
    return None


def tessera_to_hf_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    flash: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = None
        if key.startswith(_VT + "embeddings."):
            rest = _swap_prefix(key[len(_VT + "embeddings.") :], _VIT_EMBED)
            new = rest and _HVT + "embeddings." + rest
        elif key.startswith(_VT + "encoder.layers."):
            idx, rest = key[len(_VT + "encoder.layers.") :].split(".", 1)
            head = f"{_HVT}encoder.layer.{idx}."
            if rest.startswith("attn.qkv."):
                suffix = rest[len("attn.qkv.") :]
                for name, part in zip(
                    ("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)
                ):  # [3C, ...] → 3 × [C, ...]
                    out[f"{head}attention.{name}.{suffix}"] = part.clone()
                continue
            rest = _swap_prefix(rest, _VIT_LAYER)
            new = rest and head + rest
        elif key.startswith("mlp1."):
            rest = _swap_prefix(key[len("mlp1.") :], _PROJ)
            new = rest and "model.multi_modal_projector." + rest
        elif key.startswith("language_model.model."):
            new = "model.language_model." + key[len("language_model.model.") :]
        elif key == "language_model.lm_head.weight":
            new = "lm_head.weight"
        elif key.startswith(FLASH_PREFIXES):
            flash[key] = value
            continue
        elif key.startswith(QUESTION_ROUTER_PREFIX):  # Tessera-only: its own names under `model.`
            new = "model." + key
        if new is None:
            raise KeyError(f"no transformers name for tessera key {key!r}")
        out[new] = value
    out.update(flash_official_to_hf(flash) if flash else {})
    return out


def _modernise_hf_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys saved before transformers 4.52 (no `model.` prefix) → current names."""
    if not any(
        k.startswith(("vision_tower.", "multi_modal_projector.", "language_model.")) for k in state
    ):
        return state
    out = {}
    for key, value in state.items():
        if key.startswith(("vision_tower.", "multi_modal_projector.")):
            key = "model." + key
        elif key.startswith("language_model.model."):
            key = "model.language_model." + key[len("language_model.model.") :]
        elif key == "language_model.lm_head.weight":
            key = "lm_head.weight"
        out[key] = value
    return out


def hf_to_tessera_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers keys → tessera keys. Returns (mapped, names that have no tessera counterpart)."""
    state = _modernise_hf_keys(state)
    inv_embed = {v: k for k, v in _VIT_EMBED.items()}
    inv_layer = {v: k for k, v in _VIT_LAYER.items()}
    inv_proj = {v: k for k, v in _PROJ.items()}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    flash: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = None
        if key.startswith(_HVT + "embeddings."):
            rest = _swap_prefix(key[len(_HVT + "embeddings.") :], inv_embed)
            new = rest and _VT + "embeddings." + rest
        elif key.startswith(_HVT + "encoder.layer."):
            idx, rest = key[len(_HVT + "encoder.layer.") :].split(".", 1)
            name, _, suffix = rest.rpartition(".")
            if name in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
                qkv.setdefault((idx, suffix), {})[name[len("attention.") :]] = value
                continue
            rest = _swap_prefix(rest, inv_layer)
            new = rest and f"{_VT}encoder.layers.{idx}.{rest}"
        elif key.startswith("model.multi_modal_projector."):
            rest = _swap_prefix(key[len("model.multi_modal_projector.") :], inv_proj)
            new = rest and "mlp1." + rest
        elif key.startswith("model.language_model."):
            new = "language_model.model." + key[len("model.language_model.") :]
        elif key == "lm_head.weight":
            new = "language_model.lm_head.weight"
        elif key.startswith(tuple("model." + p for p in FLASH_PREFIXES)):
            flash[key] = value
            continue
        elif key.startswith("model." + QUESTION_ROUTER_PREFIX):
            new = key[len("model.") :]
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    for (idx, suffix), parts in sorted(qkv.items()):
        missing = [p for p in ("q_proj", "k_proj", "v_proj") if p not in parts]
        if missing:
            unknown += [
                f"{_HVT}encoder.layer.{idx}.attention.{p}.{suffix} (missing its {', '.join(missing)})"
                for p in parts
            ]
            continue
        out[f"{_VT}encoder.layers.{idx}.attn.qkv.{suffix}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]]
        )
    if flash:
        try:
            out.update(flash_hf_to_official(flash))
        except KeyError as e:
            unknown.append(str(e.args[0]))
    return out, unknown
