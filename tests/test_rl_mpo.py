"""MPO: pair building (never two of a kind), storage round trip, and the stage's loss under the Trainer."""

import math
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tessera.answers import Group, PreparedQuery, Query, Rollout, SamplingConfig
from tessera.train.mpo import (
    MPOStage,
    PreferencePair,
    QueryStat,
    build_pairs,
    read_pairs,
    read_stats,
    write_jsonl,
)


def _group(outcomes, query=None):
    """A group whose rollout k has tokens [10 + k, 2] and correctness outcomes[k]."""
    query = query or Query(7, "reasoning", "what is 3 plus 4?", "7", thinking=True)
    rolls = [
        Rollout([10 + k, 2], [-1.0, -1.0], True, text=str(k), correct=c, reward=float(c))
        for k, c in enumerate(outcomes)
    ]
    return Group(query, rolls)


@pytest.mark.parametrize("seed", range(20))
def test_pairs_are_always_one_correct_and_one_wrong(seed):
    rng = random.Random(seed)
    outcomes = [rng.random() < 0.5 for _ in range(8)]
    group = _group(outcomes)
    correct = {tuple(r.tokens) for r in group.rollouts if r.correct}
    wrong = {tuple(r.tokens) for r in group.rollouts if not r.correct}
    pairs = build_pairs(group, max_pairs=4, rng=rng)
    assert len(pairs) == (min(4, max(len(correct), len(wrong))) if correct and wrong else 0)
    for p in pairs:
        assert tuple(p.chosen) in correct and tuple(p.rejected) in wrong
        assert p.accuracy == pytest.approx(sum(outcomes) / 8)
        assert p.query == group.query


def test_no_pairs_from_all_correct_or_all_wrong_and_duplicates_merge():
    rng = random.Random(0)
    assert build_pairs(_group([True] * 4), 4, rng) == []
    assert build_pairs(_group([False] * 4), 4, rng) == []
    g = _group([True, False, False])
    g.rollouts[2].tokens = list(g.rollouts[1].tokens)  # the two wrong answers are identical
    pairs = build_pairs(g, 4, rng)
    assert len(pairs) == 1  # one distinct correct × one distinct wrong


def test_pairs_and_stats_round_trip_through_jsonl(tmp_path):
    pairs = build_pairs(_group([True, False, True, False]), 2, random.Random(0))
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert read_pairs(tmp_path / "pairs.jsonl") == pairs
    stats = [QueryStat(Query(3, "count", "how many?", "2", False, "train"), 0.375, 8)]
    write_jsonl(tmp_path / "queries.jsonl", stats)
    assert read_stats(tmp_path / "queries.jsonl") == stats
    line = (tmp_path / "pairs.jsonl").read_text().splitlines()[0]
    assert '"seed": 7' in line and '"accuracy": 0.5' in line  # the scene seed travels with the pair


class ToyLM(nn.Module):
    """A bigram LM with the VisionLanguageModel forward signature and a tokenizer stub (pad id 0)."""

    def __init__(self, vocab: int = 12, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.language_model = nn.Sequential(
            nn.Embedding(vocab, dim), nn.Tanh(), nn.Linear(dim, vocab)
        )
        self.tokenizer = SimpleNamespace(pad_id=0)

    def forward(self, input_ids, pixel_values=None, image_features=None, position_ids=None, **_):
        return self.language_model(input_ids)  # [B,T,V]


def _stage(model, n_pairs=4):
    q = Query(1, "reasoning", "q", "7")
    prepared = {q.key(): PreparedQuery(q, [1, 3], torch.zeros(0, 3, 4, 4), torch.zeros(0, 8), [0])}
    pairs = [PreferencePair(q, [5, 6, 2], [7, 8, 2], accuracy=0.5) for _ in range(n_pairs)]
    stage = MPOStage(pairs, pairs_per_batch=2, prepared=prepared)
    stage.setup(model)
    return stage


def test_first_step_loss_equals_the_hand_value_at_the_reference():
    """At step 0 the policy is the reference: DPO = log 2, BCO (δ = 0) = 2·log 2, NLL = chosen token NLL."""
    model = ToyLM()
    stage = _stage(model)
    batch, position = next(stage.batches(0, 0, 1))
    assert position == 1 and batch.pairs == 2
    loss, m = stage.loss(model, batch, normalizer=1.0)
    with torch.no_grad():
        logp = torch.log_softmax(model.language_model(torch.tensor([[1, 3, 5, 6]])), -1)[0]  # [4,V]
    nll = -(logp[1, 5] + logp[2, 6] + logp[3, 2]).item() / 3
    assert m["dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["bco"] == pytest.approx(2 * math.log(2), abs=1e-6)
    assert m["nll"] == pytest.approx(nll, abs=1e-5)
    assert loss.item() == pytest.approx(0.8 * math.log(2) + 0.2 * 2 * math.log(2) + nll, abs=1e-5)


def test_stage_under_the_trainer_prefers_the_chosen_answer(tmp_path):
    from tessera.train.trainer import TrainConfig, Trainer

    model = ToyLM()
    stage = _stage(model)
    config = TrainConfig(steps=6, lr=0.05, warmup_steps=1, log_every=1, progress=False, threads=1)
    result = Trainer(
        model, stage, config, tmp_path, save_model=lambda m, p: p.mkdir(exist_ok=True)
    ).fit()
    first, last = result.history[0], result.history[-1]
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert last["reward_margin"] > 0.0 and last["reward_accuracy"] == 1.0
    assert last["bco_delta"] != 0.0  # the running mean moved with the implicit rewards


def test_stage_refuses_an_empty_pair_set():
    with pytest.raises(ValueError, match="at least one preference pair"):
        MPOStage([])


def test_build_stage_from_stored_pairs_renders_the_scenes(tmp_path, make_tiny):
    """`tessera train mpo` with data.pairs: the scenes come back from their seeds, the reference is recorded."""
    from tessera.answers import world_query
    from tessera.train import build_stage

    model = make_tiny()
    q = world_query(5, "reasoning")
    end = model.tokenizer.im_end_id
    pairs = [
        PreferencePair(q, [40, 41, end], [42, end], accuracy=0.5),
        PreferencePair(q, [43, end], [44, 45, end]),
    ]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    stage = build_stage(
        "mpo", model, {"pairs": str(tmp_path / "pairs.jsonl"), "pairs_per_batch": 2}
    )
    assert stage.trainable == {"vision": False, "connector": False, "router": False}
    stage.setup(model)
    batch, _ = next(stage.batches(0, 0, 1))
    loss, m = stage.loss(model, batch, 1.0)
    assert torch.isfinite(loss) and m["dpo"] == pytest.approx(math.log(2), abs=1e-4)
    assert (
        stage.prepared[q.key()].image_features.shape[0] == stage.prepared[q.key()].image_tokens[0]
    )


# ---- the frozen reference: recorded at sampling time, or scored by the model ------------------------


def _model_sums(model, pairs):
    """Σ log π(chosen), Σ log π(rejected) of ToyLM on prompt [1, 3] + answer, by hand."""
    out = []
    with torch.no_grad():
        for p in pairs:
            sums = []
            for answer in (p.chosen, p.rejected):
                ids = [1, 3] + answer
                logp = torch.log_softmax(model.language_model(torch.tensor([ids])), -1)[0]  # [T,V]
                sums.append(sum(logp[1 + j, t].item() for j, t in enumerate(answer)))
            out.append(tuple(sums))
    return out


def _recorded_stage(model, shift=0.0, **kw):
    q = Query(1, "reasoning", "q", "7")
    prepared = {q.key(): PreparedQuery(q, [1, 3], torch.zeros(0, 3, 4, 4), torch.zeros(0, 8), [0])}
    pairs = [
        PreferencePair(q, [5, 6, 2], [7, 8, 2], accuracy=0.5),
        PreferencePair(q, [4, 2], [9, 9, 9, 2]),
    ]
    for p, (c, r) in zip(pairs, _model_sums(model, pairs)):
        p.chosen_logprob, p.rejected_logprob = c + shift, r + shift
    return MPOStage(pairs, pairs_per_batch=2, prepared=prepared, **kw), pairs


def batch_references(stage) -> list[float]:
    """The frozen reference a set-up stage trains against: (Σ log π(chosen), Σ log π(rejected)) of
    each pair of its first batch (every pair when pairs_per_batch covers them), sorted, flat."""
    batch, _ = next(stage.batches(0, 0, 1))
    pairs = sorted(zip(batch.ref_chosen.tolist(), batch.ref_rejected.tolist()))
    return [x for pair in pairs for x in pair]


def test_pairs_record_their_summed_sampling_logprobs():
    pairs = build_pairs(_group([True, False]), 2, random.Random(0))
    assert [(p.chosen_logprob, p.rejected_logprob) for p in pairs] == [(-2.0, -2.0)]
    assert pairs[0].recorded
    unrecorded = build_pairs(_group([True, False]), 2, random.Random(0), record_logprobs=False)
    assert unrecorded[0].chosen_logprob is None and not unrecorded[0].recorded


def test_recorded_logprobs_are_the_reference_when_the_model_agrees():
    model = ToyLM()
    stage, pairs = _recorded_stage(model)
    stage.setup(model)
    assert stage.reference_source == "rollout"
    recorded = sorted((p.chosen_logprob, p.rejected_logprob) for p in pairs)
    flat = [x for pair in recorded for x in pair]
    assert batch_references(stage) == pytest.approx(flat, abs=1e-6)
    batch, _ = next(stage.batches(0, 0, 1))
    _, m = stage.loss(model, batch, 1.0)
    assert m["dpo"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is the reference at step 0


def test_recorded_logprobs_of_another_model_are_not_trusted():
    model = ToyLM()
    stage, _ = _recorded_stage(model, shift=0.5)  # as if another model had sampled the pairs
    stage.setup(model)
    assert stage.reference_source == "model"
    scored = sorted(_model_sums(model, stage.pairs))
    assert batch_references(stage) == pytest.approx([x for pair in scored for x in pair], abs=1e-5)
    strict, _ = _recorded_stage(model, shift=0.5, reference="rollout")
    with pytest.raises(ValueError, match="sampled by another model"):
        strict.setup(model)


def test_rollout_reference_needs_recorded_logprobs_and_a_known_mode():
    model = ToyLM()
    stage = _stage(model)  # pairs without recorded log-probs: scored by the model
    assert stage.reference_source == "model"
    q = stage.pairs[0].query
    with pytest.raises(ValueError, match="recorded log-probs"):
        MPOStage(stage.pairs, 2, prepared=stage.prepared, reference="rollout").setup(model)
    with pytest.raises(ValueError, match="reference must be"):
        MPOStage([PreferencePair(q, [5, 2], [6, 2])], reference="frozen")


def test_collected_pairs_carry_the_reference_and_the_encoded_scenes():
    """The shipped SFT model (stored in bf16) collects at temperature 1: it is sampled in fp32, the precision MPO
    trains in, so MPO takes the recorded log-probs (they agree with a teacher-forced pass) and the collection's
    image features, and its setup encodes and scores nothing again."""
    import tessera
    from tessera.answers import answer_logprobs
    from tessera.train.mpo import MPOData, collect_or_load

    model = tessera.load("checkpoints/tiny-sft")
    sampling = SamplingConfig(group_size=4, seed=2)
    data = MPOData(queries=6, families={"count": 1.0}, sampling=sampling)
    result = collect_or_load(model, data, log=None)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.pairs and all(p.recorded for p in result.pairs)
    assert set(result.prepared) == {p.query.key() for p in result.pairs}
    assert all(
        p.pixel_values.numel() == 0 and p.image_features.shape[0] == p.image_tokens[0]
        for p in result.prepared.values()
    )
    stage = MPOStage(result.pairs, 2, prepared=dict(result.prepared))
    stage.setup(model)
    assert stage.reference_source == "rollout"
    assert all(
        stage.prepared[k] is result.prepared[k] for k in result.prepared
    )  # nothing encoded again
    prompts = [result.prepared[p.query.key()] for p in result.pairs]
    with torch.no_grad():  # teacher-forced Σ log π of each answer, beside what the rollout recorded
        for side in ("chosen", "rejected"):
            answers = [getattr(p, side) for p in result.pairs]
            recorded = [getattr(p, f"{side}_logprob") for p in result.pairs]
            lp, mask = answer_logprobs(model.eval(), prompts, answers)  # [B,L]
            assert (lp * mask).sum(1).tolist() == pytest.approx(recorded, abs=1e-3)
    hot_data = MPOData(
        queries=6, families={"count": 1.0}, sampling=replace(sampling, temperature=0.7)
    )
    hot = collect_or_load(model, hot_data, log=None)
    assert hot.pairs and not any(
        p.recorded for p in hot.pairs
    )  # another temperature: not the model's log-probs
