"""Rollouts: sampling, reproducibility under a seed, KV-cache log-probs vs a teacher-forced pass, rewards."""

import pytest
import torch

from tessera.answers import PreparedQuery, Query, Rollout, SamplingConfig, rollout, score
from tessera.engine import SamplingParams
from tessera.engine.sampling import sample_tokens
from tessera.train.rollout import response_logprobs, sequence_batch


@pytest.fixture(scope="module")
def model(tiny):
    return tiny


def _prepared(model, queries, tiles=(1, 3)):
    """Prompts with random images of different tile counts, so the prompts differ in length."""
    out = []
    for q, n in zip(queries, tiles):
        px = torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(q.seed))
        with torch.no_grad():
            feats, per_tile = model.encode_images(px)
        ids = model.tokenizer.build_prompt(q.question, [sum(per_tile)], thinking=q.thinking)
        out.append(PreparedQuery(q, ids, px, feats, [sum(per_tile)]))
    return out


QUERIES = [
    Query(1, "reasoning", "what is the total plus the count?", "7", thinking=True),
    Query(2, "colour", "what is the colour of the circle?", "red", thinking=False),
]


def never(family, prediction, answer):
    return False


def test_sample_tokens_greedy_top_p_and_generator():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    greedy, nucleus, free = (
        SamplingParams(),
        SamplingParams(temperature=1.0, top_p=1e-3),
        SamplingParams(temperature=1.0),
    )
    ids, lp = sample_tokens(logits, [greedy] * 2, None, logprobs=True)
    assert ids == [1, 0]
    assert torch.allclose(lp, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])
    # a tiny nucleus keeps only the most likely token, whatever the draw
    ids, _ = sample_tokens(logits.repeat(50, 1), [nucleus] * 100, torch.Generator().manual_seed(0))
    assert ids == [1, 0] * 50
    a, _ = sample_tokens(torch.zeros(8, 100), [free] * 8, torch.Generator().manual_seed(5))
    b, _ = sample_tokens(torch.zeros(8, 100), [free] * 8, torch.Generator().manual_seed(5))
    assert a == b


def test_sampled_tokens_follow_the_distribution_and_skip_impossible_ones():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])  # token 1 can never be drawn
    logits = probs.clamp_min(1e-30).log().repeat(4000, 1)  # [4000, 4]
    free = SamplingParams(temperature=1.0)
    for generators in (
        torch.Generator().manual_seed(3),  # one for the batch
        [torch.Generator().manual_seed(i) for i in range(4000)],  # one per row
    ):
        ids, _ = sample_tokens(logits, [free] * 4000, generators)
        freq = torch.bincount(torch.tensor(ids), minlength=4).float() / 4000
        assert freq[1] == 0
        assert torch.allclose(freq, probs, atol=0.03)


def test_rollouts_are_reproducible_under_a_seed(model):
    prep = _prepared(model, QUERIES)
    cfg = SamplingConfig(
        group_size=3, max_new_tokens=6, max_think_tokens=6, queries_per_batch=2, seed=11
    )
    first = rollout(model, QUERIES, cfg, verify=never, prepared=prep)
    again = rollout(model, QUERIES, cfg, verify=never, prepared=prep)
    other = rollout(
        model,
        QUERIES,
        SamplingConfig(group_size=3, max_new_tokens=6, max_think_tokens=6, seed=12),
        verify=never,
        prepared=prep,
    )
    toks = [[r.tokens for r in g.rollouts] for g in first]
    assert toks == [[r.tokens for r in g.rollouts] for g in again]
    assert [[r.logprobs for r in g.rollouts] for g in first] == [
        [r.logprobs for r in g.rollouts] for g in again
    ]
    assert toks != [[r.tokens for r in g.rollouts] for g in other]
    assert [g.query for g in first] == QUERIES and all(len(g.rollouts) == 3 for g in first)
    # the G samples of one query differ (they are samples, not copies)
    assert len({tuple(t) for t in toks[0]}) > 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_match_a_teacher_forced_pass(model, temperature):
    """The KV-cached, left-padded batch must give each row the log-probs a plain forward of that row gives."""
    prep = _prepared(model, QUERIES)
    cfg = SamplingConfig(
        temperature=temperature, group_size=2, max_new_tokens=5, max_think_tokens=9, seed=3
    )
    groups = rollout(model, QUERIES, cfg, verify=never, prepared=prep)
    rows = [(p, r) for p, g in zip(prep, groups) for r in g.rollouts]
    seqs = sequence_batch(
        [p for p, _ in rows],
        [r.tokens for _, r in rows],
        model.tokenizer.pad_id,
        [r.logprobs for _, r in rows],
    )
    with torch.no_grad():
        lp, mask = response_logprobs(model, seqs, temperature=temperature)
    assert int(mask.sum()) == sum(len(r.tokens) for _, r in rows)
    assert torch.allclose(lp[mask], seqs.old_logprobs[mask], atol=2e-4)
    assert (seqs.old_logprobs[~mask] == 0).all()


def test_each_answer_keeps_its_own_budget_and_query_order(model):
    """Thinking and direct queries are batched apart; each row stops at its budget; results stay in order."""
    queries = [QUERIES[1], QUERIES[0], Query(3, "count", "how many circles?", "2")]
    prep = _prepared(model, queries, tiles=(1, 2, 1))
    cfg = SamplingConfig(group_size=2, max_new_tokens=3, max_think_tokens=7, queries_per_batch=2)
    groups = rollout(model, queries, cfg, verify=never, prepared=prep)
    assert [g.query for g in groups] == queries
    for g in groups:
        for r in g.rollouts:
            assert len(r.tokens) <= (7 if g.query.thinking else 3)
            assert r.finished or len(r.tokens) == (7 if g.query.thinking else 3)
            assert len(r.logprobs) == len(r.tokens)


def _tok(model, text):
    return model.tokenizer.encode(text)


def test_rewards_check_format_and_answer(model):
    tok = model.tokenizer
    verify = lambda family, prediction, answer: prediction == answer  # noqa: E731
    think_q, plain_q = QUERIES
    well = (
        [tok.think_id]
        + _tok(model, "\n3 plus 4\n")
        + [tok.end_think_id]
        + _tok(model, "\n\n7")
        + [tok.im_end_id]
    )
    r = score(tok, Rollout(well, [0.0] * len(well), True), think_q, verify)
    assert (r.format_ok, r.correct, r.reward, r.final) == (True, True, 1.0, "7")
    wrong = well[:-2] + _tok(model, "8") + [tok.im_end_id]
    assert score(tok, Rollout(wrong, [0.0] * len(wrong), True), think_q, verify).reward == 0.0
    no_close = [tok.think_id] + _tok(model, "7") + [tok.im_end_id]  # no </think>
    r = score(tok, Rollout(no_close, [0.0] * len(no_close), True), think_q, verify)
    assert not r.format_ok and r.reward == 0.0
    truncated = well[:-1]  # right answer but never ended
    assert (
        score(tok, Rollout(truncated, [0.0] * len(truncated), False), think_q, verify).reward == 0.0
    )
    plain = _tok(model, "red") + [tok.im_end_id]
    assert score(tok, Rollout(plain, [0.0] * len(plain), True), plain_q, verify).reward == 1.0
    tagged = [tok.think_id] + plain  # thinking off must not open a think block
    assert score(tok, Rollout(tagged, [0.0] * len(tagged), True), plain_q, verify).reward == 0.0


def test_bad_sampling_config_is_rejected(model):
    with pytest.raises(ValueError, match="group_size"):
        rollout(
            model,
            QUERIES,
            SamplingConfig(group_size=0),
            verify=never,
            prepared=_prepared(model, QUERIES),
        )
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)


def test_unprepared_lists_queries_not_encoded_or_missing_the_tiles_a_trained_vision_side_needs():
    from tessera.answers import PreparedQuery, unprepared

    a, b, c = (Query(s, "count", "how many?", "2") for s in (1, 2, 3))
    feats = torch.zeros(4, 8)
    prepared = {
        a.key(): PreparedQuery(a, [1], torch.zeros(1, 3, 4, 4), feats, [4]),  # with tiles
        b.key(): PreparedQuery(b, [1], torch.zeros(0, 3, 4, 4), feats, [4]),
    }  # features only
    assert unprepared([a, b, c, c], prepared, need_pixels=False) == [c]
    assert unprepared([a, b, c, c], prepared, need_pixels=True) == [b, c]
