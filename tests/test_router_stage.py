"""ViCO stage 2 (router training): exact per-tile loss ratios, percentile labels, BCE, and a learning router."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_vico import ListStream, make_sample  # noqa: E402  (shared synthetic samples)

from tessera.auc import auc
from tessera.train.router_stage import (
    RatioWindow,
    RouterStage,
    SampleBatch,
    evaluate_router,
    router_bce,
    router_labels,
    tile_loss_ratios,
)
from tessera.train.vico import shrink_image_tokens


def answer_loss(model, ids: list[int], mask: list[int], features: torch.Tensor) -> float:
    """Mean answer CE of one sequence, computed the plain way (reference for the batched variants)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), image_features=features)[0]  # [T,V]
    targets = torch.tensor(ids[1:])
    keep = torch.tensor(mask[1:], dtype=torch.bool)
    return float(F.cross_entropy(logits[:-1][keep], targets[keep]))


def routed_inputs(model, sample, compress: list[bool]):
    """(Encoded, image features) of `sample` (Encoded at 1/4) with the tiles flagged in `compress` at 1/16."""
    cfg = model.config
    enc = shrink_image_tokens(
        sample,
        compress,
        cfg.tokens_per_tile,
        cfg.compressed_tokens_per_tile,
        cfg.image_context_token_id,
    )
    with torch.no_grad():
        feats, _ = model.encode_images(sample.pixel_values, compress=torch.tensor(compress))
    return enc, feats


def routed_answer_loss(model, sample, compress: list[bool]) -> float:
    """Mean answer CE of `sample` (Encoded at 1/4) with the tiles flagged in `compress` at 1/16."""
    enc, feats = routed_inputs(model, sample, compress)
    return answer_loss(model, enc.input_ids, enc.loss_mask, feats)


def test_ratios_are_exact_one_tile_at_a_time(tiny):
    model = tiny.eval()
    cfg = model.config
    samples = [make_sample(model, 3, [3]), make_sample(model, 4, [1])]
    ratios = tile_loss_ratios(model, samples, eps=0.0)
    assert ratios.tiles_per_sample == [3, 1] and ratios.r.shape == (4,)
    assert ratios.patch_tokens.shape == (
        4,
        (cfg.tile_size // cfg.vision.patch_size) ** 2,
        cfg.vision.hidden_size,
    )
    s = samples[0]
    with torch.no_grad():
        feats, _ = model.encode_images(s.pixel_values)
    base = answer_loss(model, s.input_ids, s.loss_mask, feats)
    assert ratios.loss_full[0].item() == pytest.approx(base, rel=1e-4)
    for i in range(3):
        want = routed_answer_loss(model, s, [j == i for j in range(3)])
        assert ratios.loss_tile[i].item() == pytest.approx(want, rel=1e-4)
        assert ratios.r[i].item() == pytest.approx(want / base, rel=1e-4)


def test_each_answer_of_a_multi_question_sample_weighs_the_same(tiny):
    model = tiny.eval()
    cfg = model.config
    s = make_sample(model, 5, [2])
    answer = [t for t, m in enumerate(s.loss_mask) if m]
    cut = answer[len(answer) // 2]
    s.loss_mask[cut] = (
        0  # two answers: the tokens before the cut and after it (as two turns would give)
    )
    first = [int(m and t < cut) for t, m in enumerate(s.loss_mask)]
    second = [int(m and t > cut) for t, m in enumerate(s.loss_mask)]
    ratios = tile_loss_ratios(model, [s], eps=0.0)
    with torch.no_grad():
        feats, _ = model.encode_images(s.pixel_values)
    base = [answer_loss(model, s.input_ids, m, feats) for m in (first, second)]
    enc = shrink_image_tokens(
        s,
        [True, False],
        cfg.tokens_per_tile,
        cfg.compressed_tokens_per_tile,
        cfg.image_context_token_id,
    )
    dropped = len(s.input_ids) - len(
        enc.input_ids
    )  # image-context tokens the compressed tile no longer needs
    with torch.no_grad():
        feats, _ = model.encode_images(s.pixel_values, compress=torch.tensor([True, False]))
    tile0 = [
        answer_loss(model, enc.input_ids, m[dropped:], feats) for m in (first, second)
    ]  # answers sit after the image
    want = 0.5 * (tile0[0] / base[0] + tile0[1] / base[1])
    assert ratios.r[0].item() == pytest.approx(want, rel=1e-4)


def test_window_percentile_and_labels():
    w = RatioWindow(size=4, percentile=50)
    assert w.update(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(2.5)
    assert w.update(torch.tensor([10.0, 20.0])) == pytest.approx(
        7.0
    )  # window keeps the last 4: 3, 4, 10, 20
    labels = router_labels(torch.tensor([0.9, 1.1, 1.5]), 1.2)
    assert labels.tolist() == [True, True, False]
    with pytest.raises(ValueError):
        RatioWindow(4, 100)


def test_bce_matches_binary_cross_entropy_on_p_compress():
    logits = torch.randn(6, 2)
    compress = torch.tensor([True, False, True, True, False, False])
    loss, metrics = router_bce(logits, compress)
    p0 = torch.softmax(logits, -1)[:, 0]
    want = F.binary_cross_entropy(p0, compress.float())
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert 0 <= metrics["router_acc"] <= 1


def test_auc():
    assert auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([True, True, False, False])) == 1.0
    assert auc(torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([True, True, False, False])) == 0.0
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.5


def test_router_training_steps_lower_its_loss_and_touch_nothing_else(tiny):
    model = copy.deepcopy(tiny)
    stage = RouterStage(ListStream(model, 8), samples_per_batch=4, workers=0)
    stage.setup(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("pooling_before_gating.", "gating.")))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch, _ = next(stage.batches(0, 0, 1))
    assert isinstance(batch, SampleBatch) and len(batch.samples) == 4
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):  # through the stage: labels from the frozen model, BCE on the router
        loss, metrics = stage.loss(model, batch, stage.weight(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert 0.3 < metrics["label_compress"] < 0.7  # τ at the median labels about half the tiles
    assert losses[-1] < losses[0]
    # the same labels, many more router steps (the labels are fixed for this batch): the router fits them
    ratios = tile_loss_ratios(model, batch.samples, stage.eps)
    labels = router_labels(ratios.r, float(torch.quantile(ratios.r, 0.5)))
    model.router.train()
    for _ in range(40):
        loss, _ = router_bce(model.router(ratios.patch_tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    result = evaluate_router(model, batch.samples)
    assert result["tiles"] == batch.tiles and result["accuracy"] > 0.7
    assert {"auc", "balanced_accuracy", "tau", "label_compress", "predicted_compress"} <= set(
        result
    )


def test_stage_runs_in_the_trainer_with_only_the_router_trainable(tiny, tmp_path):
    from tessera.train.trainer import TrainConfig, Trainer

    model = copy.deepcopy(tiny)
    stage = RouterStage(ListStream(model, 8), samples_per_batch=2, workers=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(steps=2, warmup_steps=1, lr=1e-3, log_every=1, progress=False, threads=1)
    result = Trainer(
        model, stage, cfg, tmp_path, save_model=lambda m, p: torch.save(m.state_dict(), p / "w.pt")
    ).fit()
    assert result.step == 2 and "tau" in result.history[-1]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("pooling_before_gating.", "gating.")) for n in changed)


def test_router_labels_can_come_from_descriptions(make_world_model):
    """`families` picks the questions whose loss ratios label the tiles; the held-out tiles follow them."""
    from tessera.train.router_stage import build_stage, heldout_samples

    model = make_world_model()
    model.add_flash_branch()
    stage = build_stage(model, {"families": {"describe": 1.0}, "workers": 0})
    assert {stage.make.sample(i)[0].family for i in range(4)} == {"describe"}
    assert stage.heldout_families == ["describe"]
    assert {s.family for s in heldout_samples(model, 3, families=stage.heldout_families)} == {
        "describe"
    }
    default = build_stage(model, {"workers": 0})
    assert default.heldout_families is None and "describe" not in default.make.families


def test_held_out_tiles_are_labelled_by_as_many_questions_as_the_training_tiles(make_world_model):
    from tessera.train.data import WorldStream
    from tessera.train.router_stage import build_stage, heldout_samples

    model = make_world_model()
    model.add_flash_branch()
    stage = build_stage(model, {"turns": 4, "workers": 0, "heldout": 2})
    stage.eval_fn(
        model, 0
    )  # builds its held-out set from the stage's own stream, on the eval split
    for held in (stage._heldout, heldout_samples(model, 2, turns=4)):
        answers = [
            sum(1 for a, b in zip([0] + s.loss_mask, s.loss_mask) if b and not a) for s in held
        ]
        assert answers == [4, 4]  # four answers (one per question) in each held-out conversation
    assert (
        WorldStream(model.tokenizer, model.config, split="eval").sample(0)[0].meta["split"]
        == "eval"
    )
