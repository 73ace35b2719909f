"""Qwen3-MoE parity with transformers: a tiny random decoder (top-k routing with and without norm_topk_prob,
decoder_sparse_step, mlp_only_layers) gives transformers' Qwen3MoeForCausalLM's logits (fp32) and greedy ids;
the whole VLM matches InternVLForConditionalGeneration built on that text config (exported with `convert
--to hf`, loaded by from_pretrained); the load-balancing loss equals transformers' aux_loss; the KV cache and the
continuous-batching engine reproduce uncached greedy decoding; the official layout round-trips."""

import dataclasses
import json

import pytest
import torch
from conftest import perturb_

from tessera.config import LanguageConfig, ModelConfig, VisionConfig
from tessera.engine import Engine, GenerationRequest, SamplingParams, generate
from tessera.model.checkpoint import convert, load_checkpoint, load_config, save_checkpoint
from tessera.model.llm import Qwen3ForCausalLM
from tessera.model.vlm import VisionLanguageModel

transformers = pytest.importorskip("transformers")

TOL = 1e-4
IMG = 3


def moe_language(
    norm_topk: bool = True, sparse_step: int = 1, mlp_only=(), tied: bool = False
) -> LanguageConfig:
    return LanguageConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10_000.0,
        tie_word_embeddings=tied,
        architecture="qwen3_moe",
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        norm_topk_prob=norm_topk,
        decoder_sparse_step=sparse_step,
        mlp_only_layers=list(mlp_only),
        router_aux_loss_coef=0.01,
    )


CASES = {
    "all-sparse-normtopk": dict(norm_topk=True),
    "no-normtopk-tied": dict(norm_topk=False, tied=True),
    "sparse-step-2": dict(sparse_step=2),
    "mlp-only-layer-0": dict(mlp_only=(0,)),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def pair(request, hf_causal_lm):
    torch.manual_seed(0)
    ours = Qwen3ForCausalLM(moe_language(**CASES[request.param])).eval()
    perturb_(ours)
    return ours, hf_causal_lm(ours)


def test_layer_kinds_follow_sparse_step_and_mlp_only_layers():
    kinds = lambda lang: [type(layer.mlp).__name__ for layer in Qwen3ForCausalLM(lang).model.layers]
    assert kinds(moe_language()) == ["Qwen3MoeSparseBlock"] * 3
    assert kinds(moe_language(sparse_step=2)) == ["Qwen3MLP", "Qwen3MoeSparseBlock", "Qwen3MLP"]
    assert kinds(moe_language(mlp_only=(0,))) == [
        "Qwen3MLP",
        "Qwen3MoeSparseBlock",
        "Qwen3MoeSparseBlock",
    ]


def test_decoder_logits_greedy_and_aux_loss_match_transformers(pair):
    ours, theirs = pair
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ours.embed_tokens(ids))
        out = theirs(input_ids=ids, output_router_logits=True)
    assert (a - out.logits).abs().max().item() <= TOL
    if ours.config.num_experts and any(
        l.mlp.__class__.__name__ == "Qwen3MoeSparseBlock" for l in ours.model.layers
    ):
        ours_aux = ours.aux_loss() / ours.config.router_aux_loss_coef
        assert abs(ours_aux.item() - out.aux_loss.item()) <= 1e-5
    prompt = ids[:1, :9]
    mine = greedy(ours, prompt, 12)
    with torch.no_grad():
        ref = theirs.generate(
            prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
        )
    assert mine == ref[0, 9:].tolist()


def greedy(llm, prompt: torch.Tensor, n: int, cache: bool = True) -> list[int]:
    """Greedy ids of a bare decoder through the VLM's generate loop (text only)."""
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


def test_aux_loss_is_k_for_a_uniform_router_and_grows_when_unbalanced():
    torch.manual_seed(0)
    llm = Qwen3ForCausalLM(moe_language())
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.mlp.gate.weight.zero_()
    llm(torch.randn(2, 8, 48))
    uniform = llm.aux_loss() / llm.config.router_aux_loss_coef
    assert abs(uniform.item() - 2.0) < 1e-5  # top-2 of a uniform router: E · Σ (k/E)(1/E) = k
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.mlp.gate.weight[0] = 5.0  # expert 0 wins for inputs along the all-ones direction
    llm(torch.ones(2, 8, 48))
    assert (llm.aux_loss() / llm.config.router_aux_loss_coef).item() > 2.5
    mask = torch.ones(2, 8, dtype=torch.bool)
    assert torch.allclose(llm.aux_loss(mask), llm.aux_loss())


def test_aux_loss_has_gradients_into_the_router():
    torch.manual_seed(0)
    llm = Qwen3ForCausalLM(moe_language()).train()
    llm(torch.randn(2, 8, 48)).sum().mul(0).add(llm.aux_loss()).backward()
    assert all(layer.mlp.gate.weight.grad.abs().sum() > 0 for layer in llm.model.layers)


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
        vision=vision, language=language, max_tiles=4, image_context_token_id=IMG
    ).validate()


@pytest.fixture(scope="module")
def vlm_pair(tmp_path_factory):
    torch.manual_seed(0)
    ours = VisionLanguageModel(vlm_config(moe_language(mlp_only=(1,)))).eval()
    perturb_(ours)
    root = tmp_path_factory.mktemp("moe-vlm")
    save_checkpoint(ours, root / "tessera")
    convert(root / "tessera", root / "hf", to="hf")
    theirs = transformers.InternVLForConditionalGeneration.from_pretrained(
        root / "hf", dtype=torch.float32
    ).eval()
    return ours, theirs, root


def image_prompt(tiles: int, tokens_per_tile: int) -> torch.Tensor:
    return torch.tensor(
        [[1, 40, 41, 4] + [IMG] * (tiles * tokens_per_tile) + [5, 50, 51, 52, 2, 1, 60]]
    )


def test_vlm_logits_and_greedy_match_transformers_internvl(vlm_pair):
    ours, theirs, _ = vlm_pair
    pixel_values = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    ids = image_prompt(2, ours.config.tokens_per_tile)
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


def test_official_and_hf_layouts_round_trip_the_moe_config(vlm_pair, tmp_path):
    ours, _, root = vlm_pair
    config, layout = load_config(root / "hf")
    assert layout == "hf" and config.language == ours.config.language
    convert(root / "tessera", tmp_path / "official", to="official")
    back = load_checkpoint(tmp_path / "official")
    assert back.config.language == ours.config.language
    for (k, v), (k2, v2) in zip(
        sorted(ours.state_dict().items()), sorted(back.state_dict().items())
    ):
        assert k == k2 and torch.equal(v, v2)


def test_official_llm_config_alone_carries_the_moe_fields(vlm_pair, tmp_path):
    _, _, root = vlm_pair
    convert(root / "tessera", tmp_path / "official", to="official")
    raw = json.loads((tmp_path / "official" / "config.json").read_text())
    raw["tessera_config"]["language"] = dataclasses.asdict(
        LanguageConfig(vocab_size=96)
    )  # a dense one: ignored
    assert raw["llm_config"]["architectures"] == ["Qwen3MoeForCausalLM"]
    (tmp_path / "official" / "config.json").write_text(json.dumps(raw))
    config, _ = load_config(tmp_path / "official")
    lang = config.language
    assert (
        lang.architecture,
        lang.num_experts,
        lang.num_experts_per_tok,
        lang.moe_intermediate_size,
        lang.mlp_only_layers,
    ) == ("qwen3_moe", 6, 2, 24, [1])


def test_kv_cache_and_engine_match_uncached_greedy():
    torch.manual_seed(0)
    llm = Qwen3ForCausalLM(moe_language(sparse_step=2)).eval()
    perturb_(llm)
    prompts = [
        torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 11, 8)
    ]
    refs = [greedy(llm, p, 9, cache=False) for p in prompts]
    assert [greedy(llm, p, 9, cache=True) for p in prompts] == refs
    engine = Engine(llm, max_batch=4, max_len=64)
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.submit(
            GenerationRequest(
                str(i),
                p[0].tolist(),
                SamplingParams(max_tokens=9),
                lambda ev: ev.token_id is not None and outs[ev.request_id].append(ev.token_id),
            )
        )
        engine.step()  # later requests join a running batch
    while engine.has_work():
        engine.step()
    assert [outs[str(i)] for i in range(len(prompts))] == refs


def test_moe_config_errors_name_the_field():
    from tessera.config import ConfigError

    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        dataclasses.replace(moe_language(), num_experts_per_tok=7).validate()
    with pytest.raises(ConfigError, match="moe_intermediate_size"):
        dataclasses.replace(moe_language(), moe_intermediate_size=0).validate()
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        dataclasses.replace(moe_language(), mlp_only_layers=[3]).validate()
    with pytest.raises(ConfigError, match="qwen3_moe or gpt_oss"):
        dataclasses.replace(moe_language(), architecture="qwen3").validate()


def test_the_lm_stage_adds_the_weighted_load_balancing_loss(vlm_pair):
    from tessera.train.data import Encoded, collate
    from tessera.train.losses import weighted_cross_entropy
    from tessera.train.stage import packed_lm_loss

    ours, _, _ = vlm_pair
    tpt = ours.config.tokens_per_tile
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    ids = [1, 40, 4] + [IMG] * tpt + [5, 50, 51, 2, 1, 60, 61, 62, 2]
    a = Encoded(ids, [0] * (len(ids) - 4) + [1] * 4, pixels, [tpt])
    b = Encoded([1, 70, 71, 2, 1, 72, 2], [0, 0, 0, 0, 0, 1, 1], torch.zeros(0, 3, 56, 56), [])
    batch = collate([[a], [b]], pad_id=0)
    ours.train()
    try:
        loss, metrics = packed_lm_loss(ours, batch, normalizer=batch.weight_sum)
        features, _ = ours.project(ours.vision_tokens(batch.pixel_values))
        logits = ours(
            batch.input_ids,
            image_features=features,
            position_ids=batch.position_ids,
            attn_mask=batch.attn_mask(),
        )
        ce, _ = weighted_cross_entropy(logits, batch.targets, batch.weights, batch.weight_sum)
        aux = ours.language_model.aux_loss(batch.segment_ids > 0)
    finally:
        ours.eval()
    assert metrics["router_aux_loss"] == pytest.approx(aux.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ce.item() + aux.item(), rel=1e-5)
    assert aux.item() > 0


def test_an_upstream_qwen3_30b_a3b_llm_config_reads_as_the_preset():
    from tessera.config import preset
    from tessera.model.layouts import _qwen3_language

    upstream = {  # the fields of Qwen3-30B-A3B's config.json, as InternVL3.5-30B-A3B's llm_config carries them
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "decoder_sparse_step": 1,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "router_aux_loss_coef": 0.001,
        "mlp_only_layers": [],
        "tie_word_embeddings": False,
    }
    assert (
        _qwen3_language(upstream, "llm_config", "qwen3_moe")
        == preset("internvl3_5-30b-a3b").language
    )


def test_aux_loss_gradients_are_the_same_under_gradient_checkpointing():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        llm = Qwen3ForCausalLM(moe_language()).train()
        llm.gradient_checkpointing = ckpt
        x = torch.randn(2, 8, 48, generator=torch.Generator().manual_seed(5))
        (llm(x).square().mean() + llm.aux_loss()).backward()
        grads.append(
            torch.cat([llm.model.layers[i].mlp.gate.weight.grad.flatten() for i in range(3)])
        )
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
