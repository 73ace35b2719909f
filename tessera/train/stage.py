"""What a training stage is, for the one trainer loop (tessera.train.trainer).

A stage answers three questions and nothing else:
  * `batches(position, rank, world)`: an endless iterator of `(batch, next_position)` starting at an integer
    stream position of this rank (what a checkpoint stores for an exact resume);
  * `weight(batch)`: the batch's share of the loss denominator (Σ of its token weights, or 1.0 for a stage whose
    loss is already a mean). The trainer sums it over every micro-batch of an optimiser step on every rank;
  * `loss(model, batch, normalizer)`: `(loss, metrics)` with the loss divided by that global `normalizer`, so the
    gradients of all micro-batches and ranks add up to the gradient of one big batch.
Optionally `trainable` (component → bool) and `component_lr` (component → lr) override the TrainConfig,
`setup(model)` runs once before the loop (e.g. to build a frozen reference model), and `extra` is a module the
stage trains beside the model (an auxiliary head: optimised as component "aux", saved in the trainer state, never
in the model's checkpoint). `param_filter` (parameter name → bool) keeps only the matching parameters trainable
(`tessera train --lora` sets it to the LoRA adapters'); `lr_scale` (parameter name → factor) multiplies
their learning rate (LoRA+ sets it for the adapters' B matrices). `fsdp_ready` True says every rank runs the
same forward passes of the model in each step, whatever its data, which FSDP needs (the Trainer refuses `fsdp`
otherwise).

Components are the model's parts, by top-level attribute: vision (vision_model), connector (mlp1, mlp2),
router (pooling_before_gating, gating: official Flash key names), language (language_model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from tessera.model.connector import shuffle_factor
from tessera.train.aux_losses import AuxiliaryLoss, ForwardView, world_aids
from tessera.train.data import Batch, Encoded, Packer, stream_batches
from tessera.train.grounding_losses import GroundingHeads
from tessera.train.losses import IGNORE, weighted_cross_entropy
from tessera.train.sharding import is_sharded

COMPONENTS = {
    "vision_model": "vision",
    "mlp1": "connector",
    "mlp2": "connector",
    "router": "router",
    "pooling_before_gating": "router",
    "gating": "router",
    "question_router": "router",
    "language_model": "language",
}


def component_of(param_name: str) -> str:
    """The component a parameter belongs to, from its top-level module name; unknown names fail loudly."""
    top = param_name.split(".", 1)[0]
    if top not in COMPONENTS:
        raise ValueError(
            f"parameter {param_name!r} belongs to no known component ({', '.join(sorted(COMPONENTS))})"
        )
    return COMPONENTS[top]


@runtime_checkable
class Stage(Protocol):
    """What the trainer needs of a stage. Optional attributes it also honours: `trainable` and `component_lr`
    (override the config's groups), `precision` (pin "fp32" or "bf16"), `setup(model)` (called once)."""

    name: str

    def batches(self, position: int, rank: int, world: int) -> Iterator[tuple[Any, int]]: ...

    def weight(self, batch: Any) -> float: ...

    def loss(
        self, model: torch.nn.Module, batch: Any, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class LanguageModelingStage:
    """Next-token cross-entropy with square averaging on packed samples (pretrain and SFT differ only in `make`),
    plus the auxiliary losses a recipe plugs in (`aux`, tessera.train.aux_losses; `extra` holds their heads).

    `make(i)` returns the Encoded sample at global stream index i; it runs in a worker process when
    `workers` > 0, so it must be picklable.
    """

    name: str
    make: Callable[[int], Encoded]
    rows: int
    row_tokens: int
    pad_id: int
    workers: int = 1
    trainable: dict[str, bool] = field(default_factory=dict)
    component_lr: dict[str, float] = field(default_factory=dict)
    aux: tuple[AuxiliaryLoss, ...] = ()  # the auxiliary losses, in the order they are added
    extra: torch.nn.Module | None = (
        None  # their heads (one module: the trainer optimises it as "aux")
    )
    scan_report: Any = None  # tessera.data.scan.ScanReport of a stage reading a user's file
    fsdp_ready: ClassVar[bool] = True  # every rank runs the same forward passes per step

    def batches(self, position: int, rank: int, world: int) -> Iterator[tuple[Batch, int]]:
        return stream_batches(
            self.make,
            Packer(self.rows, self.row_tokens, self.pad_id),
            position,
            rank,
            world,
            self.workers,
        )

    def weight(self, batch: Batch) -> float:
        return batch.weight_sum

    def loss(
        self, model: torch.nn.Module, batch: Batch, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return packed_lm_loss(model, batch, normalizer, aux=self.aux)


def lm_stage(name: str, model, stream, data) -> LanguageModelingStage:
    """A LanguageModelingStage over `stream` with the packing and worker options of `data` (PretrainData /
    SFTData) and the world's training aids it weighs (`world_aids`); their heads are created here, sized for the
    model's 1/4 tokens (with the place and count probes when the stage weighs them)."""
    head = None
    place, count = getattr(data, "place", 0.0), getattr(data, "count", 0.0)
    if data.grounding > 0 or place > 0 or count > 0:
        language = model.config.language
        head = GroundingHeads(
            model.config.vision.hidden_size,
            language.hidden_size,
            shuffle_factor(model.config.downsample_ratio) ** 2,
            fetched_width=language.num_heads * language.head_dim,
            place=place > 0,
            count=count > 0,
        )
    aux = world_aids(
        (head, data.grounding) if data.grounding > 0 else None,
        data.evidence_attention,
        tuple(data.evidence_heads),
        data.question_attention,
        (head.place, place) if place > 0 else None,
        (head.count, count) if count > 0 else None,
    )
    return LanguageModelingStage(
        name,
        stream,
        data.rows,
        data.row_tokens,
        model.tokenizer.pad_id,
        data.workers,
        aux=tuple(aux),
        extra=head,
    )


def packed_lm_loss(
    model: torch.nn.Module,
    batch: Batch,
    normalizer: float | None = None,
    grounding: tuple[torch.nn.Module, float] | None = None,
    evidence_attention: float = 0.0,
    evidence_heads: Sequence[int] = (0,),
    question_attention: float = 0.0,
    place: tuple[torch.nn.Module, float] | None = None,
    count: tuple[torch.nn.Module, float] | None = None,
    aux: Sequence[AuxiliaryLoss] = (),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's SFT loss: forward a packed batch (block-diagonal causal mask, per-sample positions) and take
    the square-averaged next-token cross-entropy — plus, for each auxiliary loss (tessera.train.aux_losses),
    its weight × its loss × the batch's share of the step (weight_sum / normalizer), so gradient accumulation and
    data parallelism weigh it like the language loss.

    The keyword options are the world's training aids (`world_aids` builds them; they come before `aux`):
    `grounding` = (head, weight) the dense grounding of the visual tokens; `evidence_attention` the attention
    grounding of `evidence_heads` of the language model's middle layer; `question_attention` the same loss one
    layer below, from the answer positions onto the question's words that name each piece of evidence;
    `place` / `count` = (head, weight) the probes on what the middle layer's heads fetched at spatial / counting
    answers (tessera.train.grounding_losses)."""
    aids = [
        *world_aids(
            grounding, evidence_attention, evidence_heads, question_attention, place, count
        ),
        *aux,
    ]
    grid = features = None  # a batch of text-only conversations has no tiles
    given = None  # the features the model is given
    if batch.pixel_values.numel():
        grid = model.vision_tokens(batch.pixel_values)  # [ΣN, h, w, Cv]
        features, _ = model.project(grid)  # [ΣT, D], every tile at 1/4
        given = features
    elif is_sharded(model):
        # FSDP: the other ranks' batches may have tiles, and the vision tower's all-gathers and
        # reduce-scatters are collective and must come in the same order on every rank: run it on
        # one blank tile and give the model none of its rows ([0, D]), which the model still ties
        # into its graph (loss and gradients unchanged)
        size = model.config.vision.image_size
        blank, _ = model.project(model.vision_tokens(torch.zeros(1, 3, size, size)))  # [t, D]
        given = blank[:0]  # [0, D]
    hooks = [h for aid in aids for h in aid.attach(model, batch)]
    try:
        logits = model(
            batch.input_ids,
            image_features=given,
            position_ids=batch.position_ids,
            attn_mask=batch.attn_mask(),
        )  # [B,L,V]
    finally:
        for hook in hooks:
            hook.remove()
    loss, metrics = weighted_cross_entropy(logits, batch.targets, batch.weights, normalizer)
    share = batch.weight_sum / normalizer if normalizer else 1.0
    router = model.language_model.aux_loss(
        batch.segment_ids > 0
    )  # MoE load balancing (None when dense)
    if router is not None:  # already weighted by router_aux_loss_coef
        loss = loss + share * router
        metrics["router_aux_loss"] = float(router.detach())
    view = ForwardView(grid, features)
    for aid in aids:
        out = aid(model, batch, view)
        if out is None:
            continue
        aid_loss, aid_metrics = out
        loss = loss + aid.weight * share * aid_loss
        metrics.update(aid_metrics)
    metrics["samples"] = float(batch.num_samples)
    metrics["tokens"] = float(batch.num_tokens)
    metrics["tiles"] = float(batch.pixel_values.shape[0])
    metrics.update(exact_match_by_family(logits, batch))
    return loss, metrics


@torch.no_grad()
def exact_match_by_family(logits: torch.Tensor, batch: Batch) -> dict[str, float]:
    """`em/<family>`: share of samples whose every answer token is the argmax (teacher-forced), a cheap
    running proxy for held-out accuracy that costs no generation."""
    ok = (logits.argmax(-1) == batch.targets) | (batch.targets == IGNORE)  # [B,L]
    hits: dict[str, list[bool]] = {}
    k = 0
    for b in range(ok.shape[0]):
        for seg in range(1, int(batch.segment_ids[b].max()) + 1):
            hits.setdefault(batch.families[k], []).append(
                bool(ok[b][batch.segment_ids[b] == seg].all())
            )
            k += 1
    return {f"em/{f}": sum(v) / len(v) for f, v in hits.items()}
