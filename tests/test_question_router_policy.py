"""The question router as a policy over compress masks: exact rollouts, the estimator's direction, the price."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_router_stage import routed_answer_loss, routed_inputs
from test_vico import make_sample

import tessera.train.question_router_policy as policy
from tessera.model.router import COMPRESS, KEEP
from tessera.train.question_router_policy import (
    MaskScores,
    QuestionRouterPolicyStage,
    answer_cost,
    group_advantages,
    kept_share,
    mask_log_prob,
    question_rows,
    score_masks,
)
from tessera.train.question_router_stage import projected_tiles
from tessera.train.router_stage import SampleBatch


def asked(model, index: int, tiles: list[int], question: str = "what is the label?"):
    return dataclasses.replace(make_sample(model, index, tiles), questions=(question,))


def plain_misses(model, sample, compress: list[bool]) -> int:
    """Answer tokens whose argmax is wrong, one plain forward with the tiles in `compress` at 1/16."""
    enc, feats = routed_inputs(model, sample, compress)
    with torch.no_grad():
        logits = model(torch.tensor([enc.input_ids]), image_features=feats)[0]  # [T, V]
    ids, mask = torch.tensor(enc.input_ids), torch.tensor(enc.loss_mask, dtype=torch.bool)
    return int((logits[:-1].argmax(-1) != ids[1:])[mask[1:]].sum())


def test_every_draw_is_scored_exactly_and_its_tokens_counted(tiny):
    model = tiny.eval()
    cfg = model.config
    samples = [asked(model, 1, [3]), asked(model, 2, [2, 1], "what colour is the square?")]
    tile, row_question, questions = question_rows(samples)
    assert tile.tolist() == [0, 1, 2, 3, 4, 5] and row_question.tolist() == [0, 0, 0, 1, 1, 1]
    assert questions == ["what is the label?", "what colour is the square?"]
    masks = torch.tensor([[True, False, True, False, False, True], [False] * 6, [True] * 6])
    with torch.no_grad():
        _, feats_full, feats_small = projected_tiles(model, samples)
    scores = score_masks(model, samples, masks, feats_full, feats_small)  # [G, Q] each
    assert scores.mean.shape == (3, 2)
    answer_tokens = [sum(s.loss_mask[1:]) for s in samples]
    for g in range(3):
        for q, s in enumerate(samples):
            expect = routed_answer_loss(model, s, masks[g, 3 * q : 3 * q + 3].tolist())
            assert scores.mean[g, q].item() == pytest.approx(expect, rel=1e-4)
            assert scores.tokens[g, q].item() == answer_tokens[q]
            assert scores.nats[g, q].item() == pytest.approx(expect * answer_tokens[q], rel=1e-4)
            compress = masks[g, 3 * q : 3 * q + 3].tolist()
            assert scores.misses[g, q].item() == plain_misses(model, s, compress)
    full, small = cfg.tokens_per_tile, cfg.compressed_tokens_per_tile
    kept = kept_share(masks, row_question, 2, full, small)
    assert kept[0].tolist() == pytest.approx(
        [(2 * small + full) / (3 * full), (small + 2 * full) / (3 * full)]
    )
    assert kept[1].tolist() == [1.0, 1.0] and kept[2].tolist() == pytest.approx([small / full] * 2)


def test_log_probability_of_a_mask_and_the_group_baseline():
    logits = torch.randn(5, 2)
    masks = torch.tensor([[True, False, False, True, True], [False, False, True, True, False]])
    row_question = torch.tensor([0, 0, 1, 1, 1])
    logp = mask_log_prob(logits, masks, row_question, 2, temperature=2.0)  # [G, Q]
    lp = torch.log_softmax(logits / 2.0, -1)
    for g in range(2):
        for q in range(2):
            rows = (row_question == q).nonzero().flatten().tolist()
            expect = sum(lp[i, COMPRESS if masks[g, i] else KEEP] for i in rows)
            assert logp[g, q].item() == pytest.approx(float(expect), rel=1e-5)
    rewards = torch.tensor([[1.0, 0.3], [3.0, 0.3], [2.0, 0.3]])
    adv = group_advantages(rewards)
    assert adv[:, 0].tolist() == pytest.approx([-1.0, 1.0, 0.0]) and adv[:, 1].tolist() == [0.0] * 3


def test_answer_costs():
    scores = MaskScores(
        nats=torch.tensor([[6.0, 0.2]]),
        tokens=torch.tensor([[2.0, 2.0]]),
        misses=torch.tensor([[1.0, 0.0]]),
    )
    assert answer_cost(scores, "mean_nats", cap=2.0)[0].tolist() == pytest.approx([2.0, 0.1])
    assert answer_cost(scores, "nats", cap=5.0)[0].tolist() == pytest.approx([5.0, 0.2])
    # exact: 1 where greedy no longer reproduces the answer, the mean cross-entropy as a small tie-break
    assert answer_cost(scores, "exact", cap=5.0)[0].tolist() == pytest.approx([1.3, 0.01])
    with pytest.raises(ValueError, match="cost must be one of"):
        answer_cost(scores, "bleu", cap=1.0)


def _steps(model, stage, samples, n: int, lr: float = 0.05) -> None:
    params = [p for name, p in model.named_parameters() if stage.param_filter(name)]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(n):
        loss, _ = stage.loss(model, SampleBatch(samples), float(len(samples)))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _p_compress(model, samples) -> torch.Tensor:
    with torch.no_grad():
        tokens, _, _ = projected_tiles(model, samples)
        tile, row_question, questions = question_rows(samples)
        return torch.softmax(
            policy.router_logits(model, tokens, tile, row_question, questions), -1
        )[:, COMPRESS]


def test_the_policy_compresses_what_costs_nothing_and_keeps_what_the_answer_needs(
    make_tiny, monkeypatch
):
    """A stand-in answer loss that only tile 0 of each image (a brighter one) matters to: the estimator must
    lower p(compress) for tile 0 and raise it for the others, whose only effect is the token price."""
    model = make_tiny().eval()
    model.add_question_router()
    samples = [asked(model, i, [3]) for i in range(4)]
    for s in (
        samples
    ):  # the tile the answer needs looks different (the router sees tiles, not positions)
        s.pixel_values[0] = s.pixel_values[0].abs() + 2.0

    def loss_needing_tile_0(model, samples, masks, feats_full, feats_small, *options):
        lost = 3.0 * masks.view(masks.shape[0], len(samples), 3)[:, :, 0].float()  # [G, Q]
        return MaskScores(lost, torch.ones_like(lost), torch.zeros_like(lost))

    monkeypatch.setattr(policy, "score_masks", loss_needing_tile_0)
    stage = QuestionRouterPolicyStage(lambda i: samples[i % 4], group=8, price=1.0, price_lr=0.0)
    before = _p_compress(model, samples).view(4, 3)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(model, stage, samples, 25)
    after = _p_compress(model, samples).view(4, 3)
    assert (after[:, 0] < before[:, 0] - 0.1).all()
    assert (after[:, 1:] > before[:, 1:] + 0.05).all()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
    assert changed and all(n.startswith("question_router.") for n in changed)


def test_the_price_rises_while_the_masks_save_too_little_and_falls_when_they_save_too_much(
    make_tiny,
):
    model = make_tiny().eval()
    model.add_question_router()
    samples = [asked(model, i, [2]) for i in range(2)]
    for target, direction in ((0.74, 1), (0.01, -1)):
        stage = QuestionRouterPolicyStage(
            lambda i: samples[i % 2], group=2, target_saved=target, price=1.0
        )
        _, metrics = stage.loss(model, SampleBatch(samples), 2.0)
        assert metrics["price"] == 1.0 and (stage.price - 1.0) * direction > 0
        assert 0.0 <= metrics["saved"] <= 0.75
    # a floor by default: the price stops at zero; held, it turns negative and pays for kept tokens
    prices = []
    for hold in (False, True):
        stage = QuestionRouterPolicyStage(
            lambda i: samples[i % 2], group=2, target_saved=0.01, price=0.0, hold_target=hold
        )
        stage.loss(model, SampleBatch(samples), 2.0)
        prices.append(stage.price)
    assert prices[0] == 0.0 and prices[1] < 0.0


def test_bad_policy_options_are_refused():
    with pytest.raises(ValueError, match="group must be >= 2"):
        QuestionRouterPolicyStage(lambda i: None, group=1)
    with pytest.raises(ValueError, match="target_saved"):
        QuestionRouterPolicyStage(lambda i: None, target_saved=0.9)
    with pytest.raises(ValueError, match="temperature"):
        QuestionRouterPolicyStage(lambda i: None, temperature=0.0)
    with pytest.raises(ValueError, match="cost must be one of"):
        QuestionRouterPolicyStage(lambda i: None, cost="accuracy")
