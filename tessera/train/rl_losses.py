"""Reasoning post-training losses: MPO (DPO + BCO + NLL) and GSPO, as pure functions.

Every loss takes tensors of log-probabilities (never a model) and returns `(loss, metrics)`, where `loss`
is a scalar tensor to minimise and `metrics` a dict of Python floats for logging. Keeping them free of
models and state lets the tests check each one against hand-computed values.

Shapes: B sequences (or pairs), T response tokens, V vocabulary, Q queries, G rollouts per query.
Log-probabilities of a sequence are *sums* over its response tokens (DPO's convention); GSPO uses the
per-token values and normalises by length itself.

Sources for the semantics (not the code): DPO (Rafailov et al. 2023, sigmoid loss); BCO pair loss with the
reward shift δ = running mean of the implicit rewards (Jung et al. 2024, as in TRL's `bco_pair`); MPO's
0.8·DPO + 0.2·BCO + 1.0·NLL (InternVL2.5-MPO / InternVL3.5); GSPO (Zheng et al. 2025): sequence-level,
length-normalised importance ratio, clipping (3e-4, 4e-4), no KL term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tessera.logprobs import sequence_logprobs

Metrics = dict[str, float]


# ---- MPO: preference (DPO), quality (BCO) and generation (NLL) ------------------------------------


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Sigmoid DPO: −log σ(β[(log π_c − log π_ref,c) − (log π_r − log π_ref,r)]), mean over pairs.

    All inputs are summed sequence log-probs [B]; the reference values carry no gradient."""
    for name, t in (
        ("policy_rejected", policy_rejected),
        ("ref_chosen", ref_chosen),
        ("ref_rejected", ref_rejected),
    ):
        _same_shape(policy_chosen, t, "policy_chosen", name)
    chosen_reward = beta * (policy_chosen - ref_chosen.detach())  # [B]
    rejected_reward = beta * (policy_rejected - ref_rejected.detach())  # [B]
    margin = chosen_reward - rejected_reward  # [B]
    loss = -F.logsigmoid(margin).mean()  # [B] → []
    return loss, {
        "dpo": loss.item(),
        "reward_chosen": chosen_reward.mean().item(),
        "reward_rejected": rejected_reward.mean().item(),
        "reward_margin": margin.mean().item(),
        "reward_accuracy": (margin > 0).float().mean().item(),
    }


def implicit_reward_mean(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> float:
    """The batch mean of the implicit rewards β(log π − log π_ref) over chosen and rejected together: the
    value fed to BCO's running mean (δ) before the loss is computed."""
    rewards = torch.cat(
        [beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)]
    )  # [2B]
    return rewards.mean().item()


@dataclass
class RunningMean:
    """The mean of every value passed to `update` (one per batch): BCO's reward shift δ."""

    total: float = 0.0
    count: int = 0

    def update(self, value: float) -> float:
        self.total += float(value)
        self.count += 1
        return self.mean

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


def bco_pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    delta: float,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """BCO on pairs: a binary classifier whose logit is the implicit reward shifted by δ.

    loss = −log σ(r_c − δ) − log σ(−(r_r − δ)), r = β(log π − log π_ref), mean over pairs. Unlike DPO, each
    response is judged on its own (absolute quality), not only relative to its partner."""
    for name, t in (
        ("policy_rejected", policy_rejected),
        ("ref_chosen", ref_chosen),
        ("ref_rejected", ref_rejected),
    ):
        _same_shape(policy_chosen, t, "policy_chosen", name)
    chosen_reward = beta * (policy_chosen - ref_chosen.detach())  # [B]
    rejected_reward = beta * (policy_rejected - ref_rejected.detach())  # [B]
    losses = -F.logsigmoid(chosen_reward - delta) - F.logsigmoid(-(rejected_reward - delta))  # [B]
    loss = losses.mean()  # [B] → []
    return loss, {"bco": loss.item(), "bco_delta": float(delta)}


def nll_loss(token_logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Mean negative log-likelihood over every masked token of the batch (the chosen responses):
    token_logp [B,T], mask [B,T] → []. Token-averaged, like a plain SFT cross-entropy."""
    _same_shape(token_logp, mask, "token_logp", "mask")
    m = mask.to(token_logp.dtype)
    n = m.sum()
    if n.item() == 0:
        raise ValueError("nll_loss: the mask selects no token (empty chosen responses?)")
    loss = -(token_logp * m).sum() / n  # [B,T] → []
    return loss, {"nll": loss.item()}


@dataclass
class MPOWeights:
    """MPO's mix (InternVL3.5): 0.8 preference (DPO) + 0.2 quality (BCO) + 1.0 generation (NLL), β = 0.1."""

    dpo: float = 0.8
    bco: float = 0.2
    nll: float = 1.0
    beta: float = 0.1


def mpo_loss(
    chosen_token_logp: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logp: torch.Tensor,
    rejected_mask: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    delta: float,
    weights: MPOWeights = MPOWeights(),
) -> tuple[torch.Tensor, Metrics]:
    """The MPO objective for B pairs.

    chosen/rejected_token_logp [B,T] are the policy's per-token log-probs with their response masks [B,T];
    ref_chosen/ref_rejected [B] are the frozen reference's summed log-probs; δ is BCO's reward shift."""
    policy_chosen = sequence_logprobs(chosen_token_logp, chosen_mask)  # [B]
    policy_rejected = sequence_logprobs(rejected_token_logp, rejected_mask)  # [B]
    dpo, m_dpo = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, weights.beta)
    bco, m_bco = bco_pair_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, delta, weights.beta
    )
    nll, m_nll = nll_loss(chosen_token_logp, chosen_mask)
    loss = weights.dpo * dpo + weights.bco * bco + weights.nll * nll  # []
    return loss, {"loss": loss.item(), **m_dpo, **m_bco, **m_nll}


# ---- GSPO ---------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Â_i = (r_i − mean_G) / std_G within each query's group: rewards [Q,G] → [Q,G].

    std is the population std (defined for any G ≥ 1). A group whose rewards are all equal carries no
    learning signal: its advantages are exactly 0 (never NaN)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [Q,G], got shape {tuple(rewards.shape)}")
    r = rewards.float()
    mean = r.mean(dim=1, keepdim=True)  # [Q,1]
    std = r.std(dim=1, keepdim=True, correction=0)  # [Q,1]
    centred = r - mean  # [Q,G]
    flat = std <= eps  # [Q,1]: an all-equal group
    return torch.where(flat, torch.zeros_like(centred), centred / std.clamp_min(eps))  # [Q,G]


def gspo_log_ratio(
    token_logp: torch.Tensor, old_token_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """log s_i = (1/|y_i|) Σ_t (log π − log π_old): the length-normalised sequence importance ratio.

    token_logp, old_token_logp, mask [B,T] → [B]. The old log-probs are constants (recorded at rollout time)."""
    _same_shape(token_logp, old_token_logp, "token_logp", "old_token_logp")
    _same_shape(token_logp, mask, "token_logp", "mask")
    m = mask.to(token_logp.dtype)
    lengths = m.sum(dim=-1)  # [B]
    if (lengths == 0).any():
        raise ValueError("gspo_log_ratio: a sequence has no response token")
    return ((token_logp - old_token_logp.detach()) * m).sum(dim=-1) / lengths  # [B,T] → [B]


def gspo_loss(
    token_logp: torch.Tensor,
    old_token_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO: −mean_i min(s_i Â_i, clip(s_i, 1 − ε_low, 1 + ε_high) Â_i), no KL.

    token_logp [B,T] (with grad), old_token_logp [B,T], mask [B,T], advantages [B] → []."""
    if advantages.shape != token_logp.shape[:1]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} must be [B] for token_logp {tuple(token_logp.shape)}"
        )
    if eps_low < 0 or eps_high < 0:
        raise ValueError(
            f"clipping ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}"
        )
    log_ratio = gspo_log_ratio(token_logp, old_token_logp, mask)  # [B]
    ratio = torch.exp(log_ratio)  # [B]
    adv = advantages.detach().to(ratio.dtype)  # [B]
    unclipped = ratio * adv  # [B]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv  # [B]
    objective = torch.minimum(unclipped, clipped)  # [B]
    loss = -objective.mean()  # [B] → []
    was_clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | (
        (adv < 0) & (ratio < 1.0 - eps_low)
    )  # [B]
    return loss, {
        "gspo": loss.item(),
        "ratio_mean": ratio.mean().item(),
        "ratio_max": ratio.max().item(),
        "ratio_min": ratio.min().item(),
        "clip_fraction": was_clipped.float().mean().item(),
        "advantage_abs": adv.abs().mean().item(),
    }


def _same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape"
        )
