"""The trainer loop: schedule, parameter groups, learning, checkpoints and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from test_train_data import fake_sample

from tessera.config import preset
from tessera.train.stage import LanguageModelingStage, component_of
from tessera.train.trainer import TrainConfig, Trainer, build_optimizer, lr_factor


def small_model(seed: int = 0):
    from tessera.model.vlm import VisionLanguageModel

    cfg = preset("tiny")
    cfg.vision.num_layers, cfg.language.num_layers = 2, 2
    torch.manual_seed(seed)
    return VisionLanguageModel(cfg)


def make_fake(i: int):
    """Stream sample i: short prompts, a few answer tokens, one or two tiles (deterministic in i)."""
    return fake_sample(i, prompt=3 + i % 5, answer=2 + i % 3, tiles=1 + i % 2, seed=7)


def save_weights(model, path: Path) -> None:
    save_model(model, str(path / "model.safetensors"))


def stage(workers: int = 0) -> LanguageModelingStage:
    return LanguageModelingStage("sft", make_fake, rows=2, row_tokens=80, pad_id=0, workers=workers)


def config(**kw) -> TrainConfig:
    base = dict(
        steps=6,
        lr=1e-3,
        warmup_steps=2,
        log_every=1,
        progress=False,
        threads=1,
        seed=3,
        precision="fp32",
    )
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_optimizer_groups_follow_components_and_freezing():
    model = small_model()
    cfg = config(component_lr={"vision": 1e-5}, trainable={"language": False})
    opt = build_optimizer(model, cfg)
    names = {g["name"]: g for g in opt.param_groups}
    assert names["vision"]["lr"] == 1e-5 and names["connector"]["lr"] == 1e-3
    assert (
        names["vision.no_decay"]["weight_decay"] == 0.0
        and names["vision"]["weight_decay"] == cfg.weight_decay
    )
    assert not any(n.startswith("language") for n in names)
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert (
        component_of("mlp2.0.weight") == "connector"
        and component_of("gating.gate.1.weight") == "router"
    )
    with pytest.raises(ValueError, match="no known component"):
        component_of("head.weight")
    with pytest.raises(ValueError, match="unknown component"):
        TrainConfig(component_lr={"decoder": 1.0}).validate()


def test_training_lowers_the_loss_and_writes_metrics_and_final(tmp_path):
    model = small_model()
    result = Trainer(
        model, stage(), config(steps=12, lr=3e-3), tmp_path, save_model=save_weights
    ).fit()
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "ce", "token_acc", "samples", "position"} <= set(lines[0])
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000012"


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = Trainer(small_model(), stage(), config(), tmp_path / "a", save_model=save_weights).fit()
    # "killed" after 3 steps (the schedule still runs to 6), then resumed by a fresh process-like trainer
    Trainer(small_model(), stage(), config(), tmp_path / "b", save_model=save_weights).fit(
        stop_after=3
    )
    resumed_model = small_model(seed=123)
    resumed = Trainer(
        resumed_model, stage(), config(), tmp_path / "b", save_model=save_weights
    ).fit()
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history[3:]]
    assert [r["position"] for r in resumed.history] == [r["position"] for r in full.history[3:]]
    curve = [
        json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert curve == [r["loss"] for r in full.history]


def test_accumulation_equals_one_big_batch(tmp_path):
    """Two micro-batches of 2 rows == one batch of 4 rows: the loss is normalised by the whole step's weight."""
    one = Trainer(
        small_model(),
        LanguageModelingStage("sft", make_fake, 4, 80, 0, workers=0),
        config(steps=2, grad_clip=0),
        tmp_path / "one",
        save_model=save_weights,
    ).fit()
    acc = Trainer(
        small_model(),
        LanguageModelingStage("sft", make_fake, 2, 80, 0, workers=0),
        config(steps=1, accum_steps=2, grad_clip=0),
        tmp_path / "acc",
        save_model=save_weights,
    ).fit()
    # same samples in the first step only if the packings agree; check that first
    assert one.history[0]["position"] == acc.history[0]["position"]
    assert one.history[0]["loss"] == pytest.approx(acc.history[0]["loss"], rel=1e-5)
    assert one.history[0]["grad_norm"] == pytest.approx(acc.history[0]["grad_norm"], rel=1e-4)


def test_bf16_autocast_trains_and_resumes_exactly(tmp_path):
    full = Trainer(
        small_model(),
        stage(),
        config(steps=4, precision="bf16"),
        tmp_path / "a",
        save_model=save_weights,
    ).fit()
    Trainer(
        small_model(),
        stage(),
        config(steps=4, precision="bf16"),
        tmp_path / "b",
        save_model=save_weights,
    ).fit(stop_after=2)
    resumed = Trainer(
        small_model(),
        stage(),
        config(steps=4, precision="bf16"),
        tmp_path / "b",
        save_model=save_weights,
    ).fit()
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history[2:]]


def test_a_bf16_checkpoint_trains_in_fp32_master_weights(tmp_path):
    """Shipped checkpoints are bf16; a small-lr step on bf16 weights would round to nothing (2^-8 resolution)."""
    model = small_model().to(torch.bfloat16)
    before = {k: v.float().clone() for k, v in model.language_model.state_dict().items()}
    Trainer(
        model, stage(), config(steps=2, lr=1e-5, warmup_steps=0), tmp_path, save_model=save_weights
    ).fit()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    norms = [k for k in before if k.endswith("norm.weight")]  # ones: bf16 cannot hold 1 ± 1e-5
    assert norms and all(
        not torch.equal(model.language_model.state_dict()[k], before[k]) for k in norms
    )


def test_data_worker_gives_the_same_batches(tmp_path):
    a = Trainer(
        small_model(), stage(workers=0), config(steps=2), tmp_path / "a", save_model=save_weights
    ).fit()
    b = Trainer(
        small_model(), stage(workers=1), config(steps=2), tmp_path / "b", save_model=save_weights
    ).fit()
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
