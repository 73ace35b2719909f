"""GPT-OSS parity with transformers: a tiny random decoder (attention sinks, biases, alternating sliding /
full layers, YaRN RoPE, clamped SwiGLU experts with the clamp engaged) gives transformers' GptOssForCausalLM's
logits (fp32) and greedy ids; the whole VLM matches InternVLForConditionalGeneration on that text config; the KV
cache (a sliding layer keeps only its window) and the engine reproduce uncached greedy decoding with windows
shorter and longer than the prompt; BF16 weights load and run."""

import dataclasses
import json

import pytest
import torch
from conftest import perturb_

from tessera.config import LanguageConfig, ModelConfig, RopeScaling, VisionConfig, preset
from tessera.engine import Engine, GenerationRequest, SamplingParams, generate
from tessera.model.checkpoint import convert, load_checkpoint, load_config, save_checkpoint
from tessera.model.gpt_oss import GptOssExperts
from tessera.model.llm import DynamicCache, Qwen3ForCausalLM
from tessera.model.vlm import VisionLanguageModel

transformers = pytest.importorskip("transformers")

TOL = 1e-4
IMG = 3
YARN = RopeScaling(
    rope_type="yarn",
    factor=8.0,
    original_max_position_embeddings=16,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
)


def gpt_oss_language(window: int = 4, layers: int = 4, rope: RopeScaling = YARN) -> LanguageConfig:
    return LanguageConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=40,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=150_000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        architecture="gpt_oss",
        rope_scaling=rope,
        num_experts=5,
        num_experts_per_tok=2,
        sliding_window=window,
        layer_types=[
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ],
    )


def random_llm(language: LanguageConfig, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    llm = Qwen3ForCausalLM(language).eval()
    perturb_(llm, seed, expert_std=0.6)
    return llm


CASES = {
    "window-4-yarn": dict(window=4),
    "window-64-yarn": dict(window=64),
    "window-3-plain-rope": dict(window=3, rope=RopeScaling()),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def pair(request, hf_causal_lm):
    ours = random_llm(gpt_oss_language(**CASES[request.param]))
    return ours, hf_causal_lm(ours)


def greedy(llm, prompt: torch.Tensor, n: int, cache: bool = True) -> list[int]:
    vlm = VisionLanguageModel.__new__(VisionLanguageModel)
    torch.nn.Module.__init__(vlm)
    vlm.language_model = llm
    vlm.config = ModelConfig(language=llm.config, image_context_token_id=95)
    if not cache:  # the reference: recompute the whole sequence at every step
        ids = prompt
        with torch.no_grad():
            for _ in range(n):
                ids = torch.cat(
                    [ids, llm(llm.embed_tokens(ids))[:, -1].argmax(-1, keepdim=True)], dim=1
                )
        return ids[0, prompt.shape[1] :].tolist()
    return generate(vlm, [prompt[0].tolist()], None, SamplingParams(max_tokens=n)).tokens[0]


def test_clamp_is_engaged_and_matches_the_exact_semantics():
    llm = random_llm(gpt_oss_language())
    experts: GptOssExperts = llm.model.layers[0].mlp.experts
    x = torch.randn(7, 48)
    gate_up = x @ experts.gate_up_proj[1] + experts.gate_up_proj_bias[1]  # [7, 2I] interleaved
    assert gate_up.abs().max() > experts.limit  # the test configs really clamp
    gate, up = gate_up[:, 0::2].clamp(max=7.0), gate_up[:, 1::2].clamp(-7.0, 7.0)
    ref = ((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ experts.down_proj[
        1
    ] + experts.down_proj_bias[1]
    assert torch.allclose(experts.expert(1, x), ref, rtol=1e-5, atol=1e-4)


def test_decoder_logits_and_greedy_match_transformers(pair):
    ours, theirs = pair
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ours.embed_tokens(ids))
        b = theirs(input_ids=ids).logits
    assert (a - b).abs().max().item() <= TOL
    prompt = ids[:1, :11]
    mine = greedy(ours, prompt, 14)
    with torch.no_grad():
        ref = theirs.generate(
            prompt, max_new_tokens=14, min_new_tokens=14, do_sample=False, pad_token_id=0
        )
    assert mine == ref[0, 11:].tolist()


def test_sinks_and_windows_change_the_output():
    llm = random_llm(gpt_oss_language(window=3))
    x = torch.randn(1, 12, 48)
    with torch.no_grad():
        base = llm(x)
        llm.model.layers[0].self_attn.window = 0  # the sliding layer made full
        assert (llm(x) - base)[:, 3:].abs().max() > 1e-4  # beyond the window the outputs differ
        assert torch.allclose(llm(x)[:, :3], base[:, :3], atol=1e-6)  # inside it they cannot
        llm.model.layers[0].self_attn.window = 3
        llm.model.layers[1].self_attn.sinks.add_(3.0)
        assert (llm(x) - base).abs().max() > 1e-4


@pytest.mark.parametrize(
    "window", [3, 64], ids=["window-shorter-than-prompt", "window-longer-than-prompt"]
)
def test_kv_cache_and_engine_match_uncached_greedy(window):
    llm = random_llm(gpt_oss_language(window=window))
    prompts = [
        torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (9, 14, 2)
    ]
    refs = [greedy(llm, p, 10, cache=False) for p in prompts]
    assert [greedy(llm, p, 10, cache=True) for p in prompts] == refs
    engine = Engine(llm, max_batch=4, max_len=64)
    # sliding layers keep a ring of their window (when it is shorter than max_len), full layers every position
    assert [k.shape[2] for k in engine.cache.k] == [min(window, 64), 64, min(window, 64), 64]
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.submit(
            GenerationRequest(
                str(i),
                p[0].tolist(),
                SamplingParams(max_tokens=10),
                lambda ev: ev.token_id is not None and outs[ev.request_id].append(ev.token_id),
            )
        )
        engine.step()  # later requests join a running batch; the one that ends first frees its slot (a move)
    while engine.has_work():
        engine.step()
    assert [outs[str(i)] for i in range(len(prompts))] == refs


def test_sliding_layers_keep_only_their_window_in_the_dynamic_cache():
    llm = random_llm(gpt_oss_language(window=4))
    cache = DynamicCache(windows=llm.windows())
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        full = llm(llm.embed_tokens(ids))
        chunked = torch.cat(
            [
                llm(llm.embed_tokens(ids[:, :6]), cache=cache),  # prefill longer than the window
                llm(llm.embed_tokens(ids[:, 6:8]), cache=cache),  # a 2-token chunk
                llm(llm.embed_tokens(ids[:, 8:9]), cache=cache),
                llm(llm.embed_tokens(ids[:, 9:]), cache=cache),
            ],
            dim=1,
        )
    assert torch.allclose(chunked, full, atol=1e-5)
    assert [k.shape[2] for k in cache.keys] == [
        3,
        10,
        3,
        10,
    ]  # sliding layers: window − 1; full layers: all
    assert cache.seq_len == 10


def vlm_config(language: LanguageConfig) -> ModelConfig:
    vision = VisionConfig(
        image_size=56,
        patch_size=14,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
    )
    return ModelConfig(
        vision=vision,
        language=language,
        max_tiles=4,
        image_context_token_id=IMG,
        template="internvl3_5_gpt_oss",
    ).validate()


@pytest.fixture(scope="module")
def vlm_pair(tmp_path_factory):
    torch.manual_seed(0)
    ours = VisionLanguageModel(vlm_config(gpt_oss_language(window=8))).eval()
    perturb_(ours, expert_std=0.6)
    root = tmp_path_factory.mktemp("gpt-oss-vlm")
    save_checkpoint(ours, root / "tessera")
    convert(root / "tessera", root / "hf", to="hf")
    theirs = transformers.InternVLForConditionalGeneration.from_pretrained(
        root / "hf", dtype=torch.float32
    ).eval()
    return ours, theirs, root


def test_vlm_logits_and_greedy_match_transformers_internvl(vlm_pair):
    ours, theirs, _ = vlm_pair
    pixel_values = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor(
        [[1, 40, 41, 4] + [IMG] * ours.config.tokens_per_tile + [5, 50, 51, 52, 2, 1, 60]]
    )
    with torch.no_grad():
        a = ours(ids, pixel_values=pixel_values)
        b = theirs(input_ids=ids, pixel_values=pixel_values).logits
    assert (a - b).abs().max().item() <= TOL
    features, _ = ours.encode_images(pixel_values)
    mine = generate(ours, [ids[0].tolist()], features, SamplingParams(max_tokens=10)).tokens[0]
    with torch.no_grad():
        out = theirs.generate(
            input_ids=ids,
            pixel_values=pixel_values,
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )
    assert mine == out[0, ids.shape[1] :].tolist()


def test_layouts_round_trip_and_official_llm_config_carries_gpt_oss_fields(vlm_pair, tmp_path):
    ours, _, root = vlm_pair
    config, _ = load_config(root / "hf")
    assert config.language == ours.config.language
    convert(root / "tessera", tmp_path / "official", to="official")
    raw = json.loads((tmp_path / "official" / "config.json").read_text())
    assert (
        raw["llm_config"]["architectures"] == ["GptOssForCausalLM"]
        and raw["template"] == "internvl3_5_gpt_oss"
    )
    raw["tessera_config"]["language"] = dataclasses.asdict(LanguageConfig(vocab_size=96))  # ignored
    (tmp_path / "official" / "config.json").write_text(json.dumps(raw))
    back = load_checkpoint(tmp_path / "official")
    assert back.config.language == ours.config.language
    assert back.config.template == "internvl3_5_gpt_oss"


def test_bf16_checkpoint_loads_and_generates(vlm_pair, tmp_path):
    ours, _, root = vlm_pair
    convert(root / "tessera", tmp_path / "bf16", to="official", dtype=torch.bfloat16)
    model = load_checkpoint(tmp_path / "bf16")
    assert model.language_model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    ids = torch.tensor([[1, 40, 41, 50, 51, 2, 1, 60]])
    with torch.no_grad():
        full, half = ours(ids), model(ids).float()
    # bf16 rounding, not a different model: most positions agree closely (a near-tie in routing may flip an
    # expert choice at some position, as it does in any bf16 MoE)
    per_position = (half - full).abs().amax(-1)[0]  # [T]
    assert per_position.median() < 0.05 * full.abs().max()
    out = generate(model, [ids[0].tolist()], None, SamplingParams(max_tokens=6)).tokens[0]
    assert len(out) == 6 and all(0 <= t < 96 for t in out)


def test_preset_is_gpt_oss_20b():
    lang = preset("internvl3_5-20b-a4b").language
    assert (
        lang.architecture,
        lang.num_layers,
        lang.hidden_size,
        lang.num_heads,
        lang.num_kv_heads,
        lang.head_dim,
        lang.num_experts,
        lang.num_experts_per_tok,
        lang.sliding_window,
        lang.vocab_size,
    ) == ("gpt_oss", 24, 2880, 64, 8, 64, 32, 4, 128, 201088)
    assert lang.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert (lang.rope_scaling.rope_type, lang.rope_scaling.factor, lang.rope_theta) == (
        "yarn",
        32.0,
        150_000.0,
    )


def test_an_upstream_gpt_oss_20b_llm_config_reads_as_the_preset():
    from tessera.model.layouts import _qwen3_language

    upstream = {  # the fields of gpt-oss-20b's transformers config.json
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 24,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
        "attention_bias": True,
        "sliding_window": 128,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "router_aux_loss_coef": 0.9,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
    }
    assert (
        _qwen3_language(upstream, "llm_config", "gpt_oss") == preset("internvl3_5-20b-a4b").language
    )


def test_a_fresh_gpt_oss_model_gets_a_harmony_tokenizer_and_answers():
    from tessera.model.init import init_model

    config = vlm_config(dataclasses.replace(gpt_oss_language(window=4), vocab_size=512))
    model = init_model(config, seed=0).eval()
    tok = model.tokenizer
    assert (
        tok.template == "internvl3_5_gpt_oss"
        and model.config.image_context_token_id == tok.img_context_id
    )
    prompt = torch.tensor([tok.build_prompt("what colour is the circle", [])])
    out = generate(
        model,
        [prompt[0].tolist()],
        None,
        SamplingParams(max_tokens=5, stop_ids=frozenset([tok.im_end_id])),
    ).tokens[0]
    assert 1 <= len(out) <= 5


def test_ring_cache_refuses_a_chunk_that_is_not_a_prefill_from_zero():
    from tessera.engine.kv_cache import CacheGeometry, SlotKVCache

    cache = SlotKVCache(CacheGeometry(4, 2, 16, slots=2, max_len=32, windows={0: 4, 2: 4}))
    assert sorted(cache.ring) == [0, 2] and cache.k[0].shape[2] == 4 and cache.k[1].shape[2] == 32
    positions = torch.arange(5, 8)[None]  # [1, 3], a chunk after position 4
    with pytest.raises(ValueError, match="prefill from position 0"):
        cache.view(0, positions, 8, lengths=torch.tensor([8]))
    with pytest.raises(ValueError, match="lengths"):
        cache.view(0, torch.arange(3)[None], 3)


def test_pipeline_chats_with_an_image_and_survives_an_official_round_trip(tmp_path):
    from PIL import Image

    from tessera.config import preset
    from tessera.model.init import init_model
    from tessera.pipeline import Pipeline

    config = preset("tiny")
    config = dataclasses.replace(
        config,
        flash=dataclasses.replace(config.flash, enabled=False),
        language=dataclasses.replace(gpt_oss_language(window=4), vocab_size=512),
        template="internvl3_5_gpt_oss",
    )
    model = init_model(config, seed=0)
    image = Image.new("RGB", (200, 120), (200, 30, 30))
    first = Pipeline(model).chat(image, "what colour is it", max_new_tokens=6)
    assert first.visual_tokens > 0 and 1 <= len(first.token_ids) <= 6
    save_checkpoint(model, tmp_path / "tessera")
    convert(tmp_path / "tessera", tmp_path / "official", to="official")
    again = Pipeline(load_checkpoint(tmp_path / "official")).chat(
        image, "what colour is it", max_new_tokens=6
    )
    assert again.token_ids == first.token_ids
