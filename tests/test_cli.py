"""The `tessera` command end to end: init → chat, errors, and the CLI's structure."""

import subprocess
import sys

import pytest
from PIL import Image

from tessera.cli import COMMANDS, main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "1"]) == 0
    return out


def test_init_then_chat_answers_about_an_image(ckpt, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (300, 120), "red").save(image)
    assert main(["chat", str(ckpt), "--image", str(image), "hi", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    # 300x120 at 112 px tiles → a 3x1 grid + thumbnail = 4 tiles of 16 tokens
    assert "[4 tiles, 0 compressed, 64 visual tokens]" in err


def test_chat_reports_a_bad_image_clearly(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    assert main(["chat", str(ckpt), "--image", str(bad), "hi"]) == 2
    assert "error:" in capsys.readouterr().err


def test_init_is_seeded(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    main(["init", "--out", str(a), "--seed", "3"])
    main(["init", "--out", str(b), "--seed", "3"])
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_every_command_has_help():
    for name in COMMANDS:
        result = subprocess.run(
            [sys.executable, "-m", "tessera.cli", name, "-h"], capture_output=True, text=True
        )
        assert result.returncode == 0, (name, result.stderr)
        assert "usage: tessera" in result.stdout
