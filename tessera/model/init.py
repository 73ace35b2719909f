"""Fresh checkpoints: a preset's model with random weights and a tokenizer built on this machine."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from tessera.chat import ChatTokenizer, build_tokenizer, fallback_corpus
from tessera.config import ModelConfig, preset
from tessera.model.checkpoint import save_checkpoint
from tessera.model.vlm import VisionLanguageModel


def default_tokenizer(
    vocab_size: int, corpus: Iterable[str] | None = None, template: str = "internvl2_5"
) -> ChatTokenizer:
    """A BPE tokenizer with the special tokens of chat `template`, trained on `corpus` (e.g.
    `tessera.world.corpus(600)`, every word the tiny model reads or writes); without one, on the small built-in
    fallback text."""
    texts = list(corpus) if corpus is not None else fallback_corpus()
    return build_tokenizer(texts, vocab_size=min(vocab_size, 1024), template=template)


def init_model(
    config: ModelConfig | str,
    tokenizer: ChatTokenizer | None = None,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
):
    """A VisionLanguageModel with seeded random weights; the config's image-token id follows the tokenizer
    (default: one trained on `corpus`, see `default_tokenizer`)."""
    config = preset(config) if isinstance(config, str) else config
    tokenizer = tokenizer or default_tokenizer(
        config.language.vocab_size, corpus, template=config.template
    )
    if tokenizer.vocab_size > config.language.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.language.vocab_size}"
        )
    config.image_context_token_id = tokenizer.img_context_id
    config.validate()
    torch.manual_seed(seed)
    model = VisionLanguageModel(config)
    model.tokenizer = tokenizer
    return model


def init_checkpoint(
    config: ModelConfig | str,
    out: str | Path,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A fresh checkpoint (weights, config, tokenizer trained on `corpus`) in `out`; `dtype` casts the stored
    weights (random values drawn in fp32 first)."""
    model = init_model(config, seed=seed, corpus=corpus)
    if dtype != torch.float32:
        model = model.to(dtype)
    save_checkpoint(model, out)
    return Path(out)


def init_lively_model(preset_name: str = "tiny", seed: int = 0, std: float = 0.1):
    """A random model whose greedy text varies with the prompt, for benchmarks and serving tests.

    Language weights at std 0.1 (at 0.02 every prompt repeats one token) and zero embeddings for ids beyond the
    tokenizer, which greedy decoding then never picks. The tokenizer is the small fallback one (fast to build).
    """
    config = preset(preset_name)
    model = init_model(
        config, tokenizer=build_tokenizer(fallback_corpus(), config.language.vocab_size), seed=seed
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.language_model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std, generator=g)
        model.language_model.embed_tokens.weight[model.tokenizer.vocab_size :] = 0
    return model
