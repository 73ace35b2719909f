"""The question-aware router: its conditioning, the `question` routing mode and matched budgets, the
per-question labels of its stage, a learning step, and the world's oracles."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_router_stage import routed_answer_loss
from test_vico import make_sample

from tessera.image import ImageProcessor
from tessera.routing import (
    RoutingError,
    RoutingPolicy,
    decide,
    encode_routed,
    per_image_counts,
    question_vectors,
)
from tessera.train.data import Encoded
from tessera.train.question_router_stage import (
    QuestionRouterStage,
    Replay,
    SampleBatch,
    mixed_mask,
    question_router_scores,
    question_tile_ratios,
)
from tessera.train.router_stage import router_bce, router_labels
from tessera.world import (
    bound_oracle,
    eval_items,
    evidence_oracle,
    text_free_token_savings,
    tuning_items,
)
from tessera.world import (
    make_sample as world_sample,
)

QUESTIONS = [
    "What colour is the triangle?",
    "In the document, what is the number after the red mark?",
    "What is the label of the blue circle?",
    "How many squares are there?",
]


@pytest.fixture(scope="module")
def conditioned(tokenizer):
    """A tiny Flash model whose question router is moved off its zero-init conditioning."""
    from tessera.model.init import init_model

    model = init_model("tiny", tokenizer=tokenizer, seed=0).eval()
    qr = model.add_question_router()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (qr.film, qr.query_proj, qr.question_proj):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    return model


def image_tiles(model, seed: int = 3):
    sample = world_sample(seed, family="document", split="eval")
    return ImageProcessor.from_config(model.config)([sample.image])


def test_a_fresh_question_router_decides_as_the_released_router(tiny):
    model = copy.deepcopy(tiny)
    qr = model.add_question_router()
    tokens = torch.randn(5, 64, model.config.vision.hidden_size)
    questions = question_vectors(model, QUESTIONS[:1] * 5)
    assert torch.allclose(qr.p_compress(tokens, questions), model.router.p_compress(tokens))
    assert model.config.flash.question_router


def test_different_questions_about_the_same_image_give_different_decisions(conditioned):
    batch = image_tiles(conditioned)
    decisions = []
    for q in QUESTIONS:
        policy = RoutingPolicy("question", absolute_threshold=0.5)
        feats, d = encode_routed(
            conditioned, batch.pixel_values, batch.tiles_per_image, policy, questions=[q]
        )
        assert feats.shape[0] == d.visual_tokens == sum(d.image_tokens)
        decisions.append(tuple(d.compress.tolist()))
    assert len(set(decisions)) > 1
    # the question's text and its embedding (what a language server sends) decide alike
    vec = question_vectors(conditioned, [QUESTIONS[1]])
    _, by_text = encode_routed(
        conditioned, batch.pixel_values, batch.tiles_per_image, "question", questions=[QUESTIONS[1]]
    )
    _, by_vector = encode_routed(
        conditioned, batch.pixel_values, batch.tiles_per_image, "question", questions=vec
    )
    assert torch.equal(by_text.compress, by_vector.compress)


def test_question_routing_errors_name_what_is_missing(tiny, conditioned):
    batch = image_tiles(tiny)
    with pytest.raises(RoutingError, match="no question-aware router"):
        encode_routed(tiny, batch.pixel_values, batch.tiles_per_image, "question", questions=["q"])
    with pytest.raises(RoutingError, match="needs the question"):
        encode_routed(conditioned, batch.pixel_values, batch.tiles_per_image, "question")
    with pytest.raises(RoutingError, match="one row per image"):
        encode_routed(
            conditioned,
            batch.pixel_values,
            batch.tiles_per_image,
            "question",
            questions=torch.zeros(2, conditioned.config.language.hidden_size),
        )
    with pytest.raises(RoutingError, match="only router or random"):
        RoutingPolicy("full", match="question")


def test_matched_budgets_compress_as_many_tiles_per_image_as_the_question_router():
    tiles = [4, 3]
    p = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.95, 0.5])  # released router
    pq = torch.tensor([0.2, 0.9, 0.7, 0.8, 0.6, 0.1, 0.9])  # question router
    args = dict(full_tokens=16, compressed_tokens=4, p_compress=p, relative=0.0, absolute=0.5)
    q = decide(RoutingPolicy("question"), tiles, p_question=pq, **args)
    assert q.compress.tolist() == [False, True, True, True, True, False, True]
    assert torch.equal(q.p_compress, pq)
    counts = per_image_counts(q.compress, tiles)
    router = decide(RoutingPolicy("router", match="question"), tiles, p_question=pq, **args)
    assert per_image_counts(router.compress, tiles) == counts == [3, 2]
    # the released router picks its own highest-p tiles at that budget
    assert router.compress.tolist() == [True, False, True, True, False, True, True]
    random = decide(RoutingPolicy("random", match="question", seed=3), tiles, p_question=pq, **args)
    assert per_image_counts(random.compress, tiles) == counts
    assert random.visual_tokens == router.visual_tokens == q.visual_tokens
    with pytest.raises(RoutingError, match="question-aware router scores"):
        decide(RoutingPolicy("router", match="question"), tiles, **args)


def with_questions(sample: Encoded, *questions: str) -> Encoded:
    return dataclasses.replace(sample, questions=questions)


def test_per_question_ratios_and_differences_are_exact_in_both_contexts(tiny):
    model = tiny.eval()
    s = with_questions(make_sample(model, 5, [3]), "what is the label?")
    ratios = question_tile_ratios(model, [s], context="both", eps=0.0)
    assert ratios.r.shape == ratios.tile.shape == ratios.question.shape == (3,)
    assert ratios.questions == ["what is the label?"]

    def loss_with(compress):
        return routed_answer_loss(model, s, compress)

    full, small = loss_with([False] * 3), loss_with([True] * 3)
    nats = question_tile_ratios(model, [s], context="both", measure="difference")
    for i in range(3):
        one_small, alone = (
            loss_with([j == i for j in range(3)]),
            loss_with([j != i for j in range(3)]),
        )
        r_full, r_comp = one_small / full, small / alone
        assert ratios.r_full[i].item() == pytest.approx(r_full, rel=1e-3)
        assert ratios.r_compressed[i].item() == pytest.approx(r_comp, rel=1e-3)
        assert ratios.r[i].item() == pytest.approx(max(r_full, r_comp), rel=1e-3)
        # measure="difference": the nats the answer loses, in each context
        d_full, d_comp = one_small - full, small - alone
        assert nats.r_full[i].item() == pytest.approx(d_full, abs=1e-4)
        assert nats.r_compressed[i].item() == pytest.approx(d_comp, abs=1e-4)
        assert nats.r[i].item() == pytest.approx(max(d_full, d_comp), abs=1e-4)
    with pytest.raises(ValueError, match="measure must be one of ratio, difference"):
        question_tile_ratios(model, [s], measure="log")
    with pytest.raises(ValueError, match="context must be one of full, compressed, mixed, routed"):
        QuestionRouterStage(lambda i: s, context="half")  # refused when built, before labelling
    with pytest.raises(ValueError, match="1 answers but 0 questions"):
        question_tile_ratios(model, [make_sample(model, 6, [2])])


def test_mixed_context_scores_each_tile_against_the_samples_random_mask(tiny):
    model = tiny.eval()
    s = with_questions(make_sample(model, 7, [5]), "how many circles are there?")
    k = s.pixel_values.shape[0]
    mask = mixed_mask(k, s.index)
    assert mask == mixed_mask(k, s.index)  # the same sample is labelled the same every time
    assert any(mask) and not all(mask)  # half-compressed, not one of the uniform contexts

    def loss_with(compress):
        return routed_answer_loss(model, s, compress)

    mixed = question_tile_ratios(model, [s], context="mixed", eps=0.0)
    every = question_tile_ratios(model, [s], context="full+compressed+mixed", eps=0.0)
    assert torch.isnan(mixed.r_full).all() and torch.isnan(mixed.r_compressed).all()
    for i in range(k):
        at_small = loss_with([c or j == i for j, c in enumerate(mask)])
        at_large = loss_with([c and j != i for j, c in enumerate(mask)])
        assert mixed.r_mixed[i].item() == pytest.approx(at_small / at_large, rel=1e-3)
        assert mixed.r[i].item() == pytest.approx(at_small / at_large, rel=1e-3)
        three = [every.r_full[i], every.r_compressed[i], every.r_mixed[i]]
        assert every.r[i].item() == pytest.approx(max(x.item() for x in three), rel=1e-6)
    assert every.r_mixed.tolist() == pytest.approx(mixed.r_mixed.tolist(), rel=1e-5)
    for bad in ("full+full", "full+half", ""):
        with pytest.raises(ValueError, match="several joined with"):
            question_tile_ratios(model, [s], context=bad)


def test_routed_context_scores_the_routed_questions_answer_under_the_routers_own_mask(make_tiny):
    model = make_tiny().eval()
    with pytest.raises(ValueError, match="needs the question router"):
        question_tile_ratios(model, [with_questions(make_sample(model, 3, [4]), "q?")], "routed")
    model.add_question_router()
    model.config.flash.question_relative_threshold = 0.0
    model.config.flash.question_absolute_threshold = 0.0  # compress all but the lowest-p tile
    s = with_questions(make_sample(model, 3, [4]), "what is the label?")
    k = s.pixel_values.shape[0]
    routed = question_tile_ratios(model, [s], context="routed", eps=0.0)
    with torch.no_grad():
        tokens = model.vision_patch_tokens(s.pixel_values)
    p = model.question_router.p_compress(
        tokens, question_vectors(model, [s.questions[0]]).expand(k, -1)
    )
    mask = (p > p.min()).tolist()  # the released rule at relative 0: all but the lowest-p tile

    def loss_with(compress):
        return routed_answer_loss(model, s, compress)

    assert any(mask) and not all(mask)
    for i in range(k):
        at_small = loss_with([c or j == i for j, c in enumerate(mask)])
        at_large = loss_with([c and j != i for j, c in enumerate(mask)])
        assert routed.r_routed[i].item() == pytest.approx(at_small / at_large, rel=1e-3)
        assert routed.r[i].item() == pytest.approx(at_small / at_large, rel=1e-3)

    # two answers: only the routed one (index 3 % 2 = 1) is scored, the other's rows are left out
    two = copy.deepcopy(s)
    answer = [t for t, m in enumerate(two.loss_mask) if m]
    two.loss_mask[answer[len(answer) // 2]] = 0
    two = with_questions(two, "what colour?", "what is the label?")
    alone = question_tile_ratios(model, [two], context="routed", eps=0.0)
    assert alone.question.tolist() == [1] * k and alone.tile.tolist() == list(range(k))
    both = question_tile_ratios(model, [two], context="full+routed", eps=0.0)
    assert both.question.tolist() == [0] * k + [1] * k  # the full context scores both answers
    assert torch.isnan(both.r_routed[:k]).all() and not torch.isnan(both.r_routed[k:]).any()


@pytest.mark.parametrize("measure", ["ratio", "difference"])
def test_a_few_updates_lower_the_question_routers_loss_on_a_toy_set(make_tiny, measure):
    model = make_tiny().eval()
    model.add_question_router()
    samples = [
        with_questions(make_sample(model, i, [2, 1] if i % 2 else [3]), QUESTIONS[i % 4])
        for i in range(8)
    ]
    stage = QuestionRouterStage(
        lambda i: samples[i % 8], rows_per_step=64, percentile=50.0, measure=measure
    )
    stage.setup(model)
    trained = [n for n, _ in model.named_parameters() if stage.param_filter(n)]
    assert trained and all(n.startswith("question_router.") for n in trained)
    ratios = question_tile_ratios(model, samples, measure=measure)
    labels = router_labels(ratios.r, float(ratios.r.median()))

    def bce() -> float:
        model.question_router.eval()
        with torch.no_grad():
            return float(router_bce(question_router_scores(model, ratios), labels)[0])

    before = bce()
    params = [p for n, p in model.named_parameters() if stage.param_filter(n)]
    opt = torch.optim.Adam(params, lr=3e-3)
    stage.loss(model, SampleBatch(samples), 64)  # labels the batch into the replay buffer
    for _ in range(40):  # replay steps: no new labels
        loss, metrics = stage.loss(model, Replay(64), 64)
        assert metrics["labelled"] == 0.0
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bce() < 0.8 * before


def test_the_world_oracles_match_the_bound_and_keep_the_evidence():
    samples = [it.sample() for it in eval_items(3)]
    full, small = 16, 4
    saved = tokens = 0
    for s in samples:
        flags = bound_oracle(s)
        cols, rows = s.meta["grid"]
        assert len(flags) == cols * rows + (cols * rows > 1)
        saved += (full - small) * sum(flags)
        tokens += full * len(flags)
        kept = [i for i, c in enumerate(evidence_oracle(s)) if not c]
        assert set(s.meta["evidence_tiles"]) <= set(kept)
    bound = text_free_token_savings(samples, full, small)
    assert saved / tokens == pytest.approx(bound["text_free_and_thumbnails"])


def test_tuning_items_come_from_the_training_split_and_eval_items_never_do():
    assert {it.split for it in tuning_items(2)} == {"train"}
    with pytest.raises(ValueError, match="tuning_items"):
        eval_items(2, split="train")
