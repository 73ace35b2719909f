"""ViCO stage 1: the (reference at 1/4, policy at ξ) pairs, their alignment, and the KL loss on a tiny model."""

from __future__ import annotations

import pytest
import torch

from tessera.train.data import Encoded
from tessera.train.vico import PairPacker, ViCOStage, draw_xi, shrink_image_tokens


def make_sample(model, index: int, tiles: list[int], answer: str = "red 42") -> Encoded:
    """A synthetic Encoded: random tiles, one image per entry of `tiles`, tokens at 1/4."""
    cfg, tok = model.config, model.tokenizer
    gen = torch.Generator().manual_seed(index)
    image_tokens = [t * cfg.tokens_per_tile for t in tiles]
    ex = tok.build_example("what is the label?", answer, image_tokens)
    pv = torch.randn(sum(tiles), 3, cfg.tile_size, cfg.tile_size, generator=gen)
    return Encoded(ex.input_ids, ex.loss_mask, pv, image_tokens, "toy", index)


class ListStream:
    """index → a fixed synthetic sample (stands in for the world's SFT stream)."""

    def __init__(self, model, count: int = 64):
        self.samples = [
            make_sample(model, i, [1 + i % 3] if i % 4 else [2, 1]) for i in range(count)
        ]

    def __call__(self, index: int) -> Encoded:
        return self.samples[index % len(self.samples)]


def test_shrink_image_tokens_cuts_exactly_the_chosen_tiles(tiny):
    cfg = tiny.config
    full, small, ctx = (
        cfg.tokens_per_tile,
        cfg.compressed_tokens_per_tile,
        cfg.image_context_token_id,
    )
    enc = make_sample(tiny, 0, [3, 2])
    out = shrink_image_tokens(enc, [True, False, True, False, False], full, small, ctx)
    assert out.image_tokens == [2 * small + full, 2 * full]
    assert sum(1 for t in out.input_ids if t == ctx) == sum(out.image_tokens)
    assert len(out) == len(enc) - 2 * (full - small)
    answer = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert [t for t, m in zip(out.input_ids, out.loss_mask) if m] == answer
    with pytest.raises(ValueError, match="tiles"):
        shrink_image_tokens(enc, [True] * 4, full, small, ctx)


def test_xi_is_per_image_and_deterministic():
    assert draw_xi(17, 3) == draw_xi(17, 3)
    draws = [x for i in range(2000) for x in draw_xi(i, 1)]
    assert 0.45 < sum(draws) / len(draws) < 0.55
    assert not any(draw_xi(5, 4, compress_prob=0.0)) and all(draw_xi(5, 4, compress_prob=1.0))


def packer_for(model, rows=4, compress_prob=0.5, row_tokens=512, xi_per="image") -> PairPacker:
    cfg = model.config
    return PairPacker(
        rows,
        row_tokens,
        model.tokenizer.pad_id,
        cfg.tokens_per_tile,
        cfg.compressed_tokens_per_tile,
        cfg.image_context_token_id,
        compress_prob,
        xi_per,
    )


def test_pairs_share_rows_answers_and_tiles(tiny):
    stream = ListStream(tiny, 40)
    batch, position = next(packer_for(tiny)((i, stream(i)) for i in range(40)))
    ref, pol = batch.reference, batch.policy
    assert ref.families == pol.families and ref.indices == pol.indices
    assert torch.equal(ref.targets[ref.targets != -100], pol.targets[pol.targets != -100])
    assert batch.compress.numel() == ref.pixel_values.shape[0] == pol.pixel_values.shape[0]
    cfg = tiny.config
    n_small = int(batch.compress.sum())
    assert 0 < n_small < batch.compress.numel()
    ctx = cfg.image_context_token_id
    assert int((pol.input_ids == ctx).sum()) == int((ref.input_ids == ctx).sum()) - n_small * (
        cfg.tokens_per_tile - cfg.compressed_tokens_per_tile
    )
    # every tile of an image shares its ξ: the compressed positions are whole samples here (one image each
    # except the two-image samples, whose images draw separately)
    assert batch.small_positions.any()


def test_xi_per_tile_mixes_resolutions_inside_an_image(tiny):
    cfg = tiny.config
    samples = [make_sample(tiny, i, [3]) for i in range(12)]  # one image of three tiles each
    per_image, per_tile = packer_for(tiny), packer_for(tiny, xi_per="tile")
    assert all(len(set(per_image.pair(s)[2])) == 1 for s in samples)  # the paper: one ξ per image
    masks = [per_tile.pair(s)[2] for s in samples]
    assert any(len(set(m)) == 2 for m in masks) and masks == [per_tile.pair(s)[2] for s in samples]
    for s, mask in zip(samples, masks):
        saved = sum(mask) * (cfg.tokens_per_tile - cfg.compressed_tokens_per_tile)
        assert per_tile.pair(s)[1].image_tokens == [s.image_tokens[0] - saved]
    with pytest.raises(ValueError, match="xi_per must be one of image, tile"):
        packer_for(tiny, xi_per="patch")


def test_kl_is_zero_at_quarter_and_training_reduces_it_at_one_sixteenth(tiny):
    import copy

    model = copy.deepcopy(tiny)
    stream = ListStream(model, 8)
    stage_full = ViCOStage(
        stream, packer_for(model, rows=1, compress_prob=0.0, row_tokens=160), workers=0
    )
    stage_full.setup(model)
    batch, _ = next(stage_full.batches(0, 0, 1))
    loss, metrics = stage_full.loss(model.eval(), batch, stage_full.weight(batch))
    assert abs(float(loss.detach())) < 1e-6 and metrics["compressed_tiles"] == 0.0

    stage = ViCOStage(
        stream, packer_for(model, rows=1, compress_prob=1.0, row_tokens=160), workers=0
    )
    stage.setup(model)
    batch, _ = next(stage.batches(0, 0, 1))
    assert bool(batch.compress.all())
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_(
            n.startswith("mlp2.")
        )  # only the 1/16 branch learns here: a fast, focused check
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-3)
    first = None
    for _ in range(8):
        loss, metrics = stage.loss(model, batch, stage.weight(batch))
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in params)
        opt.step()
    model.eval()
    with torch.no_grad():
        last, metrics = stage.loss(model, batch, stage.weight(batch))
    assert first > 0 and float(last) < 0.7 * first
    assert metrics["kl_at_1_16"] > 0 and metrics["kl_at_1_4"] == 0.0
    # the reference stayed frozen
    for (n, p), (_, q) in zip(tiny.named_parameters(), stage.reference.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_stage_runs_in_the_trainer(tiny, tmp_path):
    import copy

    from tessera.train.trainer import TrainConfig, Trainer

    model = copy.deepcopy(tiny)
    stage = ViCOStage(ListStream(model, 16), packer_for(model, rows=2, row_tokens=160), workers=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(steps=2, warmup_steps=1, lr=1e-3, log_every=1, progress=False, threads=1)
    result = Trainer(
        model, stage, cfg, tmp_path, save_model=lambda m, p: torch.save(m.state_dict(), p / "w.pt")
    ).fit()
    assert result.step == 2 and "kl" in result.history[-1]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("mlp2.") for n in changed)
    assert not any(n.startswith(("pooling_before_gating.", "gating.")) for n in changed)


def test_grounding_probe_reaches_the_compressed_branch_on_world_samples(tiny):
    """ViCOData.grounding: every tile's 1/16 tokens get the dense probe; its loss trains mlp2 and the head."""
    import copy

    from tessera.train.vico import ViCOData, build_stage

    model = copy.deepcopy(tiny)
    stage = build_stage(
        model, ViCOData(rows=1, row_tokens=512, workers=0, grounding=1.0, curriculum=((0, 0.0),))
    )
    stage.setup(model)
    batch, _ = next(stage.batches(0, 0, 1))
    assert batch.reference.grounding is not None
    assert (
        batch.reference.grounding.shape[0] == batch.policy.pixel_values.shape[0]
    )  # one target grid per tile
    model.train()
    loss, metrics = stage.loss(model, batch, stage.weight(batch))
    assert "ground16/loss" in metrics and "kl" in metrics
    loss.backward()
    assert stage.extra.proj.weight.grad is not None and stage.extra.proj.weight.grad.abs().sum() > 0
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if n.startswith("mlp2.")
    )


def test_compressed_branch_only_leaves_the_full_path_bit_identical(tiny, tmp_path):
    """ViCOData.branch="compressed": only mlp2 moves, so every answer at 1/4 is what it was."""
    import copy

    from tessera.train.trainer import TrainConfig, Trainer
    from tessera.train.vico import compressed_branch_only

    model = copy.deepcopy(tiny)
    stage = ViCOStage(
        ListStream(model, 16),
        packer_for(model, rows=2, row_tokens=160, compress_prob=1.0),
        workers=0,
        param_filter=compressed_branch_only,
    )
    sample = make_sample(model, 3, [2])
    ids = torch.tensor([sample.input_ids])

    def full_logits():
        with torch.no_grad():
            return model.eval()(ids, pixel_values=sample.pixel_values)

    before_logits = full_logits()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(steps=2, warmup_steps=1, lr=1e-3, log_every=1, progress=False, threads=1)
    Trainer(
        model, stage, cfg, tmp_path, save_model=lambda m, p: torch.save(m.state_dict(), p / "w.pt")
    ).fit()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("mlp2.") for n in changed)
    assert torch.equal(full_logits(), before_logits)


def test_vico_refuses_an_unknown_branch(tiny):
    from tessera.train.vico import ViCOData, build_stage

    with pytest.raises(ValueError, match="branch"):
        build_stage(tiny, ViCOData(branch="mlp2"))
