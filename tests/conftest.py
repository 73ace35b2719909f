"""Fixtures shared across test modules.

Models: `tiny` (one random `tiny` Flash model per test module, eval mode: read it, or deep-copy it
before changing it), `make_tiny` (a factory of fresh ones, for tests that train or edit a model),
`lively` (the serving tests' model, whose greedy text varies with the prompt), `tokenizer` (their
small fallback tokenizer, built once) and `make_world_model` (fresh copies of the recipe's starting
model). Torch runs on one thread for the whole session (`torch_threads`).
"""

import copy
import dataclasses

import pytest
import torch

from tessera.chat import build_tokenizer, fallback_corpus
from tessera.config import FlashConfig, LanguageConfig, ModelConfig, VisionConfig
from tessera.model.init import init_lively_model, init_model
from tessera.train.recipe import RecipeConfig, init_model_for


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """One intra-op thread for every test: the tiny models run no faster on more, and the serving
    tests run server threads beside the test's own (the suite shares its cores with other jobs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    """The small BPE tokenizer on the fallback corpus (vocab 1024) of every tiny test model."""
    return build_tokenizer(fallback_corpus(), vocab_size=1024)


@pytest.fixture
def make_tiny(tokenizer):
    """Factory: make_tiny() → a fresh random `tiny` Flash model (seed 0, train mode, as init_model
    returns it), for tests that train, patch or otherwise change the model."""

    def make():
        return init_model("tiny", tokenizer=tokenizer, seed=0)

    return make


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A random `tiny` Flash model (eval mode) with the small tokenizer; one per test module. Tests
    that change it work on copy.deepcopy(tiny) or ask make_tiny for their own."""
    return init_model("tiny", tokenizer=tokenizer, seed=0).eval()


@pytest.fixture(scope="session")
def _world_model():
    """The recipe's starting model (tokenizer on 20 scenes' text, no Flash parts) and torch's global
    generator state right after building it (init_model seeds it)."""
    model = init_model_for(RecipeConfig(tokenizer_corpus=20))
    return model, torch.get_rng_state()


@pytest.fixture
def make_world_model(_world_model):
    """Factory: make_world_model() → a fresh init_model_for(RecipeConfig(tokenizer_corpus=20)),
    copied from one built per session (training its world tokenizer takes longer than the copy),
    with torch's global generator left where building it anew would leave it."""
    model, rng_state = _world_model

    def make():
        torch.set_rng_state(rng_state)
        return copy.deepcopy(model)

    return make


@pytest.fixture(scope="module")
def lively():
    """The serving tests' random `tiny` model (tessera.model.init.init_lively_model), per module."""
    return init_lively_model("tiny")


def perturb_(module, seed: int = 0, router_scale: float = 20.0, expert_std: float = 0.0) -> None:
    """Move a random model off its init so every tensor matters in a parity test: 1-D tensors (norms, biases,
    attention sinks) get noise, MoE routers are scaled up so top-k choices are decisive (no near-ties that float
    rounding could flip), and with `expert_std` > 0 GPT-OSS experts are redrawn that wide (their clamp engages)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.mul_(router_scale)
            if expert_std and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(expert_std * torch.randn(p.shape, generator=g))


@pytest.fixture
def hf_causal_lm(tmp_path):
    """Factory: our Qwen3ForCausalLM → transformers' AutoModelForCausalLM loaded from it through a safetensors
    folder in transformers' layout (config from tessera.model.layouts, tensors under our names, which are the
    checkpoints' names)."""
    import json

    from safetensors.torch import save_file

    from tessera.model.layouts import _ARCH_NAMES, _qwen3_dict, _rope_dict

    def load(llm, dtype=torch.float32):
        import transformers

        lang = llm.config
        raw = {
            "architectures": [_ARCH_NAMES[lang.architecture]],
            **_qwen3_dict(lang),
            "rope_parameters": _rope_dict(lang),
        }
        state = {k: v.detach().contiguous() for k, v in llm.state_dict().items()}
        if lang.tie_word_embeddings:
            state.pop("lm_head.weight")
        folder = tmp_path / f"hf-{lang.architecture}"
        folder.mkdir(exist_ok=True)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(raw))
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()

    return load


@pytest.fixture
def write_dataset():
    """write_dataset(folder, n, seed) → the JSONL path of a hand-made InternVL-format dataset (tests/handmade.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from handmade import write

    return write


def _markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every pipe table in `text`, in order: one {column header: cell} per row, cells stripped of
    spaces and bold markers. Tests read a report's values through it, not its exact row strings."""
    tables, lines = [], [line.strip() for line in text.splitlines()]
    cells = lambda line: [c.strip().strip("*").strip() for c in line.strip("|").split("|")]
    i = 0
    while i + 1 < len(lines):
        rule = lines[i + 1]
        if lines[i].startswith("|") and rule.startswith("|") and set(rule) <= set("|-: "):
            head, rows, i = cells(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(head, cells(lines[i]))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


@pytest.fixture
def markdown_tables():
    """markdown_tables(text) → every pipe table of a markdown text, as lists of {header: cell}."""
    return _markdown_tables


def unit_config(
    *,
    flash: bool = False,
    tied: bool = False,
    rms: bool = False,
    vocab_size: int = 96,
    vit_layers: int = 2,
    select_layer: int = -1,
    relative_threshold: float = 0.5,
    preset: str = "",
) -> ModelConfig:
    """The smallest whole model the layout, parity and model tests build: 56 px tiles, patch 14 (4×4
    patches → 4 tokens at 1/4, 1 at 1/16), a 2-layer GQA decoder (4 heads / 2 kv heads),
    <IMG_CONTEXT> = 3. `rms`: InternViT-6B style (RMSNorm, q/k norm, no qkv bias)."""
    vision = VisionConfig(
        image_size=56,
        patch_size=14,
        hidden_size=32,
        num_layers=vit_layers,
        num_heads=2,
        intermediate_size=64,
    )
    if rms:
        vision = dataclasses.replace(
            vision, norm_type="rms_norm", qkv_bias=False, qk_normalization=True
        )
    language = LanguageConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10_000.0,
        tie_word_embeddings=tied,
    )
    return ModelConfig(
        vision=vision,
        language=language,
        flash=FlashConfig(enabled=flash, relative_threshold=relative_threshold),
        max_tiles=4,
        select_layer=select_layer,
        image_context_token_id=3,
        preset=preset,
    ).validate()
