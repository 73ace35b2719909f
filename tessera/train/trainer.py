"""The one training loop, for every stage (see tessera.train.stage for what a stage provides).

Parameter groups per component (vision, connector, language, router) with their own learning rate and a
trainable flag; AdamW (no decay on norms, biases, embeddings); linear warm-up then cosine decay to
`min_lr_ratio`; optional bf16 autocast; gradient accumulation; clipping; data parallelism under torchrun
(gloo on CPU: gradients are summed with one all-reduce per step, which works whatever model methods a stage
calls), or sharded with FSDP2 when `fsdp` is set (tessera.train.sharding: every rank holds a
slice of the weights, gradients and optimizer state; checkpoints are gathered into the usual layout
on rank 0); atomic checkpoints with everything an exact resume needs; metrics.jsonl and a tqdm bar.

Layout of `out/`:
    metrics.jsonl                one JSON object per logged step (and per evaluation, with "eval")
    checkpoints/step-000100/     model files (save_model) + trainer.pt (optimizer, scheduler, RNG, data positions)
    checkpoints/latest           name of the newest complete checkpoint
    final/                       the trained model, loadable with tessera.load
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from tessera.device import model_device, to_device
from tessera.model.checkpoint import save_checkpoint
from tessera.train import sharding
from tessera.train.stage import Stage, component_of

_NO_DECAY_MARKERS = ("norm", "bias", "embed", "ls1", "ls2", "class_embedding", "position_embedding")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimiser steps of the schedule
    lr: float = (
        1e-4  # base learning rate (the calibration found a cliff above ~1e-4 for this tiny model)
    )
    component_lr: dict[str, float] = field(default_factory=dict)  # component → lr, overrides `lr`
    trainable: dict[str, bool] = field(default_factory=dict)  # component → trainable (default True)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine ends at lr · min_lr_ratio
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0 = no clipping
    accum_steps: int = 1
    precision: str = (
        "auto"  # "auto" | "fp32" | "bf16" (CPU autocast); auto = bf16 where the CPU has native bf16
    )
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between calls of the trainer's eval_fn; 0 = never
    seed: int = 0
    threads: int = 0  # torch threads per process; 0 = cores / processes
    progress: bool = True
    fsdp: bool = False  # under torchrun: shard with FSDP2, not replicate (no effect in one process)

    def validate(self) -> TrainConfig:
        if self.steps < 1 or self.accum_steps < 1 or self.lr <= 0:
            raise ValueError(
                f"need steps ≥ 1, accum_steps ≥ 1 and lr > 0 (got {self.steps}, {self.accum_steps}, {self.lr})"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        unknown = (set(self.component_lr) | set(self.trainable)) - {
            "vision",
            "connector",
            "language",
            "router",
        }
        if unknown:
            raise ValueError(
                f"unknown component(s) {sorted(unknown)}; use vision, connector, language, router"
            )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown train config field(s): {', '.join(unknown)}")
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data).validate()


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 arithmetic (AVX512-BF16 or AMX-BF16).

    Measured on such a CPU (docs/TRAINING.md): a tiny-preset step under bf16 autocast takes ~25 % less CPU time
    than fp32. Without these instructions bf16 is emulated and slower, so `auto` picks fp32 there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    if precision == "auto":
        if torch.device(device).type == "cuda":
            return "bf16"  # every GPU this runs on computes bf16 natively
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return precision


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warm-up to 1, then cosine down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls) -> Distributed:
        """Join the torchrun process group (gloo) when WORLD_SIZE > 1; otherwise a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size())


def set_threads(config: TrainConfig, world: int) -> int:
    """Give each process an equal share of the cores unless OMP_NUM_THREADS or config.threads says otherwise."""
    if config.threads:
        n = config.threads
    elif os.environ.get("OMP_NUM_THREADS"):
        n = int(os.environ["OMP_NUM_THREADS"])
    else:
        n = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(n)
    return n


def build_optimizer(
    model: torch.nn.Module,
    config: TrainConfig,
    overrides: dict[str, dict] | None = None,
    extra: torch.nn.Module | None = None,
):
    """AdamW with one group per (component, decay?) pair; frozen components get requires_grad=False.
    A stage's `extra` module trains as component "aux" (lr: component_lr["aux"], else the connector's)."""
    overrides = overrides or {}
    lrs = {**config.component_lr, **overrides.get("component_lr", {})}
    lrs.setdefault("aux", lrs.get("connector", config.lr))
    trainable = {**config.trainable, **overrides.get("trainable", {})}
    keep = overrides.get("param_filter")  # name → bool: only these train (e.g. LoRA adapters)
    scale = overrides.get("lr_scale") or (
        lambda name: 1.0
    )  # name → lr factor (e.g. LoRA+ on lora_B)
    groups: dict[tuple[str, bool, float], list[torch.nn.Parameter]] = {}
    named = [(n, p, component_of(n)) for n, p in model.named_parameters()]
    named += [(n, p, "aux") for n, p in (extra.named_parameters() if extra is not None else [])]
    for name, p, comp in named:
        p.requires_grad_(
            trainable.get(comp, True) and (comp == "aux" or keep is None or keep(name))
        )
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not any(m in name for m in _NO_DECAY_MARKERS)
        groups.setdefault((comp, decay, scale(name)), []).append(p)
    if not groups:
        raise ValueError("every component is frozen: nothing to train")
    param_groups = [
        {
            "params": ps,
            "lr": lrs.get(comp, config.lr) * factor,
            "weight_decay": config.weight_decay if decay else 0.0,
            "name": f"{comp}{'' if decay else '.no_decay'}{'' if factor == 1 else f'.x{factor:g}'}",
        }
        for (comp, decay, factor), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, betas=config.betas)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load model.safetensors strictly, except keys a file may omit because they alias another (tied) tensor."""
    weights = load_file(str(path))
    result = model.load_state_dict(weights, strict=False)
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    loaded = {ptrs[k] for k in weights if k in ptrs}
    missing = [k for k in result.missing_keys if ptrs[k] not in loaded]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def _default_save_model(model: torch.nn.Module, path: Path) -> None:
    save_checkpoint(model, path)


@dataclass
class TrainResult:
    step: int
    final_dir: Path
    metrics_path: Path
    history: list[dict[str, float]]
    # the trained model as a plain module: the Trainer's own, or under FSDP a gathered copy on the
    # main process once final/ is written (None on the other ranks and after an early stop)
    model: torch.nn.Module | None = None


class Trainer:
    """Runs `stage` on `model` for `config.steps` optimiser steps, writing into `out`."""

    def __init__(
        self,
        model: torch.nn.Module,
        stage: Stage,
        config: TrainConfig,
        out: str | Path,
        save_model: Callable[[torch.nn.Module, Path], None] = _default_save_model,
        eval_fn: Callable[[torch.nn.Module, int], dict[str, Any]] | None = None,
    ):
        self.model, self.stage, self.config = model, stage, config.validate()
        self.out = Path(out)
        self.save_model, self.eval_fn = save_model, eval_fn
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self._fsdp = False  # set by fit: the model is sharded (tessera.train.sharding)
        self._template: torch.nn.Module | None = None  # under FSDP, rank 0: the model on meta
        self._joint: torch.nn.Module = model  # every trained parameter by name (+ stage's extra)

    # ---- checkpoints ----------------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.exists():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        if not (path / "trainer.pt").exists():
            raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
        return path

    def _plain_model(self) -> torch.nn.Module | None:
        """The model as a plain module for the savers: itself, or under FSDP its gathered copy on
        rank 0 (None on the other ranks). Under FSDP every rank must call this (a collective)."""
        if not self._fsdp:
            return self.model
        state = sharding.full_state(self.model)
        return sharding.fill(self._template, state) if self._template is not None else None

    def _save(self, step: int, position: int, optimizer, scheduler, ddp: Distributed) -> None:
        gathered = [(position, _rng_state())]
        if ddp.world > 1:
            gathered = [None] * ddp.world
            dist.all_gather_object(gathered, (position, _rng_state()))
        plain = self._plain_model()
        optim_state = (
            sharding.full_optimizer_state(self._joint, optimizer)
            if self._fsdp
            else optimizer.state_dict()
            if ddp.main
            else None
        )
        if ddp.main:
            name = f"step-{step:06d}"
            tmp = self.ckpt_dir / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.save_model(plain, tmp)
            del plain
            extra = getattr(self.stage, "extra", None)
            torch.save(
                {
                    "step": step,
                    "optimizer": optim_state,
                    "scheduler": scheduler.state_dict(),
                    "extra": extra.state_dict() if extra is not None else None,
                    "positions": [g[0] for g in gathered],
                    "rng": [g[1] for g in gathered],
                    "world": ddp.world,
                    "fsdp": self._fsdp,
                    "stage": self.stage.name,
                    "config": asdict(self.config),
                },
                tmp / "trainer.pt",
            )
            final = self.ckpt_dir / name
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)  # the checkpoint appears complete or not at all
            pointer_tmp = self.ckpt_dir / ".latest.tmp"
            pointer_tmp.write_text(name + "\n")
            os.replace(pointer_tmp, self.ckpt_dir / "latest")
            done = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir())
            for old in done[: max(0, len(done) - self.config.keep_checkpoints)]:
                shutil.rmtree(old)
        if ddp.world > 1:
            dist.barrier()

    def _load(self, path: Path, optimizer, scheduler, ddp: Distributed) -> tuple[int, int]:
        state = torch.load(path / "trainer.pt", weights_only=False)
        if state["world"] != ddp.world:
            raise ValueError(
                f"{path} was written by {state['world']} processes; resume with the same number (now {ddp.world})"
            )
        if state["stage"] != self.stage.name:
            raise ValueError(f"{path} is a {state['stage']!r} checkpoint, not {self.stage.name!r}")
        if state.get("fsdp", False) != self._fsdp:
            how = "with" if state.get("fsdp") else "without"
            raise ValueError(
                f"{path} was written {how} FSDP; resume it the same way ({how} --fsdp)"
            )
        if self._fsdp:
            sharding.load_full_state(self.model, load_file(str(path / "model.safetensors")))
        else:
            load_weights(self.model, path / "model.safetensors")
        extra = getattr(self.stage, "extra", None)
        if (extra is None) != (state.get("extra") is None):
            raise ValueError(
                f"{path} was written {'with' if state.get('extra') is not None else 'without'} a stage "
                f"head (e.g. grounding) and this run is configured {'with' if extra is not None else 'without'} one"
            )
        if extra is not None:
            extra.load_state_dict(state["extra"])
        if self._fsdp:
            sharding.load_full_optimizer_state(self._joint, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][ddp.rank])
        return state["step"], state["positions"][ddp.rank]

    # ---- metrics --------------------------------------------------------------------------------

    def _trim_metrics(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the curve has no duplicated steps."""
        if not self.metrics_path.exists():
            return
        keep = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line and json.loads(line)["step"] <= step
        ]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics_path)

    def _log(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- the loop -------------------------------------------------------------------------------

    def fit(self, resume: bool = True, stop_after: int | None = None) -> TrainResult:
        """Train to `config.steps` (resuming from the latest checkpoint when `resume`).

        `stop_after` ends the run early after that many steps *without* changing the schedule, the way a
        killed job would (used to test that resuming reproduces the uninterrupted run).
        """
        cfg = self.config
        # a stage may pin the precision: RL stages compare the policy's log-probs with ones recorded outside
        # the trainer (rollouts, a frozen reference) in fp32, and bf16 noise (~1e-3) exceeds GSPO's clip range
        device = model_device(self.model)
        precision = getattr(self.stage, "precision", None) or resolve_precision(
            cfg.precision, device
        )
        ddp = Distributed.setup()
        self._fsdp = cfg.fsdp and ddp.world > 1
        if self._fsdp and not getattr(self.stage, "fsdp_ready", False):
            raise sharding.ShardingError(
                f"stage {self.stage.name!r} cannot train under FSDP: its ranks do not run the "
                "same forward passes in lockstep (e.g. online rollouts of different lengths), which "
                "FSDP's per-layer all-gathers need; train it with DDP (without --fsdp)"
            )
        set_threads(cfg, ddp.world)
        torch.manual_seed(cfg.seed + ddp.rank)
        np.random.seed(cfg.seed + ddp.rank)
        random.seed(cfg.seed + ddp.rank)
        # master weights in fp32 whatever the checkpoint stored: from a bf16 checkpoint (the shipped ones) Adam's
        # steps of ~lr (1e-5..1e-4) fall below bf16's resolution (2^-8 of the weight) and are rounded away, so
        # RL and fine-tuning silently did nothing. bf16 remains the compute precision (autocast) when asked for.
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in self.model.parameters()):
            self.model.float()
        if hasattr(self.stage, "setup"):
            self.stage.setup(self.model)
        extra = getattr(self.stage, "extra", None)
        if ddp.world > 1:
            for t in [
                *self.model.state_dict().values(),
                *(extra.state_dict().values() if extra is not None else []),
            ]:
                dist.broadcast(t, src=0)
        overrides = {
            k: getattr(self.stage, k)
            for k in ("trainable", "component_lr", "param_filter", "lr_scale")
            if getattr(self.stage, k, None)
        }
        if self._fsdp:
            self._template = sharding.skeleton(self.model) if ddp.main else None
            sharding.shard(self.model)
            if extra is not None:
                self._joint = torch.nn.ModuleDict({"model": self.model, "extra": extra})
        optimizer = build_optimizer(self.model, cfg, overrides, extra)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        )
        step, position = 0, 0
        latest = self.latest_checkpoint() if resume else None
        if latest is not None:
            step, position = self._load(latest, optimizer, scheduler, ddp)
        if ddp.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if latest is not None:
                self._trim_metrics(step)
            elif self.metrics_path.exists():
                self.metrics_path.unlink()
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += [p for p in (extra.parameters() if extra is not None else []) if p.requires_grad]
        batches = self.stage.batches(position, ddp.rank, ddp.world)
        end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
        bar = tqdm(
            total=cfg.steps,
            initial=step,
            desc=self.stage.name,
            disable=not (cfg.progress and ddp.main),
            dynamic_ncols=True,
        )
        history: list[dict[str, float]] = []
        self.model.train()
        while step < end:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.accum_steps)]
            position = micro[-1][1]
            total_weight = torch.tensor(
                sum(self.stage.weight(b) for b, _ in micro), dtype=torch.float64
            )
            if ddp.world > 1:
                dist.all_reduce(total_weight)
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            loss_value = 0.0
            for batch, _ in micro:
                batch = to_device(batch, device)  # stages build batches on the CPU
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss, metrics = self.stage.loss(self.model, batch, float(total_weight))
                loss.backward()
                loss_value += float(loss.detach())
                for k, v in metrics.items():  # averaged over the micro-batches that report k
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
            grad_norm = self._sync_and_clip(params, ddp)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            stats = torch.tensor([loss_value, grad_norm], dtype=torch.float64)
            if ddp.world > 1:
                dist.all_reduce(stats)  # loss: the global loss is the sum of the ranks' shares
                stats[1] /= ddp.world
            record = {
                "step": step,
                "loss": float(stats[0]),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(stats[1]),
                "sec": time.perf_counter() - t0,
                "position": position,
                **{k: v / counts[k] for k, v in sums.items()},
            }
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if ddp.main and (step % cfg.log_every == 0 or step == end):
                self._log(record)
            if self.eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0:
                self._evaluate(step, ddp)
            if (cfg.save_every and step % cfg.save_every == 0) or step == end:
                self._save(step, position, optimizer, scheduler, ddp)
        bar.close()
        if hasattr(batches, "close"):
            batches.close()  # stops the data worker now rather than at garbage collection
        final_dir = self.out / "final"
        plain = None if self._fsdp else self.model
        if step >= cfg.steps:
            plain = self._plain_model()
            if ddp.main:
                tmp = self.out / ".tmp-final"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                self.save_model(plain, tmp)
                shutil.rmtree(final_dir, ignore_errors=True)
                os.rename(tmp, final_dir)
        if ddp.world > 1:
            dist.barrier()
        return TrainResult(step, final_dir, self.metrics_path, history, plain)

    def _sync_and_clip(self, params: list[torch.nn.Parameter], ddp: Distributed) -> float:
        """Sum gradients over ranks (one flat all-reduce; unused parameters count as zero), then clip.
        Under FSDP the sharded parameters' gradients arrive summed (reduce-scatter); the rest (a
        stage's extra head) are replicated and summed here."""
        if self._fsdp:
            return self._sync_and_clip_sharded(params, ddp)
        if ddp.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])  # [P] all trainable parameters
            dist.all_reduce(flat)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).clone()  # [n] → the parameter's shape
                offset += n
        if self.config.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip))
        norms = [p.grad.norm() for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _sync_and_clip_sharded(self, params: list[torch.nn.Parameter], ddp: Distributed) -> float:
        sharded = [p for p in params if isinstance(p, DTensor)]
        replicated = [p for p in params if not isinstance(p, DTensor)]
        if replicated:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in replicated]
            flat = torch.cat([g.reshape(-1) for g in grads])  # [P] the replicated parameters
            dist.all_reduce(flat)
            offset = 0
            for p in replicated:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()  # [n] → its shape
                offset += p.numel()
        # ‖g‖² = Σ over ranks of each rank's shard, plus the replicated parameters once
        local = [p.grad.to_local().double().pow(2).sum() for p in sharded if p.grad is not None]
        square = torch.stack(local).sum() if local else torch.zeros((), dtype=torch.float64)
        dist.all_reduce(square)
        for p in replicated:
            square = square + p.grad.double().pow(2).sum()
        norm = float(square.sqrt())
        if self.config.grad_clip > 0:
            coef = min(1.0, self.config.grad_clip / (norm + 1e-6))  # as nn.utils.clip_grad_norm_
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    def _evaluate(self, step: int, ddp: Distributed) -> None:
        if self._fsdp:  # every rank evaluates: the sharded layers gather their weights together
            self.model.eval()
            with torch.no_grad():
                result = self.eval_fn(self.model, step)
            self.model.train()
            if ddp.main:
                self._log({"step": step, "eval": result})
            dist.barrier()
            return
        if ddp.main:
            self.model.eval()
            with torch.no_grad():
                result = self.eval_fn(self.model, step)
            self.model.train()
            self._log({"step": step, "eval": result})
        if ddp.world > 1:
            dist.barrier()
