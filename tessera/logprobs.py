"""Log-probabilities of given tokens under logits: what sampling records, trainers differentiate and critics read."""

from __future__ import annotations

import torch


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log π(target_t | prefix) for every position: logits [B,T,V] (already aligned so that logits[:, t]
    predicts targets[:, t]), targets [B,T] → [B,T]. `temperature` divides the logits first, so a policy
    sampled at temperature τ is scored with the same distribution it was sampled from."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [B,T]"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probabilities, got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B,T,V]
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [B,T,1] → [B,T]


def sequence_logprobs(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t mask·log π over the response: token_logp [B,T], mask [B,T] (1 = response token) → [B]."""
    if token_logp.shape != mask.shape:
        raise ValueError(
            f"token_logp {tuple(token_logp.shape)} and mask {tuple(mask.shape)} must have the same shape"
        )
    return (token_logp * mask.to(token_logp.dtype)).sum(dim=-1)  # [B,T] → [B]
