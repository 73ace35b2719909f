"""Pure loss functions. Each takes tensors and returns `(loss, metrics)`; nothing here touches a model.

Token weights follow InternVL's *square averaging*: every loss token of a sample with N loss tokens has
weight N^-0.5 (see `tessera.train.data.square_average_weights`), and a batch's loss is Σ w·ℓ / Σ w.
Passing `normalizer` replaces the denominator Σ w with a larger total (the weight of every micro-batch of
an optimiser step on every rank), so gradient accumulation and data parallelism give exactly the loss of
one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # target id of positions without loss


def _denominator(weights: torch.Tensor, normalizer: float | torch.Tensor | None) -> torch.Tensor:
    total = (
        weights.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=weights.dtype)
    )
    if float(total) <= 0:
        raise ValueError("the loss weights sum to zero: the batch has no loss tokens")
    return total


def weighted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ w·CE / Σ w over the positions whose target is not IGNORE.

    logits [B,T,V] (position t predicts targets[:, t]); targets [B,T] long, IGNORE where there is no loss;
    weights [B,T] float, 0 where there is no loss.
    Metrics: `ce` (weighted mean, the loss itself when normalizer is None), `token_acc` (unweighted greedy
    accuracy on loss tokens) and `loss_tokens`.
    """
    if logits.shape[:2] != targets.shape or targets.shape != weights.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, weights {tuple(weights.shape)}"
        )
    mask = targets != IGNORE  # [B,T]
    flat_logits = logits[mask].float()  # [L,V], L = loss tokens
    flat_targets = targets[mask]  # [L]
    flat_w = weights[mask].float()  # [L]
    ce = F.cross_entropy(flat_logits, flat_targets, reduction="none")  # [L]
    loss = (flat_w * ce).sum() / _denominator(flat_w, normalizer)
    with torch.no_grad():
        acc = (flat_logits.argmax(-1) == flat_targets).float().mean().item() if len(ce) else 0.0
        mean_ce = ((flat_w * ce).sum() / flat_w.sum().clamp_min(1e-12)).item()
    return loss, {"ce": mean_ce, "token_acc": acc, "loss_tokens": float(len(ce))}


def kl_consistency(
    ref_logits: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ViCO stage 1: Σ w·KL(π_ref(·|t) ‖ π(·|t)) / Σ w over the positions with weight > 0.

    ref_logits [B,T,V] from the frozen reference (image at 1/4), logits [B,T,V] from the trained model (image
    at ξ ∈ {1/4, 1/16}); weights [B,T], 0 where there is no loss. Per token KL = Σ_v p_ref (log p_ref − log p).
    The reference is detached here, so callers need not remember to.
    """
    if ref_logits.shape != logits.shape or logits.shape[:2] != weights.shape:
        raise ValueError(
            f"shape mismatch: ref {tuple(ref_logits.shape)}, logits {tuple(logits.shape)}, weights {tuple(weights.shape)}"
        )
    mask = weights > 0  # [B,T]
    ref_logp = F.log_softmax(ref_logits[mask].detach().float(), dim=-1)  # [L,V]
    logp = F.log_softmax(logits[mask].float(), dim=-1)  # [L,V]
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [L]
    flat_w = weights[mask].float()  # [L]
    loss = (flat_w * kl).sum() / _denominator(flat_w, normalizer)
    with torch.no_grad():
        agree = (ref_logp.argmax(-1) == logp.argmax(-1)).float().mean().item() if len(kl) else 0.0
        mean_kl = ((flat_w * kl).sum() / flat_w.sum().clamp_min(1e-12)).item()
    return loss, {"kl": mean_kl, "argmax_agree": agree, "loss_tokens": float(len(kl))}
