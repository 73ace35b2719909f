"""The training cascade end to end: init → pretrain → sft → held-out evaluation → report.

Every stage writes into its own folder of `out/` (checkpoints, metrics.jsonl, final/), so rerunning the
recipe with the same `out` resumes where it stopped: a finished stage is reloaded from its checkpoint, an
interrupted one continues from its latest checkpoint. Later stages of the cascade (ViCO, router, MPO, GSPO)
plug in by adding a `StagePlan` to `RecipeConfig.stages` and their module to `tessera.train.STAGES`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tessera.train.trainer import TrainConfig, Trainer


@dataclass
class StagePlan:
    name: str  # a key of tessera.train.STAGES
    train: TrainConfig
    data: dict[str, Any] = field(default_factory=dict)  # the stage module's data options


@dataclass
class RecipeConfig:
    preset: str = "tiny"
    seed: int = 0
    tokenizer_corpus: int = 200  # scenes whose text trains the tokenizer (the world's words are few)
    stages: list[StagePlan] = field(default_factory=list)
    eval_n: int = 350  # held-out questions for the final report (50 per family)
    eval_seed: int = 0
    probe_n: int = 70  # held-out questions for the accuracy curve during training
    eval_families: list[str] | None = None  # None = every family of the world
    chance_n: int = 400

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tiny_recipe() -> RecipeConfig:
    """The tiny preset's full schedule (docs/TRAINING.md records the probes behind these numbers).

    pretrain: dense descriptions on easy scenes teach the ViT colours, shapes, positions and glyphs (a question's
    single answer token is too sparse a signal to get vision started). sft: every question family plus
    descriptions, four questions per image (one ViT pass serves four answers), the world's difficulty stepping
    up (fixed slots → free placement → full scenes) by sample index.
    The language model and connector start from scratch and take 3e-4; the ViT stays at 1e-4 (the calibration's
    learning-rate cliff for reading).
    """
    lrs = {"language": 3e-4, "connector": 3e-4, "vision": 1e-4, "router": 1e-4}
    pretrain = TrainConfig(steps=250, lr=1e-4, component_lr=lrs, warmup_steps=20, min_lr_ratio=0.3,
                           precision="bf16", save_every=50)
    sft = TrainConfig(steps=1300, lr=1e-4, component_lr=lrs, warmup_steps=30, min_lr_ratio=0.1,
                      precision="bf16", save_every=100, eval_every=200)
    families = {"colour": 1.0, "shape": 1.0, "count": 1.0, "label": 1.0, "document": 1.0, "spatial": 1.0,
                "reasoning": 1.0, "describe": 1.0}
    return RecipeConfig(stages=[
        StagePlan("pretrain", pretrain, {"rows": 4, "row_tokens": 512,
                                         "curriculum": [[0, 0.0], [2000, 0.0], [2001, 0.5]]}),
        StagePlan("sft", sft, {"rows": 4, "row_tokens": 512, "families": families, "thinking_prob": 0.7, "turns": 4,
                               "curriculum": [[0, 0.0], [3000, 0.0], [3001, 0.5], [7000, 0.5], [7001, 1.0]]}),
    ])


def quick_recipe() -> RecipeConfig:
    """Every stage at toy scale (seconds each): exercises the whole path, learns almost nothing."""
    small = dict(rows=2, row_tokens=384, workers=0)
    return RecipeConfig(tokenizer_corpus=60, eval_n=14, probe_n=7, chance_n=50, stages=[
        StagePlan("pretrain", TrainConfig(steps=3, lr=1e-4, warmup_steps=1, log_every=1, save_every=2), dict(small)),
        StagePlan("sft", TrainConfig(steps=3, lr=1e-4, warmup_steps=1, log_every=1, eval_every=3), dict(small)),
    ])


@dataclass
class RecipeResult:
    out: Path
    final_checkpoint: Path
    summary: dict[str, Any]


def init_model_for(config: RecipeConfig):
    """A fresh model of the preset with a tokenizer trained on the world's text."""
    from tessera.chat import build_tokenizer
    from tessera.config import preset
    from tessera.model.init import init_model
    from tessera.world import corpus

    model_config = preset(config.preset)
    tokenizer = build_tokenizer(corpus(config.tokenizer_corpus), vocab_size=model_config.language.vocab_size)
    return init_model(model_config, tokenizer, seed=config.seed)


def run_recipe(preset: str | RecipeConfig = "tiny", out: str | Path = "runs/tiny", quick: bool = False,
               progress: bool = True) -> RecipeResult:
    """Run the cascade; returns the final checkpoint folder and the report's summary."""
    from tessera.evaluate import evaluate
    from tessera.model.checkpoint import load_checkpoint, save_checkpoint
    from tessera.train import build_stage
    from tessera.train.report import write_report

    if isinstance(preset, RecipeConfig):
        config = preset
    elif preset == "tiny":
        config = quick_recipe() if quick else tiny_recipe()
    else:
        raise ValueError(f"the recipe has a schedule for the tiny preset only, not {preset!r}; pass a RecipeConfig")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    init_dir = out / "init"
    if (init_dir / "model.safetensors").exists():
        model = load_checkpoint(init_dir)
    else:
        model = init_model_for(config)
        save_checkpoint(model, init_dir)
    stage_dirs: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for plan in config.stages:
        folder = out / plan.name
        stage_dirs[plan.name] = folder
        train = TrainConfig(**{**asdict(plan.train), "progress": progress and plan.train.progress})
        probe = _probe(config) if train.eval_every else None
        start = time.perf_counter()
        Trainer(model, build_stage(plan.name, model, plan.data), train, folder, eval_fn=probe).fit(resume=True)
        seconds[plan.name] = time.perf_counter() - start
    final = stage_dirs[config.stages[-1].name] / "final" if config.stages else init_dir
    torch.manual_seed(config.seed)
    result = evaluate(model, seed=config.eval_seed, n=config.eval_n, families=config.eval_families)
    summary = write_report(out, result, stage_dirs, seconds, {"final_checkpoint": str(final), "quick": quick},
                           chance_n=config.chance_n)
    return RecipeResult(out, final, summary)


def _probe(config: RecipeConfig):
    """The eval_fn the trainer calls during training: a small held-out set, disjoint from the final one."""
    from tessera.evaluate import evaluate

    def probe(model, step: int) -> dict[str, Any]:
        r = evaluate(model, seed=config.eval_seed + 100_000, n=config.probe_n, families=config.eval_families,
                     keep_records=False)
        return {"overall": r.overall, "families": r.families}

    return probe
