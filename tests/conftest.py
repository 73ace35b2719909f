"""Fixtures shared across test modules."""

import pytest


@pytest.fixture(scope="module")
def tiny():
    """A random `tiny` Flash model (eval mode) with a small tokenizer; a fresh one per test module."""
    from tessera.chat import build_tokenizer, fallback_corpus
    from tessera.model.init import init_model

    return init_model("tiny", tokenizer=build_tokenizer(fallback_corpus(), vocab_size=1024), seed=0).eval()


def perturb_(module, seed: int = 0, router_scale: float = 20.0, expert_std: float = 0.0) -> None:
    """Move a random model off its init so every tensor matters in a parity test: 1-D tensors (norms, biases,
    attention sinks) get noise, MoE routers are scaled up so top-k choices are decisive (no near-ties that float
    rounding could flip), and with `expert_std` > 0 GPT-OSS experts are redrawn that wide (their clamp engages)."""
    import torch

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

    import torch
    from safetensors.torch import save_file

    from tessera.model.layouts import _ARCH_NAMES, _qwen3_dict, _rope_dict

    def load(llm, dtype=torch.float32):
        import transformers

        lang = llm.config
        raw = {"architectures": [_ARCH_NAMES[lang.architecture]], **_qwen3_dict(lang),
               "rope_parameters": _rope_dict(lang)}
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
