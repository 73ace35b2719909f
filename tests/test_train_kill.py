"""A training process killed with SIGKILL and started again continues the exact same loss curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest


def command(out, cfg):
    return [
        sys.executable,
        "-m",
        "tessera.cli",
        "train",
        "sft",
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--steps",
        "8",
        "--save-every",
        "1",
        "--rows",
        "1",
        "--row-tokens",
        "384",
        "--no-progress",
        "--tokenizer-corpus",
        "20",
    ]


def losses(out):
    return [
        (r["step"], r["loss"])
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_curve(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(
        json.dumps(
            {
                "train": {"warmup_steps": 2, "log_every": 1, "precision": "fp32", "threads": 1},
                "data": {"workers": 1, "curriculum": [[0, 0.0]]},
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        command(tmp_path / "full", cfg), env=env, check=True, capture_output=True, timeout=600
    )
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command(killed, cfg), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline and not (
        latest.exists() and latest.read_text().strip() >= "step-000003"
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.read_text().strip() < "step-000008", "the run finished before it could be killed"
    subprocess.run(command(killed, cfg), env=env, check=True, capture_output=True, timeout=600)
    assert losses(killed) == losses(tmp_path / "full")
    assert [s for s, _ in losses(killed)] == list(range(1, 9))
