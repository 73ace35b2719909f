"""FSDP2 under 2 processes on gloo: the loss equals that of one process accumulating the same two
per-rank batches (the stages divide by the whole step's weight, so summed gradients are one big
batch's); the checkpoints gathered from the shards load in one process, strictly; a resume restores
the sharded optimizer state exactly; a rank with only text keeps in step with one that has images;
LoRA trains on the shards; a stage that cannot keep its ranks in lockstep is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import fsdp_worker
import pytest
import torch
import torch.multiprocessing as mp
from test_train import small_model

from tessera.model.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("fsdp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def max_difference(a: Path, b: Path, init) -> float:
    """Largest absolute difference between two checkpoints' tensors (both loaded strictly, in this
    process), over the tensors that training changed in `b`: a parameter no rank used (here the
    Flash branch and the router, which SFT does not call) gets a zero gradient under DDP and FSDP
    alike, so AdamW decays it, while one process skips a parameter without a gradient."""
    sa, sb = load_checkpoint(a).state_dict(), load_checkpoint(b).state_dict()
    assert sa.keys() == sb.keys()
    start = init().state_dict()
    changed = [k for k in sb if not torch.equal(sb[k], start[k])]
    assert {k.split(".")[0] for k in changed} >= {"vision_model", "mlp1", "language_model"}
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in changed)


def test_two_spawned_fsdp_ranks_match_one_process(tmp_path):
    """Fast: one ViT block, one decoder layer, 2 steps; rank 1's samples are text only; an auxiliary
    head (the stage's `extra`) trains replicated beside the shards."""
    options = ["tiny", "steps=2", "mixed", "extra"]
    mp.start_processes(
        fsdp_worker.spawned,
        args=(free_port(), "fsdp", tmp_path / "fsdp", options),
        nprocs=2,
        start_method="spawn",
    )
    torch.set_num_threads(1)
    fsdp_worker.main("single", tmp_path / "single", options)
    fsdp, one = result(tmp_path / "fsdp"), result(tmp_path / "single")
    assert fsdp["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert fsdp["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    assert len(fsdp["evals"]) == 2  # every rank evaluated (eval_every=1) and rank 0 logged
    assert fsdp["evals"] == pytest.approx(one["evals"], rel=1e-4, abs=1e-6)
    # the resumed run restored the sharded optimizer state: the same last step, bit for bit
    assert fsdp["resumed"] == pytest.approx(fsdp["losses"][1:], abs=1e-9)
    assert "cannot train under FSDP" in fsdp["refused"]
    assert max_difference(Path(fsdp["final"]), Path(one["final"]), fsdp_worker.tiny_model) < 1e-5
    resumed = Path(fsdp["resumed_final"])
    assert max_difference(resumed, Path(fsdp["final"]), fsdp_worker.tiny_model) == 0.0


@pytest.mark.slow
def test_torchrun_fsdp_matches_ddp_and_one_process(tmp_path):
    """torchrun, 2 processes, 3 steps each way: FSDP, DDP and one process; then LoRA under FSDP."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.getcwd()]),
    }

    def torchrun(*args):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(WORKER),
            *map(str, args),
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    def single(*args):
        done = subprocess.run(
            [sys.executable, str(WORKER), *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun("fsdp", tmp_path / "fsdp")
    torchrun("ddp", tmp_path / "ddp")
    single("single", tmp_path / "single")
    fsdp, ddp, one = (
        result(tmp_path / "fsdp"),
        result(tmp_path / "ddp"),
        result(tmp_path / "single"),
    )
    assert fsdp["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert ddp["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert fsdp["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    assert fsdp["resumed"] == pytest.approx(fsdp["losses"][2:], abs=1e-9)
    assert max_difference(Path(fsdp["final"]), Path(one["final"]), small_model) < 1e-5
    assert max_difference(Path(fsdp["final"]), Path(ddp["final"]), small_model) < 1e-5

    torchrun("fsdp", tmp_path / "lora_fsdp", "lora")
    single("single", tmp_path / "lora_one", "lora")
    lora, lora_one = result(tmp_path / "lora_fsdp"), result(tmp_path / "lora_one")
    assert lora["losses"] == pytest.approx(lora_one["losses"], rel=1e-5)
    final = Path(lora["final"])
    assert (
        final / "adapter" / "adapter_model.safetensors"
    ).exists()  # the LoraSaver wrote the adapter
    from safetensors.torch import load_file

    a, b = (
        load_file(str(final / "adapter" / "adapter_model.safetensors")),
        load_file(str(Path(lora_one["final"]) / "adapter" / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
