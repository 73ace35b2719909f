"""GSPO: the accuracy filter, mini-batch building, one step on a toy model, and the stage under the Trainer."""

import random

import pytest
import torch
from torch import nn

from tessera.answers import Group, PreparedQuery, Query, Rollout, SamplingConfig
from tessera.logprobs import sequence_logprobs
from tessera.train.gspo import (
    GSPOConfig,
    GSPOStage,
    gspo_minibatch_loss,
    make_minibatches,
    select_queries,
)
from tessera.train.mpo import QueryStat
from tessera.train.rollout import response_logprobs, sequence_batch


class ToyLM(nn.Module):
    """A bigram language model with the VisionLanguageModel forward signature (no images)."""

    def __init__(self, vocab: int = 12, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.language_model = nn.Sequential(
            nn.Embedding(vocab, dim), nn.Tanh(), nn.Linear(dim, vocab)
        )

    def forward(self, input_ids, pixel_values=None, image_features=None, position_ids=None, **_):
        return self.language_model(input_ids)  # [B,T,V]


def _toy_prepared(query):
    return PreparedQuery(query, [1, 2, 3], torch.zeros(0, 3, 4, 4), torch.zeros(0, 8), [0])


def _rollout(model, prep, tokens, reward):
    """A rollout whose old log-probs are the toy model's own (as if sampled from it just now)."""
    seqs = sequence_batch([prep], [tokens], pad_id=0)
    with torch.no_grad():
        lp, mask = response_logprobs(model, seqs)
    return Rollout(tokens, lp[mask].tolist(), True, correct=reward > 0, reward=reward)


def _seq_logp(model, prep, tokens):
    with torch.no_grad():
        lp, mask = response_logprobs(model, sequence_batch([prep], [tokens], pad_id=0))
    return float(sequence_logprobs(lp, mask))


def test_accuracy_filter_keeps_the_middle_band_inclusive():
    accs = [0.0, 0.125, 0.2, 0.5, 0.8, 0.875, 1.0]
    stats = [QueryStat(Query(i, "reasoning", "q", "1"), a, 8) for i, a in enumerate(accs)]
    assert [q.seed for q in select_queries(stats)] == [2, 3, 4]
    assert [q.seed for q in select_queries(stats, 0.0, 0.1)] == [0]
    with pytest.raises(ValueError):
        select_queries(stats, 0.9, 0.1)


def test_a_gspo_step_raises_the_rewarded_completion():
    model = ToyLM()
    q = Query(0, "reasoning", "q", "7", thinking=False)
    prep = _toy_prepared(q)
    good, bad = [5, 6, 2], [7, 8, 2]
    group = Group(q, [_rollout(model, prep, good, 1.0), _rollout(model, prep, bad, 0.0)])
    before = (_seq_logp(model, prep, good), _seq_logp(model, prep, bad))
    cfg = GSPOConfig(mini_batches=1, sampling=SamplingConfig(group_size=2))
    [mb] = make_minibatches([group], {q.key(): prep}, cfg, pad_id=0, rng=random.Random(0))
    assert sorted(mb.advantages.tolist()) == [-1.0, 1.0]
    loss, metrics = gspo_minibatch_loss(model, mb, cfg)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # on-policy: s_i = 1
    assert metrics["clip_fraction"] == 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss.backward()
    opt.step()
    after = (_seq_logp(model, prep, good), _seq_logp(model, prep, bad))
    assert after[0] > before[0] + 1e-3
    assert after[1] < before[1] - 1e-3


def test_flat_groups_are_dropped_and_give_a_zero_loss():
    model = ToyLM()
    q = Query(0, "reasoning", "q", "7")
    prep = _toy_prepared(q)
    group = Group(q, [_rollout(model, prep, [5, 2], 1.0), _rollout(model, prep, [6, 2], 1.0)])
    cfg = GSPOConfig(sampling=SamplingConfig(group_size=2))
    [mb] = make_minibatches([group], {q.key(): prep}, cfg, 0, random.Random(0))
    assert mb.seqs is None and mb.stats["informative_groups"] == 0.0 and mb.stats["reward"] == 1.0
    loss, metrics = gspo_minibatch_loss(model, mb, cfg)
    assert loss.item() == 0.0 and loss.requires_grad and not torch.isnan(loss)


def test_rollout_batch_is_split_and_later_minibatches_are_off_policy():
    model = ToyLM()
    queries = [Query(i, "reasoning", "q", "7") for i in range(2)]
    preps = {q.key(): _toy_prepared(q) for q in queries}
    completions = [[4, 2], [5, 2], [6, 2], [7, 2]]
    groups = [
        Group(
            q,
            [
                _rollout(model, preps[q.key()], c, float(k % 2 == i))
                for k, c in enumerate(completions)
            ],
        )
        for i, q in enumerate(queries)
    ]
    cfg = GSPOConfig(
        mini_batches=3, eps_low=3e-4, eps_high=4e-4, sampling=SamplingConfig(group_size=4)
    )
    minis = make_minibatches(groups, preps, cfg, 0, random.Random(1))
    assert [m.part for m in minis] == [0, 1, 2]
    assert sum(m.advantages.shape[0] for m in minis) == 8
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ratios = []
    for mb in minis:
        loss, metrics = gspo_minibatch_loss(model, mb, cfg)
        ratios.append(metrics["ratio_mean"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ratios[0] == pytest.approx(1.0, abs=1e-6)
    assert (
        abs(ratios[1] - 1.0) > 1e-4 and abs(ratios[2] - 1.0) > 1e-4
    )  # the policy moved since the rollout


def test_stage_under_the_trainer_learns_what_is_rewarded(tmp_path, monkeypatch, make_tiny):
    """The real stage (rollouts from the tiny VLM being trained, mini-batches, Trainer) for 12 steps on a rule
    reward: the first answer token must lie in the lower half of the vocabulary. Its probability must rise."""
    import tessera.train.gspo as gspo_mod
    from tessera.train.trainer import TrainConfig, Trainer

    model = make_tiny()
    half = model.config.language.vocab_size // 2
    queries = [
        Query(i, "reasoning", f"what is {i} plus one?", str(i + 1), thinking=False)
        for i in range(4)
    ]
    prepared = {}
    for q in queries:
        px = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(q.seed))
        with torch.no_grad():
            feats, per_tile = model.encode_images(px)
        prepared[q.key()] = PreparedQuery(
            q,
            model.tokenizer.build_prompt(q.question, [sum(per_tile)]),
            px[:0],
            feats,
            [sum(per_tile)],
        )

    def rewarded_mass():
        with torch.no_grad():
            return sum(
                torch.softmax(
                    model(torch.tensor([p.prompt_ids]), image_features=p.image_features)[0, -1], -1
                )[:half]
                .sum()
                .item()
                for p in prepared.values()
            ) / len(prepared)

    # a random model never finishes an answer, so the world's verifier would reward nothing: use the rule instead
    real = gspo_mod.rollout

    def rollout_with_rule(model, qs, sampling, verify=None, prepared=None):
        groups = real(model, qs, sampling, verify=lambda *_: False, prepared=prepared)
        for g in groups:
            for r in g.rollouts:
                r.reward = float(r.tokens[0] < half)
        return groups

    monkeypatch.setattr(gspo_mod, "rollout", rollout_with_rule)
    stage = GSPOStage(
        queries,
        GSPOConfig(
            queries_per_rollout=4,
            mini_batches=2,
            sampling=SamplingConfig(group_size=8, max_new_tokens=2),
        ),
        prepared=prepared,
    )
    before = rewarded_mass()
    config = TrainConfig(
        steps=12, lr=3e-3, warmup_steps=1, min_lr_ratio=1.0, log_every=1, progress=False, threads=1
    )
    result = Trainer(
        model, stage, config, tmp_path, save_model=lambda m, p: p.mkdir(exist_ok=True)
    ).fit()
    assert result.step == 12
    assert result.history[0]["on_policy"] == 1.0 and result.history[0][
        "ratio_mean"
    ] == pytest.approx(1.0, abs=1e-4)
    assert result.history[1]["on_policy"] == 0.0  # the second mini-batch of the same rollout batch
    assert rewarded_mass() > before + 0.1
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("vision_model") for n in frozen) and not any(
        n.startswith("language_model") for n in frozen
    )


def test_build_stage_filters_the_stored_offline_accuracies(tmp_path, make_tiny):
    from tessera.train import build_stage
    from tessera.train.mpo import write_jsonl

    model = make_tiny()
    stats = [
        QueryStat(Query(i, "reasoning", "q", "1", True), a, 8)
        for i, a in enumerate([0.0, 0.25, 0.75, 1.0])
    ]
    write_jsonl(tmp_path / "queries.jsonl", stats)
    stage = build_stage(
        "gspo",
        model,
        {"accuracies": str(tmp_path / "queries.jsonl"), "eps_high": 5e-4, "mini_batches": 2},
    )
    assert [q.seed for q in stage.queries] == [1, 2]
    assert (
        stage.config.eps_high == 5e-4
        and stage.config.eps_low == 3e-4
        and stage.config.mini_batches == 2
    )
    assert stage.config.sampling == SamplingConfig(queries_per_batch=8)  # GSPO's default
    # the sampling fields, flat (as run configs wrote them before they were grouped) or grouped
    accuracies = str(tmp_path / "queries.jsonl")
    flat = {"accuracies": accuracies, "group_size": 4, "temperature": 0.7, "seed": 3}
    grouped = {"group_size": 4, "temperature": 0.7, "seed": 3}
    nested = {"accuracies": accuracies, "sampling": grouped}
    for options in (flat, nested):
        assert build_stage("gspo", model, options).config.sampling == SamplingConfig(
            temperature=0.7, group_size=4, queries_per_batch=8, seed=3
        )
    with pytest.raises(ValueError, match="temperature given both flat and under 'sampling'"):
        build_stage("gspo", model, {**nested, "temperature": 1.0})
    with pytest.raises(ValueError, match="unknown GSPOData option.*tempreature"):
        build_stage("gspo", model, {"accuracies": accuracies, "tempreature": 0.7})
    with pytest.raises(ValueError, match="no query"):
        build_stage(
            "gspo", model, {"accuracies": str(tmp_path / "queries.jsonl"), "low": 0.3, "high": 0.7}
        )
