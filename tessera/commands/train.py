"""`tessera train STAGE (--preset tiny | --config FILE) --out DIR [--init CKPT] [--steps N] [--lr LR] ...`

A config FILE is JSON: {"model": {"preset": "tiny"} | a ModelConfig dict, "train": TrainConfig fields,
"data": the stage's data options}. Without --init the model starts from random weights with a tokenizer
trained on the world's text. An interrupted run resumes from DIR's latest checkpoint (--no-resume restarts).
Under torchrun every process trains on its own share of the stream (gloo, gradients summed each step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tessera.device import add_device_arguments, devices_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tessera.train import STAGES

    p.add_argument("stage", choices=sorted(STAGES), help="training stage")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="model preset for a fresh model (default tiny)")
    src.add_argument("--config", help="JSON file with model / train / data sections")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, final/)")
    p.add_argument("--init", help="start from this checkpoint instead of random weights")
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--warmup", type=int, help="warm-up steps")
    p.add_argument("--accum", type=int, help="gradient accumulation micro-batches per step")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on CPUs with native bf16")
    p.add_argument("--save-every", type=int)
    p.add_argument("--rows", type=int, help="packed rows per micro-batch")
    p.add_argument("--row-tokens", type=int, help="tokens per packed row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-corpus", type=int, default=200, help="scenes whose text trains a fresh tokenizer")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arguments(p)  # --dtype bfloat16|float32: the compute precision (master weights stay fp32)


def load_run_config(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(model section, train section, data section) from --config, then the command-line overrides."""
    model_section, train, data = {"preset": args.preset or "tiny"}, {}, {}
    if args.config:
        try:
            cfg = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"cannot read --config {args.config}: {e}")
        unknown = sorted(set(cfg) - {"model", "train", "data"})
        if unknown:
            raise SystemExit(f"{args.config}: unknown section(s) {unknown}; use model, train, data")
        model_section, train, data = cfg.get("model", model_section), cfg.get("train", {}), cfg.get("data", {})
    for flag, key in (("steps", "steps"), ("lr", "lr"), ("warmup", "warmup_steps"), ("accum", "accum_steps"),
                      ("precision", "precision"), ("save_every", "save_every")):
        if getattr(args, flag) is not None:
            train[key] = getattr(args, flag)
    train.setdefault("seed", args.seed)
    if args.no_progress:
        train["progress"] = False
    for flag, key in (("rows", "rows"), ("row_tokens", "row_tokens")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    return model_section, train, data


def build_model(model_section: dict, init: str | None, seed: int, corpus_size: int = 200):
    from tessera.chat import build_tokenizer
    from tessera.config import ModelConfig, preset
    from tessera.model.init import init_model

    if init:
        import tessera

        return tessera.load(init)
    from tessera.world import corpus

    if set(model_section) == {"preset"}:
        config = preset(model_section["preset"])
    else:
        config = ModelConfig.from_dict(model_section)
    tokenizer = build_tokenizer(corpus(corpus_size), vocab_size=config.language.vocab_size)
    return init_model(config, tokenizer, seed=seed)


def run(args: argparse.Namespace) -> int:
    from tessera.train import build_stage
    from tessera.train.trainer import TrainConfig, Trainer

    import torch

    devices = devices_from_args(args)
    model_section, train, data = load_run_config(args)
    if devices.dtype is not None:
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(devices.dtype)
        if precision is None:
            raise SystemExit(f"train: --dtype {args.dtype} is not a training precision; use float32 or bfloat16")
        train.setdefault("precision", precision)
    config = TrainConfig.from_dict(train)
    model = build_model(model_section, args.init, args.seed, args.tokenizer_corpus).to(devices.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"stage": args.stage, "model": model_section, "train": train, "data": data,
                                              "init": args.init}, indent=2) + "\n")
    if args.stage in ("mpo", "gspo"):
        data.setdefault("out", str(out / "rollouts"))  # the offline rollouts (pairs, accuracies) stay with the run
    stage = build_stage(args.stage, model, data)
    result = Trainer(model, stage, config, out, eval_fn=getattr(stage, "eval_fn", None)).fit(resume=not args.no_resume)
    last = result.history[-1] if result.history else {}
    print(f"{args.stage}: step {result.step}, loss {last.get('loss', float('nan')):.4f}; model in {result.final_dir}")
    return 0
