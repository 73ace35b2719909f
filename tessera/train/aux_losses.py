"""Auxiliary losses: what a recipe adds to a stage's next-token loss, through one small interface.

An `AuxiliaryLoss` has a `name`, a `weight`, optionally a `module` (a probe head: the trainer
optimises it as
component "aux" and keeps it out of the model's checkpoint), `attach(model, batch)` registering the
forward hooks
that capture what it reads (returning their handles), and `__call__(model, batch, view)` returning
`(loss, metrics)` — or None when the batch holds nothing for it. `view` is what the forward saw: the
ViT grid
and the projected features. `tessera.train.stage.packed_lm_loss` adds weight × share × loss for each
one, share
being the batch's part of the step's loss weight (so accumulation and data parallelism weigh it like
the
language loss).

The world's training aids (tessera.train.grounding_losses) are the implementations here: dense grounding of
the visual
tokens, evidence and question attention, and the place and count probes; `world_aids(...)` builds
the list the
world's recipe asks for. A stage on other data passes none and is the paper's SFT: next-token loss
with square
averaging.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from tessera.train.grounding_losses import (
    count_loss,
    evidence_attention_loss,
    place_loss,
    two_level_grounding_loss,
)


@dataclass
class ForwardView:
    grid: torch.Tensor | None  # [ΣN, h, w, Cv] ViT output (None: no tiles in the batch)
    features: torch.Tensor | None  # [ΣT, D] every tile at 1/4


@runtime_checkable
class AuxiliaryLoss(Protocol):
    name: str
    weight: float

    def attach(self, model, batch) -> list: ...

    def __call__(
        self, model, batch, view: ForwardView
    ) -> tuple[torch.Tensor, dict[str, float]] | None: ...


def _middle(model) -> int:
    return len(model.language_model.model.layers) // 2


@dataclass
class AttentionGrounding:
    """Evidence attention on `heads` of the middle layer (`below` = 0), or — `below` = 1, `words` —
    the same heads
    one layer below pulled from the answer positions onto the question's words naming each piece of
    evidence."""

    name: str
    weight: float
    heads: tuple[int, ...] = (0,)
    below: int = 0
    words: bool = False
    module: Any = None
    _captured: dict = field(default_factory=dict, repr=False)

    def evidence(self, batch) -> list:
        if not self.words:
            return list(batch.evidence)
        return [
            dataclasses.replace(e, keys=e.words, sink=None)
            for e in batch.evidence
            if e.words and all(e.words)
        ]

    def attach(self, model, batch) -> list:
        self._captured.clear()
        if not self.evidence(batch):
            return []
        layer = model.language_model.model.layers[_middle(model) - self.below]

        def keep_inputs(module, args, out) -> None:  # returns None: the output is left as it is
            self._captured["args"] = args

        return [layer.self_attn.register_forward_hook(keep_inputs)]

    def __call__(self, model, batch, view: ForwardView):
        evidence = self.evidence(batch)
        if not evidence:
            return None
        x, cos, sin, _, mask = self._captured.pop("args")
        attn = model.language_model.model.layers[_middle(model) - self.below].self_attn
        return evidence_attention_loss(
            attn, x, cos, sin, mask, evidence, self.heads, name=self.name
        )


@dataclass
class HeadProbe:
    """A linear probe (`module`) on what the middle layer's heads fetched (o_proj's input) at the
    answers it
    reads (`read`: tessera.train.grounding_losses.place_loss or count_loss)."""

    name: str
    weight: float
    module: Any
    read: Any
    _fetched: list = field(default_factory=list, repr=False)

    def attach(self, model, batch) -> list:
        self._fetched.clear()
        o_proj = model.language_model.model.layers[_middle(model)].self_attn.o_proj
        return [
            o_proj.register_forward_hook(lambda module, args, out: self._fetched.append(args[0]))
        ]

    def __call__(self, model, batch, view: ForwardView):
        return self.read(self.module, self._fetched.pop(0), batch.evidence)  # [B, L, H·hd]


@dataclass
class DenseGrounding:
    """The two-level dense grounding loss of the visual tokens (the ViT grid and the projected
    features)."""

    weight: float
    module: Any
    name: str = "grounding"

    def attach(self, model, batch) -> list:
        if batch.grounding is None:
            raise ValueError(
                f"grounding weight {self.weight} but the samples carry no grounding targets "
                "(WorldStream(grounding=True) makes them)"
            )
        return []

    def __call__(self, model, batch, view: ForwardView):
        return two_level_grounding_loss(
            self.module, view.grid, view.features, batch.grounding, model.config.downsample_ratio
        )


def world_aids(
    grounding: tuple[Any, float] | None = None,
    evidence_attention: float = 0.0,
    evidence_heads: Sequence[int] = (0,),
    question_attention: float = 0.0,
    place: tuple[Any, float] | None = None,
    count: tuple[Any, float] | None = None,
) -> list[AuxiliaryLoss]:
    """The world recipe's aids, in the order they are added: evidence and question attention, the
    place and
    count probes, dense grounding. (head, weight) pairs for those with a head; weight 0 / None
    leaves one out."""
    aids: list[AuxiliaryLoss] = []
    if evidence_attention > 0:
        aids.append(
            AttentionGrounding("evidence_attention", evidence_attention, tuple(evidence_heads))
        )
    if question_attention > 0:
        aids.append(
            AttentionGrounding(
                "question_attention", question_attention, tuple(evidence_heads), below=1, words=True
            )
        )
    if place is not None:
        aids.append(HeadProbe("place", place[1], place[0], place_loss))
    if count is not None:
        aids.append(HeadProbe("count", count[1], count[0], count_loss))
    if grounding is not None:
        aids.append(DenseGrounding(grounding[1], grounding[0]))
    return aids
