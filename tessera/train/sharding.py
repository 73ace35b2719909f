"""FSDP2 for the trainer (`TrainConfig.fsdp`, `tessera train ... --fsdp` under torchrun).

`shard(model)` applies `torch.distributed.fsdp.fully_shard` to every ViT block and every decoder
layer, then to the root, which keeps what is left (patch and position embeddings, the connectors,
the router, the token embedding, the final norm and the LM head). The stages call more of the model
than `forward` (`vision_tokens`, `project`, `encode_images`, `embed`), so those methods are
registered as FSDP forward methods: each of them gathers the root's parameters for its call (and
again for its backward), whichever of them a stage calls first. Gradients are summed over the
ranks, not averaged (the stages divide the loss by the whole step's weight on every rank,
tessera.train.stage), and a parameter one rank did not use (an expert no token chose, the Flash
branch of a model trained without it) still joins the reduction with a zero gradient — as under DDP,
where unused parameters count as zero (and AdamW then decays them, while one process skips a
parameter without a gradient). A rank whose batch has no tiles runs the vision tower on a blank tile
anyway (tessera.train.stage.packed_lm_loss), so every rank all-gathers the same layers in order.

Checkpoints stay in the usual layout: `full_state(model)` gathers the whole state dict onto the CPU
of rank 0, `fill(skeleton(model), state)` turns it into a plain module there for the usual savers;
`load_full_state` puts a full state dict back into the shards. The optimizer state is gathered and
scattered the same way (torch.distributed.checkpoint.state_dict).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

# methods of the VisionLanguageModel a stage may call directly; they use the root's own parameters
ROOT_METHODS = ("vision_tokens", "vision_patch_tokens", "project", "encode_images", "embed")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class ShardingError(ValueError):
    """A model or stage that FSDP cannot shard."""


def blocks(model: nn.Module) -> list[nn.Module]:
    """The ViT blocks then the decoder layers: one FSDP unit each."""
    try:
        vision = list(model.vision_model.encoder.layers)
        language = list(model.language_model.model.layers)
    except AttributeError as e:
        raise ShardingError(
            f"FSDP shards a VisionLanguageModel (ViT blocks and decoder layers); "
            f"{type(model).__name__} has no {e.name!r}"
        ) from None
    return [*vision, *language]


def shard(model: nn.Module) -> nn.Module:
    """Shard `model` in place over the default process group (every rank must call this)."""
    units = blocks(model)
    for block in units:
        fully_shard(block)
    fully_shard(model)
    for name in ROOT_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(
                1.0
            )  # sum over ranks: the loss is already a share of the step
            module.set_force_sum_reduction_for_comms(
                True
            )  # a plain SUM (gloo has no pre-multiplied sum)
    model.set_reduce_scatter_unused_params(
        True
    )  # unused on one rank → a zero gradient there, not a hang
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` on the meta device (no memory), with its attributes (config, tokenizer,
    adapters)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def fill(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain module: a copy of the meta `template` holding the full `state`'s tensors (strict)."""
    model = copy.deepcopy(template)
    tied = _aliases(model)
    model.load_state_dict(state, strict=True, assign=True)
    for name, canonical in tied.items():  # assign=True gives each name its own tensor: tie again
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_parameter(canonical))
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ShardingError(f"the gathered state left parameters unloaded: {leftover[:5]}")
    return model


def _aliases(model: nn.Module) -> dict[str, str]:
    """name → the first name of the same Parameter, for each parameter aliasing another (tied)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def complete(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the keys a file may omit, as aliases of another (tied) parameter, filled in."""
    state = dict(state)
    for name, canonical in _aliases(model).items():
        if name not in state and canonical in state:
            state[name] = state[canonical]
        elif canonical not in state and name in state:
            state[canonical] = state[name]
    return state


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on rank 0's CPU ({} on the other ranks); a collective. Every tensor owns
    its storage (a gathered tensor may be a view into a bigger buffer, which safetensors refuses to
    save)."""
    state = get_model_state_dict(model, options=_FULL)
    return {
        k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
        for k, v in state.items()
    }


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Scatter a full state dict (every rank passes it) into the shards, strictly."""
    set_model_state_dict(
        model, complete(model, state), options=StateDictOptions(full_state_dict=True)
    )


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, whole, on rank 0's CPU; a collective."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Scatter a full optimizer state (every rank passes it) into the shards, strictly."""
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
