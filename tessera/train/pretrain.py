"""Stage `pretrain`: dense scene descriptions (the world's `describe` samples), every component trained.

InternVL3.5's native pre-training learns vision and language jointly on captions and documents; here the
caption is the world's exhaustive description (background, each shape with its label and position, every
document line), which teaches the ViT to see colours, shapes and small text before any question is asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.seeds import PRETRAIN_SEED_OFFSET
from tessera.train import dataclass_from
from tessera.train.data import Curriculum, WorldStream
from tessera.train.stage import LanguageModelingStage, lm_stage

SEED_OFFSET = PRETRAIN_SEED_OFFSET  # tessera.seeds: the layout of the train split's seeds


@dataclass
class PretrainData:
    rows: int = 8  # packed rows per micro-batch
    row_tokens: int = 512
    curriculum: tuple[tuple[int, float], ...] = ((0, 1.0),)
    workers: int = 1
    grounding: float = 0.0  # weight of the dense grounding loss on the visual tokens (tessera.train.grounding_losses)
    evidence_attention: float = (
        0.0  # weight of the attention grounding loss (tessera.train.grounding_losses)
    )
    evidence_heads: tuple[int, ...] = (
        0,
    )  # the middle layer's heads it supervises (one per key/value group: more bandwidth)
    question_attention: float = (
        0.0  # the same heads one layer below onto the question's words naming the evidence
    )
    families: dict[str, float] = field(default_factory=lambda: {"describe": 1.0})


def build_stage(model, data: PretrainData | dict | None = None) -> LanguageModelingStage:
    """The pretrain stage for `model` (which carries the tokenizer and config)."""
    data = dataclass_from(PretrainData, data)
    stream = WorldStream(
        model.tokenizer,
        model.config,
        families=dict(data.families),
        thinking_prob=0.0,
        curriculum=Curriculum(tuple(data.curriculum)),
        seed=SEED_OFFSET,
        grounding=data.grounding > 0 or data.evidence_attention > 0 or data.question_attention > 0,
    )
    return lm_stage("pretrain", model, stream, data)
