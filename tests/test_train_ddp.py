"""Data parallelism under torchrun (2 processes, gloo): the ranks stay in sync and the loss equals that of one
process accumulating the same two per-rank batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_two_process_training_matches_accumulation(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
    ]
    done = subprocess.run(
        torchrun + [str(WORKER), "ddp", str(tmp_path / "ddp")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(WORKER), "single", str(tmp_path / "single")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    ref = json.loads((tmp_path / "single" / "result.json").read_text())
    assert (
        ddp["rank_checksums"][0] == ddp["rank_checksums"][1]
    )  # parameters identical on both ranks
    assert ddp["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert ddp["rank_checksums"][0] == pytest.approx(ref["rank_checksums"][0], rel=1e-5)
