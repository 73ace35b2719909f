"""tessera.device: --device / --dtype parsing, the errors, autocast, batches moved to a device, and every
command taking the flags."""

import argparse
import dataclasses
import importlib

import pytest
import torch

from tessera.cli import COMMANDS, main
from tessera.device import (
    DeviceError,
    add_device_arguments,
    autocast,
    devices_from_args,
    resolve_device,
    resolve_dtype,
    to_device,
)

no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the error of a machine without CUDA"
)


def parse(argv, vision=False):
    p = argparse.ArgumentParser()
    add_device_arguments(p, vision=vision)
    return devices_from_args(p.parse_args(argv))


def test_auto_is_cuda_when_present_else_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert parse([]).device.type == want


def test_cpu_and_dtype_names():
    d = parse(["--device", "cpu", "--dtype", "bf16"])
    assert (
        d.device == torch.device("cpu")
        and d.dtype is torch.bfloat16
        and d.vision_device == d.device
    )
    assert parse(["--dtype", "auto"]).dtype is None  # keep the stored dtypes
    assert resolve_dtype("float16") is torch.float16 and resolve_dtype("FP32") is torch.float32
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:0", "tpu", "cuda:-1", ""])
def test_a_bad_device_string_is_an_error(bad):
    if bad == "":
        assert resolve_device(bad) == resolve_device("auto")  # empty means auto
        return
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device(bad)


def test_a_bad_dtype_is_an_error():
    with pytest.raises(DeviceError, match="unknown dtype"):
        resolve_dtype("int8")
    p = argparse.ArgumentParser()
    add_device_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "float64"])


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_says_so(spec):
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device(spec)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        parse(["--device", "cpu", "--vision-device", spec], vision=True)


def test_vision_device_defaults_to_device():
    d = parse(["--device", "cpu"], vision=True)
    assert d.vision_device == torch.device("cpu")


def test_autocast_is_a_noop_on_cpu():
    a = torch.randn(4, 4)
    with autocast("cpu"):
        assert (
            a @ a
        ).dtype is torch.float32  # the CPU keeps fp32 (its bf16 is the trainer's --precision)


@dataclasses.dataclass
class Batch:
    ids: torch.Tensor
    extra: dict
    n: int


def test_to_device_walks_batches_and_keeps_untouched_objects():
    b = Batch(torch.ones(2), {"m": [torch.zeros(1), 3]}, 5)
    assert to_device(b, "cpu") is b  # nothing moved: the very same object
    moved = to_device(b, "meta")
    assert (
        moved.ids.is_meta
        and moved.extra["m"][0].is_meta
        and moved.extra["m"][1] == 3
        and moved.n == 5
    )
    assert not b.ids.is_meta  # the original is left alone


MODEL_COMMANDS = ["chat", "eval", "serve", "vision-server", "train", "recipe", "critic", "bench"]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_model_command_takes_device_and_dtype(command):
    p = argparse.ArgumentParser()
    importlib.import_module(f"tessera.commands.{COMMANDS[command][0]}").add_arguments(p)
    if (
        command == "bench"
    ):  # the flags belong to each benchmark's own parser (see the CLI test below)
        return
    options = {o for a in p._actions for o in a.option_strings}
    assert {"--device", "--dtype"} <= options
    if command == "serve":
        assert "--vision-device" in options


@no_cuda
def test_cli_reports_cuda_without_cuda_and_runs_on_cpu(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["init", "--preset", "tiny", "--out", str(ckpt), "--seed", "1"]) == 0
    assert main(["chat", str(ckpt), "hi", "--max-new-tokens", "2", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert (
        main(
            ["chat", str(ckpt), "hi", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "bf16"]
        )
        == 0
    )
    assert main(["eval", str(ckpt), "--n", "2", "--device", "nope"]) == 2
    assert "unknown device" in capsys.readouterr().err
    # a CPU-only benchmark refuses a GPU it was explicitly given
    assert main(["bench", "preprocess", "--device", "cuda"]) == 2
