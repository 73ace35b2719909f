"""LoRA on any training stage, with peft: adapters injected into the model's Linear layers, and
optionally a few small modules trained in full beside them; only those train.

`apply_lora(model, LoraOptions)` wraps the chosen Linear layers (language model by default; vision
and connector optional) in peft's LoRA layers, in place, and the `train_modules` (e.g. the ViT's
embeddings, which hold the position table no adapter can wrap, or norms) in peft's
ModulesToSaveWrapper, which trains a copy. Parameter names keep their component prefix, so the
trainer's groups and learning rates apply. `save_adapter(model, dir, base)` writes the adapter
(`adapter_config.json` + `adapter_model.safetensors`: the LoRA tensors and the train modules'
copies) with the base checkpoint it belongs to; `merge_into(model)` folds every adapter into its
base weight (W + B·A·alpha/r, or alpha/sqrt(r) with rsLoRA), puts each trained copy in place of its
original and removes the wrappers, leaving a plain model that every checkpoint saver writes
(`tessera merge RUN --out CKPT`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file

ADAPTER_DIR = "adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# component → top-level modules, and the Linear layers LoRA wraps there by default (by name suffix)
PREFIXES = {
    "language": ("language_model",),
    "vision": ("vision_model",),
    "connector": ("mlp1", "mlp2"),
}
DEFAULT_MODULES = {
    "language": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "vision": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    "connector": (),
}  # () = every Linear of the component


@dataclass
class LoraOptions:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    components: tuple[str, ...] = ("language",)
    modules: tuple[str, ...] = ()  # Linear name suffixes to wrap; () = each component's defaults
    # module name suffixes trained in full beside the adapters (peft's modules_to_save): saved with
    # the adapter, copied in by merge_into
    train_modules: tuple[str, ...] = ()
    rslora: bool = False  # scale the adapters by alpha/sqrt(rank) instead of alpha/rank
    plus_ratio: float = 1.0  # LoRA+: lora_B learns at this multiple of the learning rate

    def __post_init__(self) -> None:
        self.components, self.modules = tuple(self.components), tuple(self.modules)
        self.train_modules = tuple(self.train_modules)
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or self.plus_ratio <= 0:
            raise ValueError(
                f"LoRA needs rank >= 1, alpha > 0, 0 <= dropout < 1, plus ratio > 0 "
                f"(got {self.rank}, {self.alpha}, {self.dropout}, {self.plus_ratio})"
            )
        unknown = sorted(set(self.components) - set(PREFIXES))
        if unknown or not self.components:
            raise ValueError(
                f"unknown LoRA component(s) {unknown}; choose from {', '.join(PREFIXES)}"
            )


def target_names(model: torch.nn.Module, options: LoraOptions) -> list[str]:
    """The full names of the Linear layers LoRA wraps; ValueError when a choice matches none."""
    names = []
    for comp in options.components:
        suffixes = options.modules or DEFAULT_MODULES[comp]
        found = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and n.split(".", 1)[0] in PREFIXES[comp]
            and (not suffixes or any(n == s or n.endswith("." + s) for s in suffixes))
        ]
        if not found:
            raise ValueError(f"LoRA on {comp}: no Linear layer matches {list(suffixes) or 'any'}")
        names += found
    return names


def full_names(model: torch.nn.Module, options: LoraOptions, targets: list[str]) -> list[str]:
    """The full names of the modules `options.train_modules` trains in full; ValueError when a
    suffix matches none, when a module holds a LoRA target, or when it shares a weight with a
    module outside it (a tied embedding would come untied)."""
    modules = dict(model.named_modules())
    names = []
    for suffix in options.train_modules:
        found = [n for n in modules if n and (n == suffix or n.endswith("." + suffix))]
        if not found:
            raise ValueError(f"LoRA train module {suffix!r} matches no module of the model")
        names += [n for n in found if n not in names]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only
    for name in names:
        inside = [t for t in targets if t == name or t.startswith(name + ".")]
        if inside:
            raise ValueError(
                f"LoRA train module {name} holds LoRA target(s) {inside[:3]}; "
                "train it in full or adapt it, not both"
            )
        own = {p.data_ptr() for p in modules[name].parameters()}
        shared = [
            n
            for n, p in model.named_parameters(remove_duplicate=False)
            if p.data_ptr() in own and not n.startswith(name + ".")
        ]
        if shared:
            raise ValueError(
                f"LoRA train module {name} shares weights with {shared[:2]} "
                "(tied); training a copy would untie them"
            )
    return names


def apply_lora(model: torch.nn.Module, options: LoraOptions) -> list[str]:
    """Wrap the target layers in place (and the train modules in peft's ModulesToSaveWrapper);
    returns the target names. Only `is_lora_param` parameters should train."""
    if any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in model.modules()):
        raise ValueError("the model already carries LoRA adapters")
    names = target_names(model, options)
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=names,
        modules_to_save=full_names(model, options, names) or None,
        use_rslora=options.rslora,
        bias="none",
    )
    inject_adapter_in_model(config, model)
    return names


def is_lora_param(name: str) -> bool:
    """An adapter's parameter or a train module's (trainable) copy: what a LoRA run trains."""
    return ".lora_" in name or ".modules_to_save." in name


def lr_scale(options: LoraOptions):
    """The trainer's `lr_scale` (parameter name → learning-rate factor) for LoRA+, or None."""
    if options.plus_ratio == 1:
        return None
    return lambda name: options.plus_ratio if ".lora_B." in name else 1.0


def lora_share(model: torch.nn.Module) -> tuple[int, int]:
    """(trained parameters: adapters + train modules' copies, all parameters)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for n, p in model.named_parameters() if is_lora_param(n)), total


def save_adapter(
    model: torch.nn.Module, out: str | Path, options: LoraOptions, base: str | None
) -> Path:
    """`out/adapter_config.json` (options, wrapped layers, base checkpoint) +
    `out/adapter_model.safetensors`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    targets = sorted(
        {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    )
    saved = sorted(n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))
    (out / CONFIG_FILE).write_text(
        json.dumps(
            {
                "base": base,
                "options": asdict(options),
                "targets": targets,
                "train_modules": saved,
                "peft_type": "LORA",
            },
            indent=2,
        )
        + "\n"
    )
    return out


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path} holds no LoRA adapter ({CONFIG_FILE})")
    return json.loads((path / CONFIG_FILE).read_text()), load_file(str(path / WEIGHTS_FILE))


def load_adapter(model: torch.nn.Module, path: str | Path) -> dict:
    """Inject the adapter at `path` into `model` (its base) and load its weights; returns its
    config."""
    config, state = read_adapter(path)
    options = LoraOptions(**{k: v for k, v in config["options"].items()})
    apply_lora(model, options)
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    missing = [k for k in getattr(result, "missing_keys", []) if is_lora_param(k)]
    if unexpected or missing:
        raise ValueError(
            f"{path} does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return config


def merge_into(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA adapter into its base Linear and put the plain Linear back, and put each
    train module's trained copy in place of its original (in place)."""
    wrapped = [
        (n, m) for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))
    ]
    for name, module in wrapped:
        if isinstance(module, ModulesToSaveWrapper):
            plain = module.modules_to_save[module.active_adapters[0]]
        else:
            module.merge()
            plain = module.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain)
    return model


@dataclass
class LoraSaver:
    """The trainer's `save_model` for a LoRA run: the wrapped model's full state (so a resume finds
    the adapters
    where it left them) and, beside it, the adapter alone in `adapter/`."""

    options: LoraOptions
    base: str | None

    def __call__(self, model: torch.nn.Module, path: Path) -> None:
        from safetensors.torch import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_model(model, str(path / "model.safetensors"), metadata={"format": "pt"})
        save_adapter(model, path / ADAPTER_DIR, self.options, self.base)
