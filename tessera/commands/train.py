"""`tessera train STAGE (--preset tiny | --config FILE) --out DIR [--init CKPT] [--steps N] [--lr LR] ...`

A config FILE is JSON: {"model": {"preset": "tiny"} | a ModelConfig dict, "train": TrainConfig fields,
"data": the stage's data options}. Without --init the model starts from random weights with a tokenizer
trained on the world's text. An interrupted run resumes from DIR's latest checkpoint (--no-resume restarts).
Under torchrun every process trains on its own share of the stream (gloo, gradients summed each
step); `--fsdp` shards the model, its gradients and the optimizer state over the processes with
FSDP2 instead of replicating them (per ViT block and decoder layer, then the root); checkpoints and final/
are gathered into the usual layout, so chat, eval and a resume (with --fsdp and the same number of
processes) load them as always.

`--data PATH` trains on your data instead of the world (an InternVL meta JSON or a .jsonl/.json/.parquet file,
scanned before training: `--skip-bad-records` drops bad records and counts them): conversations for sft, vico
and router,
preference pairs (image, question, chosen, rejected) for mpo, prompts (image, question, answer) for gspo, whose
rollouts `--reward` scores; `--lora` trains peft LoRA
adapters only, writes them to DIR/adapter and the merged model to DIR/final (`tessera merge` re-merges).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tessera.device import add_device_arguments, devices_from_args
from tessera.train import STAGES


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on CPUs with native bf16",
    )
    p.add_argument("--save-every", type=int)
    p.add_argument("--rows", type=int, help="packed rows per micro-batch")
    p.add_argument("--row-tokens", type=int, help="tokens per packed row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tokenizer-corpus",
        type=int,
        default=200,
        help="scenes whose text trains a fresh tokenizer",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard with FSDP2 instead of replicating (DDP); "
        "no effect in one process",
    )
    add_device_arguments(
        p
    )  # --dtype bfloat16|float32: the compute precision (master weights stay fp32)
    add_data_arguments(p)


DATA_STAGES = (
    "sft",
    "vico",
    "router",
    "question_router",
    "mpo",
    "gspo",
)  # the stages that read --data (the others still read the world)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--data, --skip-bad-records and the LoRA flags (tessera.train.lora)."""
    p.add_argument(
        "--data",
        help="your data: an InternVL meta JSON or a .jsonl/.json/.parquet file "
        f"(stages: {', '.join(DATA_STAGES)})",
    )
    p.add_argument("--reward", help="gspo --data: exact, numeric, choice, boxed or module:function")
    p.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="drop bad records (counted in the log) instead of stopping before training",
    )
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only (needs --init)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument(
        "--lora-targets",
        default="language",
        help="components to adapt, comma-separated: language, vision, connector",
    )
    p.add_argument(
        "--lora-modules",
        default="",
        help="Linear name suffixes to wrap, comma-separated (default: each component's own)",
    )
    p.add_argument(
        "--lora-train-modules",
        default="",
        help="module name suffixes trained in full beside the adapters, saved with them "
        "and merged (peft modules_to_save), comma-separated, "
        "e.g. vision_model.embeddings,norm1,norm2",
    )
    p.add_argument(
        "--lora-rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(rank)"
    )
    p.add_argument(
        "--lora-plus-ratio",
        type=float,
        default=1.0,
        help="LoRA+: the adapters' B matrices learn at this multiple of --lr "
        "(16 lifted SFT on a new task from 72%% to 99%%: docs/log/2026-12-03-lora.md)",
    )


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
        model_section, train, data = (
            cfg.get("model", model_section),
            cfg.get("train", {}),
            cfg.get("data", {}),
        )
    for flag, key in (
        ("steps", "steps"),
        ("lr", "lr"),
        ("warmup", "warmup_steps"),
        ("accum", "accum_steps"),
        ("precision", "precision"),
        ("save_every", "save_every"),
    ):
        if getattr(args, flag) is not None:
            train[key] = getattr(args, flag)
    train.setdefault("seed", args.seed)
    if args.no_progress:
        train["progress"] = False
    if getattr(args, "fsdp", False):
        train["fsdp"] = True
    for flag, key in (("rows", "rows"), ("row_tokens", "row_tokens")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    if getattr(args, "data", None):
        if args.stage not in DATA_STAGES:
            raise SystemExit(
                f"--data: stage {args.stage!r} still reads only the world; "
                f"stages reading your data: {', '.join(DATA_STAGES)}"
            )
        data["data"] = args.data
    if getattr(args, "reward", None):
        if args.stage != "gspo" or not getattr(args, "data", None):
            raise SystemExit(
                "--reward scores GSPO's rollouts on --data prompts: use it with gspo --data"
            )
        data["reward"] = args.reward
    if getattr(args, "skip_bad_records", False):
        data["skip_bad_records"] = True
    return model_section, train, data


def lora_options(args: argparse.Namespace):
    """The LoraOptions of the command line, or None without --lora."""
    if not getattr(args, "lora", False):
        return None
    # imports stay in functions here: `tessera train --help` builds its parser without them
    from tessera.train.lora import LoraOptions

    if not args.init:
        raise SystemExit("--lora adapts a trained model: give --init CKPT")
    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip())  # noqa: E731
    try:
        return LoraOptions(
            args.lora_rank,
            args.lora_alpha,
            args.lora_dropout,
            split(args.lora_targets),
            split(args.lora_modules),
            split(args.lora_train_modules),
            args.lora_rslora,
            args.lora_plus_ratio,
        )
    except ValueError as e:
        raise SystemExit(f"--lora: {e}")


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
    import torch
    import torch.distributed as dist

    from tessera.data import DataError
    from tessera.train import build_stage
    from tessera.train.trainer import TrainConfig, Trainer

    devices = devices_from_args(args)
    model_section, train, data = load_run_config(args)
    if devices.dtype is not None:
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(devices.dtype)
        if precision is None:
            raise SystemExit(
                f"train: --dtype {args.dtype} is not a training precision; use float32 or bfloat16"
            )
        train.setdefault("precision", precision)
    config = TrainConfig.from_dict(train)
    model = build_model(model_section, args.init, args.seed, args.tokenizer_corpus).to(
        devices.device
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(
        json.dumps(
            {
                "stage": args.stage,
                "model": model_section,
                "train": train,
                "data": data,
                "init": args.init,
            },
            indent=2,
        )
        + "\n"
    )
    if args.stage in ("mpo", "gspo"):
        data.setdefault(
            "out", str(out / "rollouts")
        )  # the offline rollouts (pairs, accuracies) stay with the run
    try:
        stage = build_stage(args.stage, model, data)
    except DataError as e:
        raise SystemExit(str(e))
    report = getattr(stage, "scan_report", None)
    if report is not None:
        (out / "data_scan.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(
            f"data: {len(report.records)} records from {args.data}"
            + (f"; {report.summary()}" if report.skipped else "")
        )
    options = lora_options(args)
    save_model = {}
    if options is not None:
        from tessera.train.lora import LoraSaver, apply_lora, is_lora_param, lora_share, lr_scale

        apply_lora(model, options)
        stage.param_filter = is_lora_param
        stage.lr_scale = lr_scale(options)
        save_model = {"save_model": LoraSaver(options, str(Path(args.init).resolve()))}
        lora, total = lora_share(model)
        full = f" + {', '.join(options.train_modules)} in full" if options.train_modules else ""
        base = total - lora  # the trained copies of train modules count once, as trained
        print(
            f"LoRA rank {options.rank} on {', '.join(options.components)}{full}: "
            f"{lora:,} parameters train, {lora / base:.2%} of the model's {base:,}"
        )
    result = Trainer(
        model, stage, config, out, eval_fn=getattr(stage, "eval_fn", None), **save_model
    ).fit(resume=not args.no_resume)
    main_process = (
        not dist.is_initialized() or dist.get_rank() == 0
    )  # under torchrun rank 0 writes final/
    if options is not None and result.step >= config.steps and main_process:
        finish_lora(result.model, result.final_dir, out)  # under FSDP: the gathered copy
    last = result.history[-1] if result.history else {}
    line = f"{args.stage}: step {result.step}, loss {last.get('loss', float('nan')):.4f}; model in {result.final_dir}"
    rewards = {k: v for k, v in last.items() if k.startswith("reward")}
    if rewards:
        line += "; " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(rewards.items()))
    if options is not None:
        line += f" (LoRA merged; adapter in {out / 'adapter'})"
    if report is not None and report.skipped:
        line += f"; {report.summary()} (see {out / 'data_scan.json'})"
    print(line)
    return 0


def finish_lora(model, final: Path, out: Path) -> None:
    """The adapter beside the run (out/adapter) and final/ as the merged model, loadable like any other."""
    import shutil

    from tessera.model.checkpoint import save_checkpoint
    from tessera.train.lora import ADAPTER_DIR, merge_into

    shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
    shutil.copytree(final / ADAPTER_DIR, out / ADAPTER_DIR)
    shutil.rmtree(final)
    save_checkpoint(merge_into(model), final)
