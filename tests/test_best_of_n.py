"""Best-of-N: selection rules, the critic's features, training, storage, and the eval / chat hooks."""

import pytest
import torch

from tessera.answers import PreparedQuery, Query, Rollout
from tessera.auc import auc
from tessera.best_of_n import (
    NUM_FEATURES,
    Critic,
    CriticConfig,
    CriticTrainConfig,
    confidence_features,
    generate_best_of_n,
    select,
    self_check_features,
    train_critic,
)
from tessera.logprobs import sequence_logprobs
from tessera.train.rollout import response_logprobs, sequence_batch


@pytest.fixture(scope="module")
def model(tiny):
    return tiny


def R(final, ok=True):
    return Rollout([1], [0.0], True, final=final, format_ok=ok)


def test_selection_rules():
    rolls = [R("12"), R("12"), R("7"), R("9", ok=False)]
    probs = [0.4, 0.4, 0.7, 0.95]
    assert (
        select(rolls, probs, "critic") == 3
    )  # the single most probable sample, whatever its format
    assert (
        select(rolls, probs, "weighted") == 0
    )  # "12" has support 0.8 > 0.7; its first best sample
    assert select(rolls, [0.4, 0.2, 0.7, 0.95], "weighted") == 2  # 0.6 < 0.7
    assert select(rolls, probs, "vote") == 0  # two votes for "12"; the malformed one never votes
    assert (
        select([R("5", ok=False)] * 2, [0.1, 0.3], "weighted") == 1
    )  # nothing well-formed: critic's favourite
    assert select([R("a"), R("b")], [0.5, 0.5], "critic") == 0  # ties go to the earliest sample
    with pytest.raises(ValueError, match="strategy"):
        select(rolls, probs, "best")
    with pytest.raises(ValueError, match="one probability per sample"):
        select(rolls, probs[:2])


def test_auc_hand_computed():
    # positives 0.9, 0.4; negatives 0.5, 0.1 → pairs won: (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) = 3/4
    assert auc(torch.tensor([0.9, 0.5, 0.4, 0.1]), torch.tensor([1.0, 0, 1, 0])) == pytest.approx(
        0.75
    )
    assert auc(torch.tensor([0.3, 0.3]), torch.tensor([1.0, 0])) == pytest.approx(0.5)


def _prepared(model, n_tiles=2, thinking=False, seed=0):
    px = torch.randn(n_tiles, 3, 112, 112, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        feats, per_tile = model.encode_images(px)
    q = Query(seed, "reasoning", "what is the sum of the labels?", "7", thinking)
    return PreparedQuery(
        q,
        model.tokenizer.build_prompt(q.question, [sum(per_tile)], thinking=thinking),
        px[:0],
        feats,
        [sum(per_tile)],
    )


def test_confidence_features_are_the_answers_log_probs(model):
    preps = [_prepared(model, 1, seed=1), _prepared(model, 3, seed=2)]
    answers = [[40, 41, 42, model.tokenizer.im_end_id], [50, model.tokenizer.im_end_id]]
    seqs = sequence_batch(preps, answers, model.tokenizer.pad_id)
    f = confidence_features(model, preps, answers)
    assert f.shape == (2, 3)
    with torch.no_grad():
        lp, mask = response_logprobs(model, seqs)
    assert torch.allclose(f[:, 0], sequence_logprobs(lp, mask) / mask.sum(1), atol=1e-5)
    assert torch.allclose(f[:, 1], lp.masked_fill(~mask, 0.0).min(dim=1).values, atol=1e-5)
    assert f[1, 2].item() == pytest.approx(torch.log1p(torch.tensor(2.0)).item())


def _direct_logprob(model, prepared, question, value):
    """log P(value, <|im_end|>) after the direct question, one row alone."""
    tok = model.tokenizer
    prompt = tok.build_prompt(question, prepared.image_tokens)
    example = tok.build_example(question, value, prepared.image_tokens)
    p = PreparedQuery(
        prepared.query,
        prompt,
        prepared.pixel_values,
        prepared.image_features,
        prepared.image_tokens,
    )
    seqs = sequence_batch([p], [example.input_ids[len(prompt) :]], tok.pad_id)
    with torch.no_grad():
        lp, mask = response_logprobs(model, seqs)
    return float(sequence_logprobs(lp, mask)[0])


def test_self_check_re_asks_each_claim_and_recomputes_the_sum(model):
    p = _prepared(model, 2, thinking=True, seed=5)
    chains = {
        "right": ("The red circle is labelled 47. There are 2 squares. 47 + 2 = 49.", "49"),
        "bad sum": ("The red circle is labelled 47. There are 2 squares. 47 + 2 = 50.", "50"),
        "wrong final": ("The red circle is labelled 47. There is 1 square. 47 - 1 = 46.", "45"),
        "no chain": ("", "49"),
    }
    rolls = [
        Rollout([1], [0.0], True, text=f"{c}\n\n{final}", final=final, format_ok=True)
        for c, final in chains.values()
    ]
    f = self_check_features(model, p, rolls)
    assert f.shape == (4, 4)
    label = _direct_logprob(model, p, "What is the label of the red circle?", "47")
    two = _direct_logprob(model, p, "How many squares are there?", "2")
    assert f[0, 0].item() == pytest.approx((label + two) / 2, abs=1e-4)
    assert f[0, 1].item() == pytest.approx(min(label, two), abs=1e-4)
    assert f[:, 2].tolist() == [1.0, 1.0, 1.0, 0.0]  # has claims
    assert f[:, 3].tolist() == [
        1.0,
        -1.0,
        -1.0,
        0.0,
    ]  # arithmetic right / wrong / wrong final / none
    assert f[3, :2].tolist() == [0.0, 0.0]


def test_critic_learns_a_separable_signal_and_splits_by_query(tmp_path):
    g = torch.Generator().manual_seed(0)
    E = 1200
    feats = torch.randn(E, NUM_FEATURES, generator=g)
    labels = (feats[:, 0] + 0.5 * feats[:, -1] > 0).float()
    qids = [i // 4 for i in range(E)]  # 300 queries of 4 rollouts
    critic, report = train_critic(
        feats, labels, qids, CriticTrainConfig(epochs=200, val_fraction=0.25)
    )
    assert report.val_queries == 75 and report.examples == E
    assert report.val_accuracy > 0.9 and report.val_auc > 0.95
    critic.save(tmp_path / "critic")
    again = Critic.load(tmp_path)  # a checkpoint folder holding critic/
    assert torch.equal(again(feats), critic(feats).detach())
    with pytest.raises(FileNotFoundError, match="tessera critic"):
        Critic.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="retrain it"):  # a critic saved with other features
        CriticConfig(input_size=2 * 256 + 3)


def test_generate_best_of_n_is_the_eval_hook(model):
    """One row per prompt, stop id removed, reproducible under its seed; prompts with and without images."""
    torch.manual_seed(0)
    critic = Critic(CriticConfig()).eval()
    p1, p2 = _prepared(model, 2, seed=3), _prepared(model, 1, seed=4)
    prompts = [p1.prompt_ids, model.tokenizer.build_prompt("no image here", []), p2.prompt_ids]
    feats = torch.cat([p1.image_features, p2.image_features])
    a = generate_best_of_n(
        model, critic, prompts, feats, False, n=3, max_new_tokens=5, seed=7, strategy="critic"
    )
    b = generate_best_of_n(
        model, critic, prompts, feats, False, n=3, max_new_tokens=5, seed=7, strategy="critic"
    )
    assert a == b and len(a) == 3
    assert all(len(r) <= 5 and model.tokenizer.im_end_id not in r for r in a)
    with pytest.raises(ValueError, match="needs a critic"):
        generate_best_of_n(model, None, prompts, feats, False, n=2, max_new_tokens=2)


def test_evaluate_runs_best_of_n_with_the_model_critic(model):
    from tessera.evaluate import evaluate

    model.critic = Critic(CriticConfig()).eval()
    try:
        result = evaluate(
            model,
            n=2,
            best_of=2,
            max_new_tokens=3,
            max_think_tokens=3,
            families=["colour", "count"],
        )
    finally:
        del model.critic
    assert result.best_of == 2 and result.n == 2 and len(result.records) == 2
    with pytest.raises(ValueError, match="needs a critic"):
        evaluate(model, n=1, best_of=2)
