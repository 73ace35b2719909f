"""The RL losses against values worked out by hand (the arithmetic is written out in each test)."""

import math

import pytest
import torch

from tessera.logprobs import sequence_logprobs, token_logprobs
from tessera.train.rl_losses import (
    MPOWeights,
    RunningMean,
    bco_pair_loss,
    dpo_loss,
    group_advantages,
    gspo_log_ratio,
    gspo_loss,
    implicit_reward_mean,
    mpo_loss,
    nll_loss,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def softplus(x):  # −log σ(x) = log(1 + e^−x)
    return math.log1p(math.exp(-x))


def test_token_and_sequence_logprobs():
    # one position, vocabulary of 2 with logits (0, ln 3): p = (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # [1,2,2]
    targets = torch.tensor([[1, 0]])
    lp = token_logprobs(logits, targets)
    assert lp[0, 0].item() == pytest.approx(math.log(0.75))
    assert lp[0, 1].item() == pytest.approx(math.log(0.5))
    # temperature 2 halves the logits: (0, ln 3 / 2) → p1 = √3 / (1 + √3)
    lp2 = token_logprobs(logits, targets, temperature=2.0)
    assert lp2[0, 0].item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))))
    # the mask drops the second token from the sum
    assert sequence_logprobs(lp, t(1, 0).unsqueeze(0)).item() == pytest.approx(math.log(0.75))


def test_dpo_hand_computed():
    # pair 1: chosen ratio −1 − (−2) = 1, rejected −3 − (−2) = −1 → margin 0.1·(1 − (−1)) = 0.2
    # pair 2: chosen ratio −5 − (−4) = −1, rejected −4 − (−5) = 1 → margin −0.2
    loss, m = dpo_loss(t(-1, -5), t(-3, -4), t(-2, -4), t(-2, -5), beta=0.1)
    assert loss.item() == pytest.approx((softplus(0.2) + softplus(-0.2)) / 2)
    assert m["reward_accuracy"] == 0.5
    assert m["reward_margin"] == pytest.approx(0.0, abs=1e-7)
    assert m["reward_chosen"] == pytest.approx((0.1 - 0.1) / 2, abs=1e-7)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = t(-2.0).requires_grad_(), t(-2.0).requires_grad_()
    loss, _ = dpo_loss(pc, pr, t(-2.0), t(-2.0), beta=0.1)
    loss.backward()
    # d/dpc −log σ(β(pc − pr)) = −β·σ(−margin) = −0.1·σ(0) = −0.05
    assert pc.grad.item() == pytest.approx(-0.05)
    assert pr.grad.item() == pytest.approx(0.05)


def test_bco_with_shift_hand_computed():
    # chosen reward 0.1·(−1 − (−2)) = 0.1, rejected 0.1·(−3 − (−2)) = −0.1, δ = 0.05
    # loss = −log σ(0.1 − 0.05) − log σ(−(−0.1 − 0.05)) = softplus(0.05) + softplus(0.15)
    loss, m = bco_pair_loss(t(-1), t(-3), t(-2), t(-2), delta=0.05, beta=0.1)
    assert loss.item() == pytest.approx(softplus(0.05) + softplus(0.15))
    assert m["bco_delta"] == 0.05


def test_running_mean_and_implicit_reward_mean():
    # rewards: chosen 0.1, rejected −0.1 in pair 1; chosen 0.3, rejected 0.1 in pair 2 → mean 0.1
    assert implicit_reward_mean(t(-1, 1), t(-3, -1), t(-2, -2), t(-2, -2)) == pytest.approx(0.1)
    rm = RunningMean()
    assert rm.mean == 0.0
    rm.update(0.1)
    assert rm.update(0.4) == pytest.approx(0.25)


def test_nll_is_token_mean_over_mask():
    lp = t(-1, -2, -9, -3).view(2, 2)  # [B=2, T=2]
    mask = t(1, 1, 0, 1).view(2, 2)
    loss, _ = nll_loss(lp, mask)
    assert loss.item() == pytest.approx((1 + 2 + 3) / 3)
    with pytest.raises(ValueError, match="no token"):
        nll_loss(lp, torch.zeros_like(mask))


def test_mpo_mixes_the_three_terms():
    chosen = t(-0.5, -0.5).view(1, 2)  # sum −1, token mean NLL 0.5
    rejected = t(-1.0, -2.0).view(1, 2)  # sum −3
    mask = torch.ones(1, 2)
    loss, m = mpo_loss(chosen, mask, rejected, mask, t(-2), t(-2), delta=0.05)
    expected = 0.8 * softplus(0.2) + 0.2 * (softplus(0.05) + softplus(0.15)) + 1.0 * 0.5
    assert loss.item() == pytest.approx(expected)
    assert m["dpo"] == pytest.approx(softplus(0.2)) and m["nll"] == pytest.approx(0.5)
    only_dpo, _ = mpo_loss(
        chosen, mask, rejected, mask, t(-2), t(-2), 0.05, MPOWeights(dpo=1, bco=0, nll=0)
    )
    assert only_dpo.item() == pytest.approx(softplus(0.2))


def test_group_advantages_hand_computed_and_flat_group():
    # group 1: rewards (1, 0, 0, 1): mean 0.5, population std 0.5 → (1, −1, −1, 1)
    # group 2: all equal → zero advantage, no NaN
    # group 3: (1, 0, 0, 0): mean 0.25, std √(0.1875) → (0.75, −0.25, −0.25, −0.25) / 0.4330
    adv = group_advantages(torch.tensor([[1.0, 0, 0, 1], [1.0, 1, 1, 1], [1.0, 0, 0, 0]]))
    assert torch.allclose(adv[0], t(1, -1, -1, 1))
    assert torch.equal(adv[1], torch.zeros(4))
    s = math.sqrt(0.1875)
    assert torch.allclose(adv[2], t(0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s))
    assert not torch.isnan(adv).any()
    assert torch.equal(group_advantages(torch.zeros(2, 1)), torch.zeros(2, 1))  # G = 1


def test_gspo_ratio_is_length_normalised():
    # sequence 1: Δ log p = (0.2, 0.4) over 2 tokens → log s = 0.3; sequence 2: one token, Δ = −0.1 (pad ignored)
    new = t(-1.0, -1.0, -1.0, 5.0).view(2, 2)
    old = t(-1.2, -1.4, -0.9, 0.0).view(2, 2)
    mask = t(1, 1, 1, 0).view(2, 2)
    assert torch.allclose(gspo_log_ratio(new, old, mask), t(0.3, -0.1))


def test_gspo_clipping_hand_computed():
    eps_l, eps_h = 3e-4, 4e-4
    # s = (e^0.001, e^0.001, e^−0.001, e^−0.001, 1) with Â = (+1, −1, +1, −1, +2)
    # seq 1: s > 1 + ε_h and Â > 0 → clipped: (1 + 4e-4)·1
    # seq 2: Â < 0 → min(−s, −(1+ε_h)) = −s (unclipped, more pessimistic)
    # seq 3: Â > 0, s < 1 → min(s, 1 − ε_l) = s
    # seq 4: Â < 0, s < 1 − ε_l → clipped: −(1 − 3e-4)
    # seq 5: on-policy, s = 1 → 2
    lr = t(0.001, 0.001, -0.001, -0.001, 0.0)
    adv = t(1, -1, 1, -1, 2)
    new = lr.view(5, 1)
    old = torch.zeros(5, 1)
    loss, m = gspo_loss(new, old, torch.ones(5, 1), adv, eps_l, eps_h)
    e = math.exp
    expected = -((1 + eps_h) - e(0.001) + e(-0.001) - (1 - eps_l) + 2) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["clip_fraction"] == pytest.approx(2 / 5)


def test_gspo_gradient_on_policy_is_advantage_times_mean_token_grad():
    # at s = 1 the objective's gradient w.r.t. each token log-prob is Â / (|y|·B)
    lp = torch.zeros(2, 3, requires_grad=True)
    mask = t(1, 1, 1, 1, 0, 0).view(2, 3)
    loss, _ = gspo_loss(lp, torch.zeros(2, 3), mask, t(1.5, -1.0))
    loss.backward()
    assert torch.allclose(lp.grad, -t(1.5 / 3, 1.5 / 3, 1.5 / 3, -1.0 / 1, 0, 0).view(2, 3) / 2)
    # a clipped sequence contributes no gradient
    lp2 = torch.full((1, 1), 0.01, requires_grad=True)
    gspo_loss(lp2, torch.zeros(1, 1), torch.ones(1, 1), t(1.0))[0].backward()
    assert lp2.grad.item() == 0.0


def test_shape_errors_are_loud():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(t(1, 2), t(1), t(1, 2), t(1, 2))
    with pytest.raises(ValueError, match="advantages"):
        gspo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), t(1, 2, 3))
    with pytest.raises(ValueError, match="no response token"):
        gspo_log_ratio(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"\[Q,G\]"):
        group_advantages(t(1, 2))
