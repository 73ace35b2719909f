"""The training cascade end to end: init → pretrain → sft → mpo → gspo → vico → vico_compressed → router →
question_router → vico_tiles (twice) → critic → evaluation → report.

Every stage writes into its own folder of `out/` (checkpoints, metrics.jsonl, final/), so rerunning the
recipe with the same `out` resumes where it stopped: a finished stage is reloaded from its final/ folder
(without being built again), an interrupted one continues from its latest checkpoint. Stages hand data to
later ones through these folders: in a StagePlan's data options, `{out}` and `{stage}` in a string stand for
the recipe's folder and the stage's own folder (mpo writes its rollouts to "{stage}", gspo reads the offline
accuracies from "{out}/mpo/queries.jsonl"). Evaluations are cached in out/evals.json, keyed by the weights
they measured, and the seconds each stage took in out/timings.json, so rerunning a finished recipe trains and
evaluates nothing and rewrites the same report.

The base stages train a model without Flash parts; vico adds mlp2 and the router, vico_compressed goes on
teaching mlp2 alone, the router stage trains the router, the question_router stage adds and trains Tessera's
question-aware router, vico_tiles teaches mlp2 the mixed images the routers make, and the recipe's final
checkpoint (the last stage's final/) is then a Flash model with both routers: the report adds its Flash
table (tessera.flash_table: every routing, tessera.bench.router).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tessera.answers import SamplingConfig
from tessera.best_of_n import CRITIC_DIR, CriticTrainConfig, fit_critic
from tessera.chat import build_tokenizer
from tessera.config import preset
from tessera.evaluate import EvalResult, evaluate
from tessera.flash_table import flash_summary
from tessera.model.checkpoint import load_checkpoint, save_checkpoint
from tessera.model.init import init_model
from tessera.seeds import CRITIC_SEED_OFFSET
from tessera.train import build_stage
from tessera.train.report import write_report
from tessera.train.rollout import training_queries
from tessera.train.trainer import TrainConfig, Trainer
from tessera.world import corpus


@dataclass
class StagePlan:
    name: str  # the stage's folder in the run; also its kind unless `stage` says otherwise
    train: TrainConfig
    data: dict[str, Any] = field(
        default_factory=dict
    )  # the stage module's data options ({out}, {stage} in strings)
    stage: str | None = (
        None  # a key of tessera.train.STAGES, when a recipe runs one kind twice (sft, then spatial)
    )

    @property
    def kind(self) -> str:
        return self.stage or self.name


@dataclass
class RecipeConfig:
    preset: str = "tiny"
    seed: int = 0
    tokenizer_corpus: int = (
        200  # scenes whose text trains the tokenizer (the world's words are few)
    )
    stages: list[StagePlan] = field(default_factory=list)
    # held-out questions of each per-family evaluation in the report: 200 per family (≈ 40 s on one thread), since
    # at 50 a family's accuracy moves by ±7 points between stages that changed nothing (docs/log/2026-11-24-notes-7.md)
    eval_n: int = 1400
    eval_seed: int = 0
    eval_after: list[str] = field(
        default_factory=lambda: ["sft"]
    )  # stages also evaluated (the final model always is)
    flash_n: int = 350  # held-out questions per routing of the Flash table (when the final model is a Flash model)
    probe_n: int = 70  # held-out questions for the accuracy curve during training
    eval_families: list[str] | None = None  # None = every family of the world
    chance_n: int = 400
    critic_queries: int = (
        300  # training queries whose rollouts train the final model's Best-of-N critic (0: none)
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> RecipeConfig:
        names = [plan.name for plan in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(
                f"every stage may appear once in a recipe (each has one folder), got {names}"
            )
        unknown = [name for name in self.eval_after if name not in names]
        if unknown:
            raise ValueError(
                f"eval_after names stage(s) {unknown} that the recipe does not run ({names}); list the "
                "stages whose model the report should evaluate ([] for only the final one)"
            )
        if min(self.eval_n, self.flash_n, self.probe_n, self.chance_n) < 1:
            raise ValueError("eval_n, flash_n, probe_n and chance_n must be >= 1")
        return self


# the last stage's data: ViCO on mlp2 alone with one ξ per tile, 60 % of tiles at 1/16 (about what the
# question router compresses)
VICO_TILES_DATA = {
    "rows": 4,
    "row_tokens": 512,
    "compress_prob": 0.6,
    "branch": "compressed",
    "xi_per": "tile",
}


def tiny_recipe() -> RecipeConfig:
    """The tiny preset's full schedule (docs/log/ records the probes behind these numbers).

    pretrain: dense descriptions on easy scenes plus the dense grounding loss (tessera.train.grounding_losses: linear
    probes read every cell's glyphs and shapes back from the ViT patches and from the projected tokens), so the
    vision path learns to see glyphs and objects from a signal at every token rather than from a few answer tokens.
    sft: every question family plus descriptions, four questions per image (one ViT pass serves four answers),
    families weighted equally (weighting the reading families 3× cost colour and shape more than it gave reading,
    docs/log/2026-11-24-notes-2.md, E7 vs E8), grounding still on, the world's difficulty stepping up (fixed slots → free placement → full scenes) by sample index, with a
    long middle phase (0.5) in which the language model learns to look entries up among a few.
    sft also tells two attention heads of the language model's middle layer where each answer's evidence is
    (tessera.train.grounding_losses.evidence_attention_loss), answers and the numbers thinking chains read off the
    image alike: without it the digits sit in the visual tokens but the language model never learns to fetch
    them (docs/log/2026-11-24-notes-2.md). 4,800 steps: at 3,200 the accuracy was still rising when the learning
    rate ran out (docs/log/2026-11-24-notes-4.md, has the trade-off against the 30-minute target).
    spatial: 600 more sft steps at full difficulty in which an image may be asked several spatial questions
    (`repeat`) and the place probe (tessera.train.grounding_losses.place_loss) asks what the evidence heads fetched at
    a spatial answer to say where both objects are. With one spatial answer per image at most, the heads found
    both objects but fetched only what they are and spatial stayed at chance through 4,800 steps; this phase
    lifts it to ≈ 80 % (docs/log/2026-11-24-notes-5.md: run from scratch with both on from the start trailed).
    count: 800 more steps at full difficulty with counting weighted 3× and asked up to four times per image, a
    count's evidence being one anchor per thing plus a sink (SFTData.count_sink: n things take n / (n + 1) of the
    heads' mass) and the count probe reading n from what they fetched (SFTData.count); count2: 800 steps more,
    counting 5× and the probe at 3. On 1,400 held-out questions count went 73.5 → 75.5 → 83.5 % and overall
    82.8 → 84.2 → 85.5 % (label, document and spatial rose too); the same 800 steps again at count's settings
    reached 77.5 % count (docs/log/2026-11-24-notes-7.md). From sft's first step the sink trailed (75.4 % overall,
    colour 54 %: session 6), so sft itself keeps the plain lookup.
    focus: 800 more steps in which spatial, label and count (the three families below 85 %) are weighted 2× and
    may each be asked again about the same image, the count probe at 1. Over four disjoint held-out sets of 1,400
    it lifted the SFT model from 84.2 to 86.4 % (count 81 → 85, label 83 → 89, spatial 81 → 86 %).
    Learning rates: language 6e-4, connector 3e-3 (the projector is what the grounding probe found slowest: four
    patches squeezed into one token), ViT 1e-4 (the calibration's learning-rate cliff for reading).

    Then Cascade RL and the Flash stages, RL at tessera.bench.cascade's defaults (a constant lr; fp32 master
    weights). mpo rolls out 4,000 training queries × 8 answers from the SFT model (reasoning 8×, count 2×; its
    pairs, and every query's accuracy for gspo's [0.2, 0.8] filter, land in out/mpo/) and trains 240 steps; gspo
    runs 2,416 steps, four epochs over the 1,206 queries the filter keeps from the shipped SFT model: GSPO moves
    greedy reasoning only after thousands of steps here, and the cascade lifts it 45.0 → 54.7 % on 600 held-out
    questions (docs/BENCHMARKS.md "Cascade RL"). vico adds the fresh 1/16 branch and router and distils the 1/4
    reading into it; router trains only the router, on the loss ratios of four of sft's questions per image (each
    answer weighing the same: 89.5 % of full's accuracy at 31 % fewer tokens in session 8, 84.5 % in session 9's
    run, against 69.9 % with one question; docs/log/2026-11-24-notes-8.md), and ships with the absolute
    threshold at 0 (the relative one alone sets the share of tiles compressed). Labels from scene descriptions
    (RouterData.families) are learnt far better (AUC 0.95 against their own labels vs 0.53) but routed worse on
    the questions (docs/log/2026-11-24-notes-3.md).
    Measured on this machine: at two threads, mpo's collection ≈ 270 s (540 CPU s) + 0.46 s/step (8 pairs),
    gspo ≈ 0.44 s/step averaged over its rollouts (8 queries × 8 answers per 4 steps), so mpo ≈ 6 minutes and
    gspo ≈ 18; at one thread beside another job, vico ≈ 1.05 s/step (4 × 512 tokens, bf16) and router ≈ 0.6
    s/step (8 four-question samples): vico ≈ 420 s, router ≈ 150 s. question_router labels 8 four-question
    images every 4th step (≈ 2.5 s at two threads) and replays its buffer in between (≈ 0.04 s): ≈ 2,400 steps
    in ≈ 20 minutes (twice the steps and a 64-batch buffer took the held-out savings at ≥ 98 % kept from 25 to
    40 %: docs/log/2026-12-03-question-router-difference.md).
    """
    lrs = {"language": 6e-4, "connector": 3e-3, "vision": 1e-4, "router": 1e-4}
    pretrain = TrainConfig(
        steps=250,
        lr=1e-4,
        component_lr=lrs,
        warmup_steps=20,
        min_lr_ratio=0.3,
        precision="bf16",
        save_every=50,
    )
    sft = TrainConfig(
        steps=4800,
        lr=1e-4,
        component_lr=lrs,
        warmup_steps=30,
        min_lr_ratio=0.1,
        precision="bf16",
        save_every=100,
        eval_every=300,
    )
    spatial = TrainConfig(
        steps=600,
        lr=1e-4,
        component_lr=lrs,
        warmup_steps=10,
        min_lr_ratio=0.1,
        precision="bf16",
        save_every=100,
        eval_every=300,
    )
    # RL: constant lr after a short warm-up; the stages pin fp32 themselves (their log-probs meet fp32 rollouts)
    mpo = TrainConfig(
        steps=240,
        lr=2e-5,
        warmup_steps=5,
        min_lr_ratio=1.0,
        log_every=5,
        save_every=120,
        eval_every=120,
    )
    gspo = TrainConfig(
        steps=2416,
        lr=1e-5,
        warmup_steps=5,
        min_lr_ratio=1.0,
        log_every=8,
        save_every=302,
        eval_every=604,
    )
    # vico: the fresh mlp2 (connector) learns fast, the SFT language model and ViT only follow it
    vico = TrainConfig(
        steps=400,
        lr=3e-5,
        component_lr={"connector": 3e-4, "language": 3e-5, "vision": 1e-5},
        warmup_steps=20,
        min_lr_ratio=0.1,
        precision="bf16",
        save_every=100,
        eval_every=100,
    )
    # vico_compressed: ViCO again on mlp2 alone, every image at 1/16 (the 1/4 path stays bit-identical). vico's
    # 400 whole-model steps leave the 1/16 branch blind to colour (13 % all-compressed); 800 more on mlp2 bring
    # colour to 96 % and shape to 90 % (docs/log/2026-12-03-question-router.md)
    vico_compressed = TrainConfig(
        steps=800, lr=5e-4, warmup_steps=20, min_lr_ratio=0.1, save_every=200, eval_every=100000
    )
    # vico_tiles, twice: mlp2 alone again, each tile its own ξ, so that the images the routers mix stay
    # consistent (the 1/4 path bit-identical). On training-split questions at 53.7 % fewer visual tokens the
    # question router keeps 96.3 % of full before, 98.0 % after one pass, 98.6 % after two
    # (docs/log/2026-12-04-vico-tiles.md)
    vico_tiles = TrainConfig(
        steps=400, lr=5e-4, warmup_steps=20, min_lr_ratio=0.1, save_every=200, eval_every=100000
    )
    router = TrainConfig(
        steps=250, lr=3e-4, warmup_steps=10, min_lr_ratio=0.1, save_every=125, eval_every=125
    )
    question_router = TrainConfig(
        steps=2400,
        lr=5e-4,
        warmup_steps=20,
        min_lr_ratio=0.1,
        precision="fp32",
        save_every=400,
        eval_every=800,
    )
    families = {
        "colour": 1.0,
        "shape": 1.0,
        "count": 1.0,
        "label": 1.0,
        "document": 1.0,
        "spatial": 1.0,
        "reasoning": 1.0,
        "describe": 1.0,
    }
    # the phases after sft: its data at full difficulty, one family asked several times per image, the probes on
    # what the middle layer's heads fetched
    phase = {
        "rows": 4,
        "row_tokens": 512,
        "families": families,
        "thinking_prob": 0.7,
        "turns": 4,
        "grounding": 1.0,
        "evidence_attention": 1.0,
        "evidence_heads": [0, 2],
        "chain_evidence": True,
        "place": 1.0,
        "curriculum": [[0, 1.0]],
    }
    phase_train = TrainConfig(**{**asdict(spatial), "steps": 800})  # count, count2 and focus
    counting = {**phase, "repeat": ["count"], "count_sink": True}
    return RecipeConfig(
        eval_after=["spatial", "count", "count2", "focus", "mpo", "gspo"],
        stages=[
            StagePlan(
                "pretrain",
                pretrain,
                {
                    "rows": 4,
                    "row_tokens": 512,
                    "grounding": 1.0,
                    "curriculum": [[0, 0.0], [2000, 0.0], [2001, 0.5]],
                },
            ),
            StagePlan(
                "sft",
                sft,
                {
                    "rows": 4,
                    "row_tokens": 512,
                    "families": families,
                    "thinking_prob": 0.7,
                    "turns": 4,
                    "grounding": 1.0,
                    "evidence_attention": 1.0,
                    "evidence_heads": [0, 2],
                    "chain_evidence": True,
                    "curriculum": [[0, 0.0], [3000, 0.0], [3001, 0.5], [12000, 0.5], [16000, 1.0]],
                },
            ),
            StagePlan("spatial", spatial, {**phase, "repeat": ["spatial"]}, stage="sft"),
            StagePlan(
                "count",
                phase_train,
                {**counting, "families": {**families, "count": 3.0}, "count": 1.0},
                stage="sft",
            ),
            StagePlan(
                "count2",
                phase_train,
                {**counting, "families": {**families, "count": 5.0}, "count": 3.0},
                stage="sft",
            ),
            StagePlan(
                "focus",
                phase_train,
                {
                    **counting,
                    "families": {**families, "spatial": 2.0, "label": 2.0, "count": 2.0},
                    "repeat": ["spatial", "label", "count"],
                    "count": 1.0,
                },
                stage="sft",
            ),
            StagePlan(
                "mpo",
                mpo,
                {"out": "{stage}", "queries": 4000, "group_size": 8, "pairs_per_batch": 8},
            ),
            StagePlan(
                "gspo",
                gspo,
                {
                    "accuracies": "{out}/mpo/queries.jsonl",
                    "group_size": 8,
                    "queries_per_rollout": 8,
                    "mini_batches": 4,
                },
            ),
            StagePlan("vico", vico, {"rows": 4, "row_tokens": 512}),
            StagePlan(
                "vico_compressed",
                vico_compressed,
                {"rows": 4, "row_tokens": 512, "compress_prob": 1.0, "branch": "compressed"},
                stage="vico",
            ),
            StagePlan(
                "router",
                router,
                {"samples_per_batch": 8, "heldout": 48, "absolute_threshold": 0.0, "turns": 4},
            ),
            StagePlan(
                "question_router",
                question_router,
                {"samples_per_batch": 8, "heldout": 32, "turns": 4, "buffer_batches": 64},
            ),
            *[
                StagePlan(name, vico_tiles, VICO_TILES_DATA, stage="vico")
                for name in ("vico_tiles", "vico_tiles2")
            ],
        ],
    )


def quick_recipe() -> RecipeConfig:
    """Every stage at toy scale (well under two minutes in all): exercises the whole path, learns almost nothing.

    sft is the exception: 60 steps on colour and shape only (≈ 15 s), the least that makes the model answer in
    the right format often enough for its rollouts to hold preference pairs and queries inside gspo's [0.2, 0.8]
    band (measured: 13 pairs and 7 such queries of 16); from a model that never answers, the RL stages would have
    nothing to learn from and refuse to start.
    """
    small = dict(rows=2, row_tokens=384, workers=0)
    rl_families = {"colour": 1.0, "shape": 1.0}
    quiet = dict(warmup_steps=1, log_every=1)
    return RecipeConfig(
        tokenizer_corpus=60,
        eval_n=14,
        flash_n=7,
        probe_n=7,
        chance_n=50,
        critic_queries=8,
        stages=[
            StagePlan(
                "pretrain", TrainConfig(steps=3, lr=1e-4, save_every=2, **quiet), dict(small)
            ),
            StagePlan(
                "sft",
                TrainConfig(
                    steps=60, lr=3e-4, warmup_steps=2, min_lr_ratio=1.0, log_every=5, eval_every=60
                ),
                {**small, "families": rl_families, "turns": 4, "curriculum": [[0, 0.0]]},
            ),
            StagePlan(
                "spatial",
                TrainConfig(steps=2, lr=1e-4, **quiet),
                {
                    **small,
                    "families": {**rl_families, "spatial": 1.0},
                    "turns": 4,
                    "place": 1.0,
                    "repeat": ["spatial"],
                    "curriculum": [[0, 1.0]],
                },
                stage="sft",
            ),
            *[
                StagePlan(
                    name,
                    TrainConfig(steps=2, lr=1e-4, **quiet),
                    {
                        **small,
                        "families": {**rl_families, "count": 1.0},
                        "turns": 4,
                        "count_sink": True,
                        "count": 1.0,
                        "repeat": ["count"],
                        "curriculum": [[0, 1.0]],
                    },
                    stage="sft",
                )
                for name in ("count", "count2", "focus")
            ],
            StagePlan(
                "mpo",
                TrainConfig(steps=2, lr=2e-5, min_lr_ratio=1.0, **quiet),
                {
                    "out": "{stage}",
                    "queries": 16,
                    "group_size": 4,
                    "pairs_per_batch": 2,
                    "families": rl_families,
                },
            ),
            StagePlan(
                "gspo",
                TrainConfig(steps=2, lr=1e-5, min_lr_ratio=1.0, **quiet),
                {
                    "accuracies": "{out}/mpo/queries.jsonl",
                    "group_size": 4,
                    "queries_per_rollout": 2,
                    "mini_batches": 2,
                },
            ),
            StagePlan("vico", TrainConfig(steps=2, lr=1e-4, **quiet), dict(small)),
            StagePlan(
                "vico_compressed",
                TrainConfig(steps=2, lr=1e-4, **quiet),
                {**small, "compress_prob": 1.0, "branch": "compressed"},
                stage="vico",
            ),
            StagePlan(
                "router",
                TrainConfig(steps=2, lr=1e-4, eval_every=2, **quiet),
                {"samples_per_batch": 2, "workers": 0, "heldout": 4},
            ),
            StagePlan(
                "question_router",
                TrainConfig(steps=4, lr=1e-4, eval_every=4, **quiet),
                {"samples_per_batch": 2, "workers": 0, "heldout": 2, "relabel_every": 2},
            ),
            *[
                StagePlan(
                    name,
                    TrainConfig(steps=2, lr=1e-4, **quiet),
                    {**VICO_TILES_DATA, **small},
                    stage="vico",
                )
                for name in ("vico_tiles", "vico_tiles2")
            ],
        ],
    )


@dataclass
class RecipeResult:
    out: Path
    final_checkpoint: Path
    summary: dict[str, Any]


def init_model_for(config: RecipeConfig):
    """A fresh model of the preset with a tokenizer trained on the world's text, without Flash parts: the base
    stages never train mlp2 or the router, so ViCO adds them (VisionLanguageModel.add_flash_branch)."""
    model_config = preset(config.preset)
    model_config.flash.enabled = False
    tokenizer = build_tokenizer(
        corpus(config.tokenizer_corpus), vocab_size=model_config.language.vocab_size
    )
    return init_model(model_config, tokenizer, seed=config.seed)


def run_recipe(
    preset: str | RecipeConfig = "tiny",
    out: str | Path = "runs/tiny",
    quick: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> RecipeResult:
    """Run the cascade on `device`; returns the final checkpoint folder and the report's summary."""
    if isinstance(preset, RecipeConfig):
        config = preset
    elif preset == "tiny":
        config = quick_recipe() if quick else tiny_recipe()
    else:
        raise ValueError(
            f"the recipe has a schedule for the tiny preset only, not {preset!r}; pass a RecipeConfig"
        )
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    init_dir = out / "init"
    if (init_dir / "model.safetensors").exists():
        model = load_checkpoint(init_dir)
    else:
        model = init_model_for(config)
        save_checkpoint(model, init_dir)
    model = model.to(device)
    stage_dirs: dict[str, Path] = {}
    stage_evals: dict[str, EvalResult] = {}
    for plan in config.stages:
        folder = out / plan.name
        stage_dirs[plan.name] = folder
        model = run_stage(model, plan, config, out, progress).to(
            device
        )  # a finished stage loads on the CPU
        if plan.name in config.eval_after:
            stage_evals[plan.name] = _evaluate(
                model, config, out, f"after {plan.name}", folder / "final"
            )
    last = config.stages[-1].name if config.stages else None
    final = stage_dirs[last] / "final" if last else init_dir
    result = stage_evals.get(last) or _evaluate(model, config, out, "final", final)
    flash = None
    if model.router is not None:  # the cascade ended on a Flash model: measure what its router buys
        key = _eval_key(final, n=config.flash_n, seed=config.eval_seed)
        flash = cached(
            out / "evals.json",
            "flash",
            key,
            lambda: flash_summary(model, config.flash_n, config.eval_seed),
        )
    if config.critic_queries:
        fit_final_critic(model, final, config)
    summary = write_report(
        out,
        result,
        stage_dirs,
        read_timings(out / "timings.json"),
        {"final_checkpoint": str(final), "quick": quick},
        chance_n=config.chance_n,
        stage_evals=stage_evals,
        flash=flash,
    )
    return RecipeResult(out, final, summary)


def fit_final_critic(model, final: Path, config: RecipeConfig) -> None:
    """Train the Best-of-N critic (tessera.best_of_n) on the final model's rollouts into final/critic, so that `eval`
    and `chat --best-of N` work on the recipe's checkpoint; skipped when a critic of these weights is there."""
    folder = final / CRITIC_DIR
    key = json.loads(json.dumps(_eval_key(final, queries=config.critic_queries, seed=config.seed)))
    stamp = folder / "weights.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        return
    queries = training_queries(config.critic_queries, None, config.seed, CRITIC_SEED_OFFSET)
    critic, report = fit_critic(
        model,
        queries,
        SamplingConfig(temperature=0.7, group_size=8, seed=config.seed),
        CriticTrainConfig(seed=config.seed),
        log=None,
    )
    critic.save(folder)
    _write_json(folder / "report.json", asdict(report))
    _write_json(stamp, key)


def run_stage(model, plan: StagePlan, config: RecipeConfig, out: Path, progress: bool = True):
    """Train one stage into out/<name> (resuming from its checkpoints) and return the trained model; a stage a
    previous run finished is loaded from its final/ folder instead of being built again."""
    folder = out / plan.name
    if stage_finished(folder, plan.train.steps):
        return load_checkpoint(folder / "final")
    train = TrainConfig(**{**asdict(plan.train), "progress": progress and plan.train.progress})
    resumed = (folder / "checkpoints" / "latest").exists()
    start = time.perf_counter()
    stage = build_stage(plan.kind, model, resolve_paths(plan.data, out, folder))
    # a stage with its own evaluation (the router's tile accuracy) uses it; the others get the accuracy probe
    eval_fn = (getattr(stage, "eval_fn", None) or _probe(config)) if train.eval_every else None
    Trainer(model, stage, train, folder, eval_fn=eval_fn).fit(resume=True)
    record_timing(out / "timings.json", plan.name, time.perf_counter() - start, resumed)
    return model


def stage_finished(folder: Path, steps: int) -> bool:
    """True when `folder` holds a final model and its latest checkpoint (tessera.train.trainer's layout:
    checkpoints/latest names `step-NNNNNN`) is at `steps` or beyond."""
    pointer = folder / "checkpoints" / "latest"
    if not (folder / "final" / "model.safetensors").exists() or not pointer.exists():
        return False
    name = pointer.read_text().strip()
    if not name.startswith("step-") or not name.removeprefix("step-").isdigit():
        raise ValueError(f"{pointer} names {name!r}, not a step-N checkpoint")
    return int(name.removeprefix("step-")) >= steps


def resolve_paths(data: dict[str, Any], out: Path, folder: Path) -> dict[str, Any]:
    """The stage's data options with `{out}` and `{stage}` in string values replaced by the recipe's folder and
    the stage's folder."""
    return {
        k: v.replace("{out}", str(out)).replace("{stage}", str(folder)) if isinstance(v, str) else v
        for k, v in data.items()
    }


def read_timings(path: Path) -> dict[str, float]:
    return json.loads(path.read_text()) if path.exists() else {}


def record_timing(path: Path, stage: str, seconds: float, resumed: bool) -> None:
    """Store the stage's wall time in `path`: a stage resumed from a checkpoint adds this run's seconds to the
    earlier runs' (a run killed before its end leaves no record), a stage started afresh replaces them."""
    timings = read_timings(path)
    timings[stage] = (timings.get(stage, 0.0) if resumed else 0.0) + seconds
    _write_json(path, timings)


def cached(
    path: Path, label: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The result stored in `path` under `label` when it was computed with the same `key`, else compute() (stored)."""
    key = json.loads(json.dumps(key))  # the form it takes once stored (tuples become lists)
    store = json.loads(path.read_text()) if path.exists() else {}
    hit = store.get(label)
    if hit is not None and hit["key"] == key:
        return hit["result"]
    result = compute()
    store[label] = {"key": key, "result": result}
    _write_json(path, store)
    return result


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _eval_key(checkpoint: Path, **settings: Any) -> dict[str, Any]:
    """What an evaluation depends on: the weights (by file size and modification time) and its settings."""
    weights = (checkpoint / "model.safetensors").stat()
    return {
        "checkpoint": str(checkpoint),
        "weights": [weights.st_size, weights.st_mtime_ns],
        **settings,
    }


def _evaluate(model, config: RecipeConfig, out: Path, label: str, checkpoint: Path):
    """The report's per-family evaluation of `model` (whose weights are `checkpoint`'s), cached in out/evals.json."""

    def compute() -> dict[str, Any]:
        torch.manual_seed(config.seed)
        return evaluate(
            model,
            seed=config.eval_seed,
            n=config.eval_n,
            families=config.eval_families,
            keep_records=False,
        ).to_json()

    key = _eval_key(
        checkpoint, n=config.eval_n, seed=config.eval_seed, families=config.eval_families
    )
    return EvalResult(**cached(out / "evals.json", label, key, compute))


def _probe(config: RecipeConfig):
    """The eval_fn the trainer calls during training: a small held-out set, disjoint from the final one."""

    def probe(model, step: int) -> dict[str, Any]:
        r = evaluate(
            model,
            seed=config.eval_seed + 100_000,
            n=config.probe_n,
            families=config.eval_families,
            keep_records=False,
        )
        return {"overall": r.overall, "families": r.families}

    return probe
