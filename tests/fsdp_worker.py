"""Helper for test_train_fsdp: `fsdp OUT [options]` / `ddp OUT` (under torchrun, 2 processes) or
`single OUT [options]` (one process accumulating the batches both ranks would see,
tests/ddp_worker.BothRanks).

fsdp: trains STEPS steps (into OUT/run), then the same steps cut after STEPS - 1 and resumed from
that checkpoint by a fresh model (OUT/cut), and checks that a stage which is not fsdp_ready is
refused. Options: `lora` trains peft LoRA adapters instead (OUT/lora, saved with the LoraSaver);
`mixed` gives rank 1 text-only samples (no tiles) while rank 0's have images; `extra` adds an
auxiliary loss with its own head (the stage's `extra`); `steps=N`; `tiny` uses one ViT block and
one decoder layer. Writes OUT/result.json (losses, grad norms, final folders).
`spawned` runs one rank of a 2-process gloo group started by torch.multiprocessing (the fast test)
instead of torchrun."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ddp_worker import BothRanks
from test_train import config, make_fake, small_model
from test_train_data import fake_sample

from tessera.config import preset
from tessera.model.vlm import VisionLanguageModel
from tessera.train.sharding import ShardingError
from tessera.train.stage import LanguageModelingStage
from tessera.train.trainer import Trainer


def make_mixed(i: int):
    """Odd stream indices (rank 1's in a 2-process run) are text only."""
    return fake_sample(
        i, prompt=3 + i % 5, answer=2 + i % 3, tiles=0 if i % 2 else 1 + i // 2 % 2, seed=7
    )


class FeatureProbe:
    """An auxiliary loss with its own head (the stage's `extra`, replicated beside the shards)."""

    name, weight = "probe", 0.5

    def __init__(self, head: torch.nn.Module):
        self.head = head

    def attach(self, model, batch) -> list:
        return []

    def __call__(self, model, batch, view):
        if view.features is None:
            return None
        loss = self.head(view.features).pow(2).mean()  # [ΣT, 1] → scalar
        return loss, {"probe": float(loss.detach())}


class NotReady(LanguageModelingStage):
    fsdp_ready = False


def stage(mode: str, mixed: bool = False, cls=None, extra: bool = False) -> LanguageModelingStage:
    cls = cls or (BothRanks if mode == "single" else LanguageModelingStage)
    st = cls("sft", make_mixed if mixed else make_fake, rows=2, row_tokens=80, pad_id=0, workers=0)
    if extra:
        torch.manual_seed(5)
        st.extra = torch.nn.Linear(preset("tiny").language.hidden_size, 1)
        st.aux = (FeatureProbe(st.extra),)
    return st


def run_config(mode: str, steps: int, **kw):
    # clipping on (max norm 0.5 is below the model's gradient norm): the sharded clip is checked too
    return config(
        steps=steps,
        accum_steps=2 if mode == "single" else 1,
        grad_clip=0.5,
        save_every=1,
        fsdp=mode == "fsdp",
        **kw,
    )


def probe(model, step: int) -> dict:
    """An evaluation (every rank runs it under FSDP): the mean logit on a fixed text."""
    ids = torch.arange(20, 40)[None]  # [1, 20]
    return {"mean_logit": float(model(ids).double().mean())}


def tiny_model(seed: int = 0):
    model_config = preset("tiny")
    model_config.vision.num_layers, model_config.language.num_layers = 1, 1
    torch.manual_seed(seed)
    return VisionLanguageModel(model_config)


def spawned(rank: int, port: int, mode: str, out: Path, options: list[str]) -> None:
    """One rank of a 2-process gloo group (torch.multiprocessing.start_processes calls this)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    main(mode, out, options)


def checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def main(mode: str, out: Path, options: list[str]) -> None:
    steps = next((int(o.split("=", 1)[1]) for o in options if o.startswith("steps=")), 3)
    mixed, extra = "mixed" in options, "extra" in options
    new_model = tiny_model if "tiny" in options else small_model
    result: dict = {}
    if "lora" in options:
        from tessera.train.lora import LoraOptions, LoraSaver, apply_lora, is_lora_param

        model = new_model()
        lora = LoraOptions(rank=4, alpha=8.0)
        apply_lora(model, lora)
        st = stage(mode, mixed, extra=extra)
        st.param_filter = is_lora_param
        done = Trainer(
            model, st, run_config(mode, steps), out / "run", save_model=LoraSaver(lora, None)
        ).fit()
    else:
        cfg = run_config(mode, steps, eval_every=1)
        done = Trainer(
            new_model(), stage(mode, mixed, extra=extra), cfg, out / "run", eval_fn=probe
        ).fit()
        lines = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        result["evals"] = [x["eval"]["mean_logit"] for x in lines if "eval" in x]
    result["losses"] = [r["loss"] for r in done.history]
    result["grad_norms"] = [r["grad_norm"] for r in done.history]
    result["final"] = str(done.final_dir)
    result["plain_checksum"] = checksum(done.model) if done.model is not None else None
    if (
        mode == "fsdp" and "lora" not in options
    ):  # killed one step early, then resumed by a fresh model
        Trainer(
            new_model(), stage(mode, mixed, extra=extra), run_config(mode, steps), out / "cut"
        ).fit(stop_after=steps - 1)
        resumed = Trainer(
            new_model(seed=9), stage(mode, mixed, extra=extra), run_config(mode, steps), out / "cut"
        ).fit()
        result["resumed"] = [r["loss"] for r in resumed.history]
        result["resumed_final"] = str(resumed.final_dir)
        try:
            Trainer(
                new_model(), stage(mode, cls=NotReady), run_config(mode, steps), out / "refused"
            ).fit()
        except ShardingError as e:
            result["refused"] = str(e)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
