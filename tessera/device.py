"""Where and in what precision Tessera runs: one place that turns `--device` / `--dtype` into torch objects.

- `resolve_device("auto")` is CUDA when torch sees a GPU, else the CPU; `cpu`, `cuda` and `cuda:N` are taken
  as given and checked (CUDA asked for where there is none, or an index past the last GPU, fails loudly).
- `resolve_dtype("auto")` is None: keep the checkpoint's stored dtypes. `float32`/`fp32`, `bfloat16`/`bf16`
  and `float16`/`fp16` cast every floating-point tensor.
- `autocast(device)` is bf16 autocast on CUDA and a no-op on the CPU (CPU training has its own `--precision`).
- `add_device_arguments(parser)` adds `--device` and `--dtype` (and `--vision-device` where asked) to a
  command; `devices_from_args(args)` reads them back. Every command that runs a model uses these two.
- `to_device(obj, device)` moves the tensors inside a batch (dataclasses, dicts, lists, tuples) to a device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class DeviceError(ValueError):
    """A device or dtype string that cannot be used on this machine."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` (or a torch.device) → a torch.device that exists here."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    kind, _, index = spec.partition(":")
    if kind == "cpu" and not index:
        return torch.device("cpu")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {spec!r} asked for, but torch sees no CUDA GPU here "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            "use --device cpu or --device auto"
        )
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise DeviceError(
            f"device {spec!r} asked for, but this machine has {count} CUDA GPU(s) "
            f"(cuda:0 .. cuda:{count - 1})"
        )
    return torch.device(spec)


def resolve_dtype(spec: str | torch.dtype | None = "auto") -> torch.dtype | None:
    """A dtype name → torch.dtype; `auto` (or None) → None, meaning keep the stored dtypes."""
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    key = spec.strip().lower()
    if key not in DTYPES:
        raise DeviceError(f"unknown dtype {spec!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def autocast(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op context elsewhere."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(obj: Any, device: torch.device | str) -> Any:
    """`obj` with every tensor inside it (dataclass fields, dict values, list/tuple items) on `device`.

    Objects without tensors come back as they are; tensors already on `device` are not copied.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
        moved = {k: to_device(v, device) for k, v in fields.items()}
        changed = {k: v for k, v in moved.items() if v is not fields[k]}
        return dataclasses.replace(obj, **changed) if changed else obj
    if isinstance(obj, dict):
        moved = {k: to_device(v, device) for k, v in obj.items()}
        return obj if all(moved[k] is obj[k] for k in obj) else moved
    if isinstance(obj, (list, tuple)):
        items = [to_device(v, device) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*items)
        return type(obj)(items)
    return obj


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ---- the command-line flags ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Devices:
    """What `--device`, `--dtype` and `--vision-device` resolved to."""

    device: torch.device
    dtype: torch.dtype | None  # None: keep the stored dtypes
    vision_device: (
        torch.device
    )  # the vision workers' device (decoupled serving); `device` elsewhere


def add_device_arguments(p: argparse.ArgumentParser, vision: bool = False) -> None:
    """`--device` and `--dtype` (and `--vision-device` when `vision`) on a command's parser."""
    group = p.add_argument_group("device")
    group.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda|cuda:N",
        help="where the model runs (default auto: CUDA when present, else the CPU)",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="cast the weights (default auto: keep the checkpoint's stored dtypes)",
    )
    if vision:
        group.add_argument(
            "--vision-device",
            default=None,
            metavar="auto|cpu|cuda|cuda:N",
            help="decoupled serving: the vision workers' device (default: --device); "
            "--device is then the language server's",
        )


def devices_from_args(args: argparse.Namespace) -> Devices:
    """Resolve the flags `add_device_arguments` added; a bad or unavailable device raises DeviceError."""
    device = resolve_device(getattr(args, "device", "auto"))
    dtype = resolve_dtype(getattr(args, "dtype", "auto"))
    vision_spec = getattr(args, "vision_device", None)
    vision = resolve_device(vision_spec) if vision_spec else device
    return Devices(device, dtype, vision)
