"""Packing, label shifting, square-averaged weights, and packed loss == padded loss on the real model."""

from __future__ import annotations

import pytest
import torch

from tessera.config import preset
from tessera.train.data import Encoded, Packer, collate, square_average_weights
from tessera.train.losses import IGNORE, kl_consistency, weighted_cross_entropy

IMG = 3  # <IMG_CONTEXT> id of the tiny preset


def fake_sample(
    index: int, prompt: int, answer: int, tiles: int = 1, tokens_per_tile: int = 16, seed: int = 0
) -> Encoded:
    """A sample with `tiles` random tiles, their image tokens, random prompt text and `answer` loss tokens."""
    g = torch.Generator().manual_seed(seed * 1000 + index)
    text = torch.randint(
        20, 500, (prompt + answer,), generator=g
    ).tolist()  # inside the tiny vocabulary (512)
    ids = [1] + [IMG] * (tiles * tokens_per_tile) + text
    mask = [0] * (len(ids) - answer) + [1] * answer
    pixels = torch.randn(tiles, 3, 112, 112, generator=g)
    return Encoded(
        ids, mask, pixels, [tiles * tokens_per_tile], family=f"f{index % 2}", index=index
    )


def test_square_average_weights():
    assert square_average_weights(4) == pytest.approx(0.5)
    assert square_average_weights(1) == 1.0
    with pytest.raises(ValueError):
        square_average_weights(0)


def test_collate_shifts_targets_and_weights_per_sample():
    a, b = fake_sample(0, 3, 4), fake_sample(1, 2, 9)
    batch = collate([[a, b]], pad_id=0, pad_to=len(a) + len(b) + 5)
    La = len(a)
    # position t predicts token t+1 of the same sample; a's loss tokens are its last 4 tokens
    assert batch.targets[0, La - 5 : La - 1].tolist() == a.input_ids[-4:]
    assert (
        batch.targets[0, La - 1] == IGNORE
    )  # a's last token predicts nothing (b is another sample)
    assert batch.weights[0, :La].sum().item() == pytest.approx(4 * 4**-0.5)
    assert batch.weights[0, La:].sum().item() == pytest.approx(9 * 9**-0.5)
    assert batch.weights[0, -5:].sum() == 0 and (batch.targets[0, -5:] == IGNORE).all()
    # positions restart per sample; segments 1, 2, then padding 0
    assert batch.position_ids[0, La].item() == 0 and batch.position_ids[0, La - 1].item() == La - 1
    assert batch.segment_ids[0].unique().tolist() == [0, 1, 2]
    mask = batch.attn_mask()  # [1,1,L,L]
    assert mask.shape == (1, 1, batch.input_ids.shape[1], batch.input_ids.shape[1])
    assert not mask[0, 0, La, :La].any()  # b's first token sees nothing of a
    assert mask[0, 0, La, La] and mask[0, 0, La - 1, :La].all()


def test_packer_fills_rows_and_reports_the_resume_position():
    samples = [fake_sample(i, 5, 3) for i in range(10)]  # 25 tokens each
    packer = Packer(rows=2, row_tokens=60, pad_id=0)  # 2 samples per row, 4 per batch
    out = list(packer(enumerate(samples)))
    assert [b.num_samples for b, _ in out] == [
        4,
        4,
    ]  # the last 2 never close a batch (stream ended)
    assert [pos for _, pos in out] == [4, 8]
    assert out[1][0].indices == [4, 5, 6, 7]
    assert out[0][0].input_ids.shape == (2, 50)
    with pytest.raises(ValueError, match="row_tokens"):
        list(Packer(rows=1, row_tokens=10, pad_id=0)(enumerate(samples)))


def test_weighted_ce_matches_manual_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)  # [B,T,V]
    targets = torch.tensor([[1, 2, IGNORE, 3, IGNORE], [IGNORE, 4, 5, 6, 0]])
    weights = (targets != IGNORE).float() * torch.tensor([[0.5], [0.25]])
    loss, m = weighted_cross_entropy(logits, targets, weights)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 7), targets.reshape(-1), reduction="none", ignore_index=IGNORE
    )
    expected = (ce * weights.reshape(-1)).sum() / weights.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert m["loss_tokens"] == 7
    half, _ = weighted_cross_entropy(logits, targets, weights, normalizer=2 * weights.sum())
    assert half.item() == pytest.approx(expected.item() / 2, rel=1e-6)


def test_kl_consistency_is_zero_for_equal_logits_and_positive_otherwise():
    torch.manual_seed(0)
    ref = torch.randn(1, 4, 9)
    w = torch.tensor([[0.0, 1.0, 1.0, 0.5]])
    zero, _ = kl_consistency(ref, ref.clone(), w)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(1, 4, 9, requires_grad=True)
    kl, m = kl_consistency(ref, other, w)
    p = ref.softmax(-1)
    manual = (p * (p.log() - other.log_softmax(-1))).sum(-1)  # [1,4]
    assert kl.item() == pytest.approx(((manual * w).sum() / w.sum()).item(), rel=1e-5)
    kl.backward()
    assert other.grad[0, 0].abs().sum() == 0  # no loss where the weight is 0


def test_packed_loss_equals_padded_loss():
    from tessera.model.vlm import VisionLanguageModel

    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.flash.enabled = False
    model = VisionLanguageModel(cfg).eval()
    samples = [
        fake_sample(0, 7, 5, tiles=1),
        fake_sample(1, 3, 11, tiles=3),
        fake_sample(2, 12, 2, tiles=1),
    ]
    padded = collate([[s] for s in samples], pad_id=0)  # one sample per row
    packed = collate([samples[:2], samples[2:]], pad_id=0)  # two rows, the first holds two samples
    assert packed.input_ids.shape[0] == 2 and padded.input_ids.shape[0] == 3
    with torch.no_grad():
        results = []
        for batch in (padded, packed):
            logits = model(
                batch.input_ids,
                pixel_values=batch.pixel_values,
                position_ids=batch.position_ids,
                attn_mask=batch.attn_mask(),
            )
            results.append(weighted_cross_entropy(logits, batch.targets, batch.weights)[0].item())
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_curriculum_interpolates_and_validates():
    from tessera.train.data import Curriculum

    c = Curriculum(((0, 0.0), (100, 0.5), (101, 1.0)))
    assert c(0) == 0.0 and c(50) == 0.25 and c(100) == 0.5 and c(101) == 1.0 and c(10**6) == 1.0
    assert Curriculum()(123) == 1.0  # default: the evaluation distribution
    with pytest.raises(ValueError):
        Curriculum(((10, 0.0), (5, 1.0)))
    with pytest.raises(ValueError):
        Curriculum(((0, 1.5),))


def test_world_stream_is_deterministic_and_masks_the_answer():
    from tessera.chat import build_tokenizer
    from tessera.train.data import Curriculum, WorldStream
    from tessera.world import corpus

    cfg = preset("tiny")
    tok = build_tokenizer(corpus(20), vocab_size=cfg.language.vocab_size)
    stream = WorldStream(
        tok,
        cfg,
        families={"reasoning": 1.0, "colour": 1.0},
        thinking_prob=1.0,
        curriculum=Curriculum(((0, 0.0),)),
    )
    a, b = stream(3), stream(3)
    assert a.input_ids == b.input_ids and torch.equal(a.pixel_values, b.pixel_values)
    samples = [stream(i) for i in range(8)]
    assert {e.family for e in samples} == {"reasoning", "colour"}
    for e in samples:
        sample, thinking = stream.sample(e.index)
        assert thinking == (
            e.family == "reasoning"
        )  # reasoning has a worked chain, asked with thinking on
        answer = tok.decode(
            [t for t, m in zip(e.input_ids, e.loss_mask) if m], skip_special_tokens=False
        )
        assert answer == (sample.thinking_answer if thinking else sample.answer) + "<|im_end|>"
        assert (
            sum(e.image_tokens)
            == e.input_ids.count(tok.img_context_id)
            == e.pixel_values.shape[0] * 16
        )
        assert sample.meta["difficulty"] == 0.0


def test_multi_turn_samples_extend_the_single_turn_sample():
    from tessera.chat import build_tokenizer
    from tessera.train.data import Curriculum, WorldStream
    from tessera.world import FAMILIES, corpus

    cfg = preset("tiny")
    tok = build_tokenizer(corpus(20), vocab_size=cfg.language.vocab_size)
    families = dict.fromkeys(FAMILIES, 1.0)
    one = WorldStream(
        tok, cfg, families=families, thinking_prob=0.5, curriculum=Curriculum(((0, 0.5),))
    )
    three = WorldStream(
        tok, cfg, families=families, thinking_prob=0.5, curriculum=Curriculum(((0, 0.5),)), turns=3
    )
    for i in range(4):
        a, b = one(i), three(i)
        assert (
            b.input_ids[: len(a)] == a.input_ids and b.loss_mask[: len(a)] == a.loss_mask
        )  # same first turn
        assert torch.equal(a.pixel_values, b.pixel_values) and a.image_tokens == b.image_tokens
        _, turns, family, _, _ = three.conversation(i)
        assert family == a.family and len(turns) == 3 and len({q for q, _, _ in turns}) == 3
        answers = tok.decode(
            [t for t, m in zip(b.input_ids, b.loss_mask) if m], skip_special_tokens=False
        )
        assert answers == "".join(ans + "<|im_end|>" for _, ans, _ in turns)
        assert (
            b.input_ids.count(tok.im_start_id) == 1 + 2 * 3
        )  # system + (user, assistant) per turn


def test_repeated_families_ask_several_different_questions_about_one_image():
    from tessera.chat import build_tokenizer
    from tessera.train.data import Curriculum, WorldStream
    from tessera.world import corpus

    cfg = preset("tiny")
    tok = build_tokenizer(corpus(20), vocab_size=cfg.language.vocab_size)
    once = WorldStream(
        tok, cfg, families={"spatial": 1.0}, curriculum=Curriculum(((0, 1.0),)), turns=3
    )
    often = WorldStream(
        tok,
        cfg,
        families={"spatial": 1.0},
        curriculum=Curriculum(((0, 1.0),)),
        turns=3,
        repeat=("spatial",),
    )
    counts = []
    for i in range(6):
        assert (
            len(once.conversation(i)[1]) == 1
        )  # a family is asked once per image unless it repeats
        _, turns, family, _, _ = often.conversation(i)
        questions = [q for q, _, _ in turns]
        assert family == "spatial" and len(set(questions)) == len(questions)
        assert all(" left or right of " in q or " above or below " in q for q in questions)
        counts.append(len(turns))
    assert max(counts) == 3
