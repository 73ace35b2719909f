"""Checkpoint folders: config.json + model.safetensors (or a sharded index) + tokenizer.json.

`load_checkpoint` reads the tessera, official InternVL3.5 and transformers layouts (tessera.model.layouts
tells them apart from config.json) and loads strictly: every missing key, unexpected key and shape mismatch
is reported by name. Weights are read with safetensors only — never pickle.
`save_checkpoint(model, dir, layout=...)` writes any of the three; `convert` goes from one to another,
tensors copied bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tessera.chat import IMG_CONTEXT, has_qwen2_files, qwen2_tokenizer
from tessera.config import ConfigError, ModelConfig
from tessera.model import hf_export, layouts
from tessera.model.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

LAYOUTS = ("tessera", "official", "hf")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is: missing files, bad weights, key or shape mismatches."""


# ---- reading --------------------------------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint folder?)")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: must hold a JSON object, got {type(raw).__name__}")
    return raw


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{path / INDEX}: not a safetensors index with a weight_map ({e})"
            ) from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{path / INDEX} names shard(s) that do not exist: {', '.join(missing)}"
            )
        return [path / f for f in files]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = (
        f" (found {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)"
        if pickles
        else ""
    )
    raise CheckpointError(f"{path}: no {WEIGHTS} or {INDEX}{hint}")


def read_weight_names(path: Path) -> set[str]:
    names: set[str] = set()
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                names.update(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None
    return names


# safetensors dtype names → torch dtypes (https://github.com/huggingface/safetensors, the format's header)
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _mmap_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file as views of a copy-on-write memory map of it: nothing is read
    until a tensor is used, no second copy is made, and writing to a tensor never changes the file.

    The format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
    then the data; offsets are relative to the end of the header.
    """

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: not a valid safetensors file ({why})")

    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise bad(f"header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        data_size = size - 8 - n
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if data_size else None
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = (
                _ST_DTYPES[info["dtype"]],
                list(info["shape"]),
                info["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has an unreadable entry {info!r}") from None
        numel = math.prod(shape)
        if not 0 <= start <= end <= data_size or end - start != numel * dtype.itemsize:
            raise bad(
                f"tensor {name!r}: offsets {start}..{end} do not hold {shape} {info['dtype']}"
            )
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", UserWarning
            )  # a copy-on-write map is writable; torch need not warn
            flat = torch.frombuffer(
                mm, dtype=dtype, count=numel, offset=8 + n + start
            )  # [numel], in the map
        out[name] = flat.view(shape)
    return out


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s), on CPU, as stored: memory-mapped views of the files
    (copy-on-write), so reading costs no memory until the tensors are used and never doubles the weights."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            tensors = _mmap_safetensors(file)
        except OSError as e:
            raise CheckpointError(f"{file}: cannot be read ({e})") from None
        for name, tensor in tensors.items():
            if name in state:
                raise CheckpointError(f"tensor {name!r} appears in more than one shard")
            state[name] = tensor
    return state


def _img_context_id(path: Path) -> int | None:
    """The id of <IMG_CONTEXT> in the folder's tokenizer.json, if both exist."""
    file = path / TOKENIZER
    if not file.is_file():
        return qwen2_tokenizer(path).token_to_id(IMG_CONTEXT) if has_qwen2_files(path) else None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    for token in data.get("added_tokens") or []:
        if token.get("content") == "<IMG_CONTEXT>":
            return int(token["id"])
    vocab = (data.get("model") or {}).get("vocab")
    return vocab.get("<IMG_CONTEXT>") if isinstance(vocab, dict) else None


def load_config(path: str | Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, layout) of a checkpoint folder, without reading the tensors."""
    path = Path(path)
    raw = read_config(path)
    try:
        layout = layouts.detect_layout(raw)
        if layout == "tessera":
            return ModelConfig.from_dict(raw), layout
        keys = read_weight_names(path)
        if layout == "official":
            return layouts.official_to_config(raw, keys, _img_context_id(path)), layout
        return layouts.hf_to_config(raw, keys), layout
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None


def to_tessera_state(
    state: dict[str, torch.Tensor], layout: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tessera-named tensors, names with no tessera counterpart)."""
    if layout in ("tessera", "official"):
        return state, []
    return layouts.hf_to_tessera_keys(state)


def _expected(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Every state-dict entry the model needs (a tied LM head is the embedding, so it is not stored)."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.language.tie_word_embeddings:
        shapes.pop("language_model.lm_head.weight", None)
    return shapes


def _drop_tied_head(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """A tied model may still store its head (some exporters do); it must equal the embedding."""
    head = state.get("language_model.lm_head.weight")
    if head is None or not config.language.tie_word_embeddings:
        return
    embed = state.get("language_model.model.embed_tokens.weight")
    if embed is not None and (head.shape != embed.shape or not torch.equal(head, embed)):
        raise CheckpointError(
            "tie_word_embeddings is true but the stored LM head differs from embed_tokens "
            "(set tie_word_embeddings false in config.json if the head is separate)"
        )
    del state["language_model.lm_head.weight"]


def check_question_router(state: dict[str, torch.Tensor], config: ModelConfig, where: str) -> None:
    """The config and the weights must agree on the question-aware router (all of it or none of it)."""
    prefix = layouts.QUESTION_ROUTER_PREFIX
    stored = sum(k.startswith(prefix) for k in state)
    if config.flash.question_router and not stored:
        raise CheckpointError(
            f"{where}: the config says flash.question_router (Tessera's question-aware router) but the "
            f"weights hold no {prefix}* tensors; save the model again with its router, or set "
            "flash.question_router false to load it without one"
        )
    if stored and not config.flash.question_router:
        raise CheckpointError(
            f"{where}: the weights hold the question-aware router ({stored} {prefix}* tensors) but the "
            "config's flash.question_router is false; set it true (with flash.enabled) to load them"
        )


def check_state(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Size], unknown: list[str], where: str
) -> None:
    """Raise a CheckpointError listing missing keys, unexpected keys and shape mismatches, by name."""

    def listed(names):
        names = sorted(names)
        return ", ".join(names[:12]) + (
            f" ... (+{len(names) - 12} more)" if len(names) > 12 else ""
        )

    missing = set(expected) - set(state)
    unexpected = [*unknown, *(set(state) - set(expected))]
    shapes = [
        f"{k} {tuple(state[k].shape)} (model expects {tuple(expected[k])})"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listed(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {listed(shapes)}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: bool = True,
):
    """A VisionLanguageModel from a checkpoint folder in any layout, strictly.

    dtype None keeps the stored dtypes. The model is built on the meta device and its parameters become the
    memory-mapped tensors of the safetensors files themselves (on the CPU, as stored) or their casts/copies on
    `device`, one tensor at a time, so a large checkpoint is never held twice in memory. The tokenizer is attached when the folder
    has a tokenizer.json (and `tokenizer` is True).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config, layout = load_config(path)
    state, unknown = to_tessera_state(read_weights(path), layout)
    _drop_tied_head(state, config)
    check_question_router(state, config, f"{path} ({layout} layout)")
    with torch.device("meta"):
        model = VisionLanguageModel(config)
    check_state(state, _expected(model), unknown, f"{path} ({layout} layout)")
    for (
        k,
        v,
    ) in state.items():  # one tensor at a time: a cast or a move holds at most one extra tensor
        state[k] = v.to(
            device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.language_model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: tensors left unloaded: {', '.join(leftover[:12])}")
    model.eval()
    if tokenizer and ((path / TOKENIZER).is_file() or has_qwen2_files(path)):
        model.tokenizer = _load_tokenizer(path, config.template)
    return model


def _load_tokenizer(file: Path, template: str = "internvl2_5"):
    """tokenizer.json (a file, or a folder with one or with Qwen2's vocab.json + merges.txt)."""
    try:  # here, not at the top: weights load without the tokenizers package
        from tessera.chat import ChatTokenizer
    except ImportError:
        return None
    return ChatTokenizer.from_file(file, template=template)


# ---- writing --------------------------------------------------------------------------------------------


def tessera_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the state dict without a tied LM head, detached, contiguous, on CPU."""
    expected = _expected(model)
    return {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in expected
    }


def save_checkpoint(
    model: torch.nn.Module,
    path: str | Path,
    layout: str = "tessera",
    tokenizer_file: str | Path | None = None,
    drop_flash: bool = False,
) -> Path:
    """Write `model` as config.json + model.safetensors (+ tokenizer.json) in `layout` (tessera | official | hf).

    The tokenizer is copied from `tokenizer_file` when given, else saved from `model.tokenizer` when set. The hf
    and official layouts also get the files transformers and vLLM read (tessera.model.hf_export: tokenizer and
    processor configs, chat template, generation config; the official layout's configuration module).
    `drop_flash` (hf only): leave out the router and mlp2 (and the question-aware router), which transformers
    and vLLM do not have, and log one line saying so; without it a Flash model's hf folder keeps them under the
    InternvlFlash port's names (the question router, which not even that port has, under
    `model.question_router.*`, with a line saying that only Tessera reads it).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if drop_flash and layout != "hf":
        raise ValueError(
            f"drop_flash is for the hf layout; the {layout} layout holds the Flash model"
        )
    path = Path(path)
    state = tessera_state(model)
    config: ModelConfig = model.config
    if drop_flash:
        config, state, note = hf_export.strip_flash(config, state)
        if note:
            log.warning(note)
    elif layout != "tessera":
        note = hf_export.question_router_note(config, state, layout)
        if note:
            log.info(note)
    if layout == "tessera":
        raw, tensors = config.to_dict(), state
    elif layout == "official":
        raw, tensors = layouts.config_to_official(config), state
        raw["auto_map"] = hf_export.official_auto_map()
    else:
        raw, tensors = layouts.config_to_hf(config), layouts.tessera_to_hf_keys(state)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    if tokenizer_file is not None:
        if Path(tokenizer_file).resolve() != (path / TOKENIZER).resolve():
            shutil.copyfile(tokenizer_file, path / TOKENIZER)
    elif getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save(path / TOKENIZER)
    if layout != "tessera":
        tok = (
            _load_tokenizer(path / TOKENIZER, config.template)
            if (path / TOKENIZER).is_file()
            else None
        )
        hf_export.write_loader_files(path, config, tok, layout)
    return path


def convert(
    src: str | Path,
    dst: str | Path,
    to: str = "hf",
    dtype: torch.dtype | None = None,
    drop_flash: bool = False,
) -> Path:
    """Rewrite checkpoint `src` (any layout) as `dst` in layout `to` (hf | tessera | official): bit for bit, or
    cast to `dtype` (e.g. bfloat16 for a checkpoint half the size). `drop_flash`: see `save_checkpoint`."""
    if to not in LAYOUTS:
        raise ValueError(f"unknown target layout {to!r}; choose from {', '.join(LAYOUTS)}")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"source and destination are the same folder: {src}")
    tok = src / TOKENIZER
    model = load_checkpoint(src, dtype=dtype, tokenizer=not tok.is_file())  # Qwen2 files: rebuilt
    return save_checkpoint(
        model, dst, layout=to, tokenizer_file=tok if tok.is_file() else None, drop_flash=drop_flash
    )
