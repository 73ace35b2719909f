"""Stage `sft`: the world's questions, with and without thinking.

Every question family is asked with thinking off (the prompt is prefilled with an empty think block, as
InternVL3.5 does); the reasoning family additionally appears in thinking mode with its worked `<think>` chain,
so the model learns both ways to answer and `--thinking` works at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.seeds import SFT_SEED_OFFSET
from tessera.train import dataclass_from
from tessera.train.conversations import file_stream
from tessera.train.data import Curriculum, WorldStream
from tessera.train.stage import LanguageModelingStage, lm_stage
from tessera.world import FAMILIES

SEED_OFFSET = SFT_SEED_OFFSET  # tessera.seeds: the layout of the train split's seeds


def default_families() -> dict[str, float]:
    return dict.fromkeys(FAMILIES, 1.0)


@dataclass
class SFTData:
    rows: int = 8
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
    place: float = 0.0  # weight of the place probe at spatial answers (tessera.train.grounding_losses.place_loss)
    count: float = 0.0  # weight of the count probe at counting answers (tessera.train.grounding_losses.count_loss)
    count_sink: bool = False  # counts' evidence: anchors and a sink (WorldStream.count_sink; the count probe needs it)
    chain_evidence: bool = (
        False  # ground the numbers thinking chains read off the image too (evidence attention)
    )
    families: dict[str, float] = field(default_factory=default_families)
    thinking_prob: float = 0.5  # share of reasoning questions asked in thinking mode
    turns: int = 1  # questions per image (multi-turn conversations; one ViT pass serves them all)
    repeat: tuple[
        str, ...
    ] = ()  # families asked more than once per image (tessera.train.data.WorldStream.repeat)
    # a user's data instead of the world: an InternVL meta JSON or a .jsonl / .json / .parquet file
    data: str | None = None
    skip_bad_records: bool = (
        False  # drop (and count) bad records instead of stopping before training
    )
    shuffle: bool = True  # a fresh seeded order of the records each epoch (False: file order)
    seed: int = 0  # the shuffle's seed


WORLD_ONLY = ("grounding", "evidence_attention", "question_attention", "place", "count")


def build_stage(model, data: SFTData | dict | None = None) -> LanguageModelingStage:
    data = dataclass_from(SFTData, data)
    if data.data is not None:
        return file_stage(model, data)
    if data.count > 0 and not data.count_sink:
        raise ValueError(
            "the count probe reads counting answers, which only count_sink marks: set count_sink too"
        )
    needs_scene = (
        data.grounding > 0
        or data.evidence_attention > 0
        or data.question_attention > 0
        or data.place > 0
        or data.count > 0
    )
    stream = WorldStream(
        model.tokenizer,
        model.config,
        families=dict(data.families),
        thinking_prob=data.thinking_prob,
        curriculum=Curriculum(tuple(data.curriculum)),
        seed=SEED_OFFSET,
        turns=data.turns,
        repeat=tuple(data.repeat),
        chain_evidence=data.chain_evidence,
        grounding=needs_scene,
        count_sink=data.count_sink,
    )
    return lm_stage("sft", model, stream, data)


def file_stage(model, data: SFTData) -> LanguageModelingStage:
    """Next-token loss with square averaging on the conversations of `data.data` (scanned first)."""
    aids = [name for name in WORLD_ONLY if getattr(data, name) > 0]
    if aids:
        raise ValueError(
            f"{', '.join(aids)} read the world's scenes; a --data file has none (set them to 0)"
        )
    stream, report = file_stream(
        model, data.data, data.row_tokens, data.skip_bad_records, data.seed, data.shuffle
    )
    stage = lm_stage("sft", model, stream, data)
    stage.scan_report = report
    return stage
