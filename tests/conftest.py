"""Fixtures shared across test modules."""

import pytest


@pytest.fixture(scope="module")
def tiny():
    """A random `tiny` Flash model (eval mode) with a small tokenizer; a fresh one per test module."""
    from tessera.chat import build_tokenizer, fallback_corpus
    from tessera.model.init import init_model

    return init_model("tiny", tokenizer=build_tokenizer(fallback_corpus(), vocab_size=1024), seed=0).eval()
