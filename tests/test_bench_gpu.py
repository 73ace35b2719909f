"""`tessera bench gpu`: skips cleanly without CUDA; with --allow-cpu its checks really run (here, on the CPU)."""

import pytest
import torch

from tessera.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip of a machine without CUDA")
def test_without_a_gpu_it_skips_with_exit_0(capsys):
    assert main(["bench", "gpu"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "no CUDA GPU" in out and "PASS" not in out


def test_its_checks_run_and_report_on_the_cpu(tmp_path, capsys):
    argv = [
        "bench",
        "gpu",
        "--allow-cpu",
        "--device",
        "cpu",
        "--shapes",
        "tiny",
        "--checks",
        "chat,engine",
        "--new-tokens",
        "6",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PASS  tiny  chat" in out and "PASS  tiny  engine" in out and "tok/s" in out
    assert "3/3 passed" in out  # init, chat, engine


def test_a_failing_check_is_reported_and_fails_the_run(tmp_path, capsys, monkeypatch):
    from tessera.bench import gpu

    def broken(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu, "check_chat", broken)
    argv = [
        "bench",
        "gpu",
        "--allow-cpu",
        "--shapes",
        "tiny",
        "--checks",
        "chat",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL  tiny  chat" in out and "kernel exploded" in out and "failed: tiny/chat" in out


@pytest.mark.slow
def test_every_check_passes_on_the_cpu(tmp_path, capsys):
    assert main(["bench", "gpu", "--allow-cpu", "--shapes", "tiny", "--out", str(tmp_path)]) == 0
    assert "6/6 passed" in capsys.readouterr().out
