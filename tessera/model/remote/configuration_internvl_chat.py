"""Configuration of an InternVL3.5 checkpoint in the official layout (`InternVLChatModel`), for
loaders that read it with `trust_remote_code` (transformers' AutoConfig, vLLM). Written by Tessera
for its exports; it depends on transformers only, and holds configuration, not a model.

config.json carries `vision_config` (InternViT), `llm_config` (a Qwen3 / Qwen3-MoE / GPT-OSS config,
chosen by its `architectures[0]`) and the InternVL fields (tiling, pixel shuffle, template, Flash
thresholds).
"""

from transformers import AutoConfig, PretrainedConfig

_LLM_TYPES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}


class InternVisionConfig(PretrainedConfig):
    """InternViT: patch embedding, pre-norm blocks with layer scale, no final norm; CLS token
    dropped after."""

    model_type = "intern_vit_6b"

    def __init__(
        self,
        num_channels=3,
        patch_size=14,
        image_size=448,
        qkv_bias=False,
        hidden_size=1024,
        num_attention_heads=16,
        intermediate_size=4096,
        qk_normalization=False,
        num_hidden_layers=24,
        use_flash_attn=False,
        hidden_act="gelu",
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        dropout=0.0,
        drop_path_rate=0.0,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_channels, self.patch_size, self.image_size = num_channels, patch_size, image_size
        self.qkv_bias, self.qk_normalization, self.norm_type = qkv_bias, qk_normalization, norm_type
        self.hidden_size, self.num_attention_heads = hidden_size, num_attention_heads
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.use_flash_attn, self.hidden_act, self.layer_norm_eps = (
            use_flash_attn,
            hidden_act,
            layer_norm_eps,
        )
        self.dropout, self.drop_path_rate, self.attention_dropout = (
            dropout,
            drop_path_rate,
            attention_dropout,
        )
        self.initializer_range, self.initializer_factor = initializer_range, initializer_factor


def _llm_config(llm_config):
    if isinstance(llm_config, PretrainedConfig):
        return llm_config
    llm_config = dict(llm_config or {})
    arch = (llm_config.get("architectures") or ["Qwen3ForCausalLM"])[0]
    if arch not in _LLM_TYPES:
        raise ValueError(f"llm_config architecture {arch!r} is not one of {', '.join(_LLM_TYPES)}")
    llm_config.pop("model_type", None)
    return AutoConfig.for_model(_LLM_TYPES[arch], **llm_config)


class InternVLChatConfig(PretrainedConfig):
    """InternViT → pixel shuffle → MLP projector → LLM, with dynamic tiling (and Flash routing
    fields)."""

    model_type = "internvl_chat"
    is_composition = True
    sub_configs = {"vision_config": InternVisionConfig, "llm_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        llm_config=None,
        use_backbone_lora=0,
        use_llm_lora=0,
        select_layer=-1,
        force_image_size=None,
        downsample_ratio=0.5,
        template="internvl2_5",
        dynamic_image_size=True,
        use_thumbnail=True,
        ps_version="v2",
        min_dynamic_patch=1,
        max_dynamic_patch=12,
        pad2square=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(vision_config, PretrainedConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = InternVisionConfig(**(vision_config or {}))
        self.llm_config = _llm_config(llm_config)
        self.use_backbone_lora, self.use_llm_lora = use_backbone_lora, use_llm_lora
        self.select_layer, self.force_image_size = select_layer, force_image_size
        self.downsample_ratio, self.template, self.ps_version = (
            downsample_ratio,
            template,
            ps_version,
        )
        self.dynamic_image_size, self.use_thumbnail, self.pad2square = (
            dynamic_image_size,
            use_thumbnail,
            pad2square,
        )
        self.min_dynamic_patch, self.max_dynamic_patch = min_dynamic_patch, max_dynamic_patch
        self.tie_word_embeddings = getattr(self.llm_config, "tie_word_embeddings", False)

    def get_text_config(self, *args, **kwargs):
        """The LLM's config (loaders size the KV cache and the vocabulary from it); the base class
        asks for it
        while it initialises, before the LLM's config is set."""
        return self.__dict__.get("llm_config", self)

    def to_dict(self):
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        out["model_type"] = self.model_type
        return out
