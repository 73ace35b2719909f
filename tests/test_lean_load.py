"""Lean loading: the safetensors files are memory-mapped straight into the parameters (no second copy), keys
are still checked strictly, and a 1B-shaped bf16 checkpoint loads within 1.3x its size and chats (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tessera.cli import main
from tessera.model.checkpoint import CheckpointError, load_checkpoint, read_weights


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("lean")
    assert (
        main(["init", "--preset", "tiny", "--out", str(out), "--seed", "2", "--dtype", "bfloat16"])
        == 0
    )
    return out


def test_mapped_tensors_equal_the_file_and_writes_stay_private(ckpt):
    mapped, loaded = read_weights(ckpt), load_file(str(ckpt / "model.safetensors"))
    assert mapped.keys() == loaded.keys()
    for k in loaded:
        assert mapped[k].dtype == loaded[k].dtype and torch.equal(mapped[k], loaded[k]), k
    before = (ckpt / "model.safetensors").read_bytes()
    model = load_checkpoint(ckpt)
    assert model.language_model.embed_tokens.weight.dtype is torch.bfloat16
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)  # copy-on-write: the parameters are writable and the file never changes
    assert (ckpt / "model.safetensors").read_bytes() == before
    again = load_checkpoint(ckpt, dtype=torch.float32)
    assert again.language_model.embed_tokens.weight.dtype is torch.float32
    assert torch.equal(
        again.language_model.embed_tokens.weight,
        loaded["language_model.model.embed_tokens.weight"].float(),
    )


def test_strict_keys_survive_lean_loading(ckpt, tmp_path):
    state = load_file(str(ckpt / "model.safetensors"))
    state.pop("language_model.model.norm.weight")
    state["language_model.extra"] = torch.zeros(2)
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match="missing keys: language_model.model.norm.weight.*unexpected keys: "
        "language_model.extra",
    ):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["short", "length", "json", "offsets"])
def test_a_damaged_file_is_named(ckpt, tmp_path, damage):
    data = (ckpt / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    if damage == "short":
        data = data[:5]
    elif damage == "length":
        data = (10**12).to_bytes(8, "little") + data[8:]
    elif damage == "json":
        data = data[:8] + b"{" * n + data[8 + n :]
    else:
        data = data[:-64]  # the last tensor's offsets now run past the end
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(tmp_path)


# the child loads and chats through the CLI, then reports its own peak RSS (ru_maxrss is in KiB on Linux)
CHILD = """
import json, resource, sys
from tessera.cli import main
code = main(["chat", sys.argv[1], "What is in the picture?", "--max-new-tokens", "3", "--device", "cpu",
             "--image", sys.argv[2]])
print(json.dumps({"code": code, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

# the same for the API: the language server (coupled vision) loads it on the CPU and answers one request;
SERVE_CHILD = """
import json, resource, sys
import httpx
from tessera.serve.language_server import ServeOptions
from tessera.serve.launch import LocalServer, Topology, build_server
# two KV-cache slots of 1024 positions (~0.2 GiB); the defaults (16 slots of the model's context) reserve far
# more than the weights; the ViT stays in its stored bf16 (the float32 default would copy it)
options = ServeOptions(max_batch=2, max_len=1024)
with LocalServer(build_server(sys.argv[1], Topology(device="cpu", vision_dtype="bfloat16"), options)) as s:
    body = {"model": "tessera", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(s.base_url + "/v1/chat/completions", json=body, timeout=600)
print(json.dumps({"status": r.status_code, "text": r.json()["choices"][0]["message"]["content"],
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _child(script: str, *argv: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_1b_bf16_checkpoint_loads_within_1_3x_its_size_chats_and_serves(tmp_path):
    out = tmp_path / "1b"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tessera.cli",
            "init",
            "--preset",
            "internvl3_5-1b",
            "--dtype",
            "bfloat16",
            "--out",
            str(out),
        ],
        check=True,
        timeout=900,
    )
    size = (out / "model.safetensors").stat().st_size
    assert size > 1.5e9  # really the 1B shape in bf16
    image = tmp_path / "red.png"
    Image.new("RGB", (448, 448), "red").save(image)  # one tile: the ViT's weights are read too
    report = _child(CHILD, str(out), str(image))
    assert report["code"] == 0
    assert report["peak"] <= 1.3 * size, (
        f"chat: peak RSS {report['peak'] / 2**30:.2f} GiB, file {size / 2**30:.2f} GiB"
    )
    served = _child(SERVE_CHILD, str(out))
    assert served["status"] == 200 and isinstance(served["text"], str)
    assert served["peak"] <= 1.3 * size, (
        f"serve: peak RSS {served['peak'] / 2**30:.2f} GiB, file {size / 2**30:.2f} GiB"
    )
