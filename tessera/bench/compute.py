"""A machine-independent compute meter: the language model's token passes.

CPU seconds are what a run costs here, but on a shared two-core machine identical runs differ by up to 20 %.
Token passes are exact and reproducible: every token position a language-model forward processes counts 1 (padding
included: it is computed), and 2 more when the forward is differentiated (a backward costs about two forwards).
For one model, FLOPs ≈ 2 · parameters · token passes (attention's quadratic term aside, small at these lengths),
so ratios of token passes are ratios of compute — the miniature's stand-in for the paper's GPU hours.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class TokenPasses:
    forward: int = 0  # token positions run forward without gradients (rollouts, scoring)
    trained: int = 0  # token positions run forward with gradients (each also runs backward)

    @property
    def total(self) -> int:
        return self.forward + 3 * self.trained


@contextmanager
def count_token_passes(model):
    """Count the token passes of `model.language_model` inside the block: `with count_token_passes(m) as c: ...`."""
    meter = TokenPasses()

    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))  # the input embeddings [B,T,D]
        n = x.shape[0] * x.shape[1]
        if torch.is_grad_enabled():
            meter.trained += n
        else:
            meter.forward += n

    handle = model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield meter
    finally:
        handle.remove()
