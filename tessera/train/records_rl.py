"""MPO on a user's preference pairs and GSPO on a user's prompts (tessera.data records → the RL
stages' inputs).

A record becomes a `tessera.answers.Query` keyed by where it came from (split = "file:line",
so keys never
collide with the world's seeds) and a `PreparedQuery` with its images encoded once (every tile at 1/4,
the prompt
built with placeholders in place: tessera.data.encode.prompt_ids). The stages then run unchanged:
MPO on
`PreferencePair`s whose answers are the pair's texts (+ `<|im_end|>`), scored by the frozen model as
its
reference; GSPO on the prompts, its rollouts scored by a reward (tessera.data.rewards, ≥ 0.5 =
correct).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tessera.answers import PreparedQuery, Query
from tessera.data.encode import prompt_ids
from tessera.data.records import PreferencePair as PairRecord
from tessera.data.records import PromptRecord
from tessera.data.rewards import resolve
from tessera.image import ImageProcessor
from tessera.train.conversations import scan_for
from tessera.train.mpo import PreferencePair

CONTEXT = 4096  # the scan's length bound for RL records; the model's positions cap it (scan_for)


def record_query(index: int, record, answer: str = "") -> Query:
    category = getattr(record, "category", "") or "data"
    thinking = answer.lstrip().startswith("<think>")
    return Query(
        index, category, record.question, answer, thinking, record.where or f"record:{index}"
    )


@torch.no_grad()
def prepare_records(
    model, queries: Sequence[Query], records: Sequence, keep_pixels: bool = False
) -> dict[tuple, PreparedQuery]:
    """query key → PreparedQuery for each record (its images tiled and encoded in eval mode)."""
    processor = ImageProcessor.from_config(model.config)
    was_training = model.training
    model.eval()
    out = {}
    try:
        for q, r in zip(queries, records):
            if r.images:
                pixels = processor(list(r.images))
                features, per_tile = model.encode_images(pixels.pixel_values)
                tiles, k, counts = pixels.pixel_values, 0, []
                for n in pixels.tiles_per_image:
                    counts.append(int(sum(per_tile[k : k + n])))
                    k += n
            else:
                size = model.config.tile_size
                tiles, features, counts = torch.zeros(0, 3, size, size), None, []
            prompt = prompt_ids(model.tokenizer, r.question, counts, thinking=q.thinking)
            kept = tiles if keep_pixels else tiles[:0]
            if features is None:
                features = torch.zeros(0, model.config.language.hidden_size)
            out[q.key()] = PreparedQuery(q, prompt, kept, features.detach(), counts)
    finally:
        model.train(was_training)
    return out


def mpo_inputs(model, path: str, skip_bad: bool = False, keep_pixels: bool = False):
    """(tessera.train.mpo.PreferencePair list, prepared, scan report) from an MMPR-style file."""
    report = scan_for(model, path, CONTEXT, kind="pair", skip_bad=skip_bad)
    records: list[PairRecord] = report.records
    tok = model.tokenizer
    queries = [record_query(i, r, r.chosen) for i, r in enumerate(records)]
    pairs = [
        PreferencePair(
            q,
            tok.encode(r.chosen) + [tok.im_end_id],
            tok.encode(r.rejected) + [tok.im_end_id],
            r.chosen,
            r.rejected,
        )
        for q, r in zip(queries, records)
    ]
    return pairs, prepare_records(model, queries, records, keep_pixels), report


def gspo_inputs(
    model, path: str, reward: str = "exact", skip_bad: bool = False, keep_pixels: bool = False
):
    """(queries, prepared, verifier, scan report) from a prompt file; the verifier applies
    `reward`."""
    report = scan_for(model, path, CONTEXT, kind="prompt", skip_bad=skip_bad)
    records: list[PromptRecord] = report.records
    queries = [record_query(i, r, r.answer) for i, r in enumerate(records)]
    return (
        queries,
        prepare_records(model, queries, records, keep_pixels),
        RewardVerifier(reward),
        report,
    )


class RewardVerifier:
    """The rollout's verifier (family, text, answer) → bool from a reward (tessera.data.rewards)."""

    def __init__(self, reward: str):
        self.name, self.reward = reward, resolve(reward)

    def __call__(self, family: str, text: str, answer: str) -> bool:
        return float(self.reward(text, answer)) >= 0.5
