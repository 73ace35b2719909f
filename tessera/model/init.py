"""Fresh checkpoints: a preset's model with random weights and a tokenizer built on this machine."""

from __future__ import annotations

from pathlib import Path

import torch

from tessera.chat import ChatTokenizer, build_tokenizer, fallback_corpus
from tessera.config import ModelConfig, preset


def default_tokenizer(vocab_size: int, corpus_size: int = 600) -> ChatTokenizer:
    """A BPE tokenizer trained on the world's text (every word the tiny model reads or writes)."""
    try:
        from tessera.world import corpus
    except ImportError:  # the world is optional for bring-up of a bare model
        texts = fallback_corpus()
    else:
        texts = list(corpus(corpus_size))
    return build_tokenizer(texts, vocab_size=min(vocab_size, 1024))


def init_model(config: ModelConfig | str, tokenizer: ChatTokenizer | None = None, seed: int = 0):
    """A VisionLanguageModel with seeded random weights; the config's image-token id follows the tokenizer."""
    from tessera.model.vlm import VisionLanguageModel

    config = preset(config) if isinstance(config, str) else config
    tokenizer = tokenizer or default_tokenizer(config.language.vocab_size)
    if tokenizer.vocab_size > config.language.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.language.vocab_size}")
    config.image_context_token_id = tokenizer.img_context_id
    config.validate()
    torch.manual_seed(seed)
    model = VisionLanguageModel(config)
    model.tokenizer = tokenizer
    return model


def init_checkpoint(config: ModelConfig | str, out: str | Path, seed: int = 0) -> Path:
    from tessera.model.checkpoint import save_checkpoint

    model = init_model(config, seed=seed)
    save_checkpoint(model, out)
    return Path(out)
