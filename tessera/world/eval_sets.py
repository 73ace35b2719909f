"""Fixed evaluation sets and scoring.

An evaluation set is a list of (seed, family) pairs in the `eval` split's seed range (disjoint from training
by construction, see tasks.SPLIT_OFFSETS), balanced over families: index i of family f uses seed
i·len(families) + position of f, so growing `n_per_family` only appends samples and sets for different family
lists never share a seed. Difficulty is always 1 (the full distribution).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tessera.world.tasks import FAMILIES, READING_FAMILIES, Sample, make_sample
from tessera.world.verify import verify


@dataclass(frozen=True)
class EvalItem:
    seed: int
    family: str
    split: str = "eval"

    def sample(self) -> Sample:
        return make_sample(self.seed, self.family, self.split)


def eval_items(
    n_per_family: int = 50, families: Sequence[str] = FAMILIES, split: str = "eval", offset: int = 0
) -> list[EvalItem]:
    """The fixed evaluation set: n_per_family items per family, interleaved by family."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown eval families {unknown}; choose from {', '.join(FAMILIES)}")
    if split == "train":
        raise ValueError(
            "evaluation sets come from the 'eval' or 'test' split, never from 'train' "
            "(a set for choosing settings on training seeds is `tuning_items`)"
        )
    return _items(n_per_family, families, split, offset)


def tuning_items(
    n_per_family: int = 50, families: Sequence[str] = FAMILIES, offset: int = 0
) -> list[EvalItem]:
    """A set laid out like `eval_items` but from the *train* split: where a benchmark chooses thresholds (on
    training seeds) before it reports on held-out ones."""
    return _items(n_per_family, families, "train", offset)


def _items(n_per_family: int, families: Sequence[str], split: str, offset: int) -> list[EvalItem]:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown eval families {unknown}; choose from {', '.join(FAMILIES)}")
    k = len(FAMILIES)
    return [
        EvalItem((offset + i) * k + FAMILIES.index(f), f, split)
        for i in range(n_per_family)
        for f in families
    ]


def eval_set(
    n_per_family: int = 50, families: Sequence[str] = FAMILIES, split: str = "eval", offset: int = 0
) -> list[Sample]:
    """The fixed evaluation set, rendered."""
    return [item.sample() for item in eval_items(n_per_family, families, split, offset)]


def score(results: Iterable[tuple[str, str, str]]) -> dict[str, float]:
    """Accuracy per family, plus `overall` (mean over families, so each family weighs the same), `reading`
    (mean over the reading families present) and `n`. `results` holds (family, prediction, answer)."""
    hits: dict[str, list[bool]] = {}
    for family, prediction, answer in results:
        hits.setdefault(family, []).append(verify(family, prediction, answer))
    if not hits:
        raise ValueError("no results to score")
    acc = {f: sum(h) / len(h) for f, h in hits.items()}
    out = dict(
        sorted(
            acc.items(),
            key=lambda kv: FAMILIES.index(kv[0]) if kv[0] in FAMILIES else len(FAMILIES),
        )
    )
    out["overall"] = sum(acc.values()) / len(acc)
    reading = [acc[f] for f in READING_FAMILIES if f in acc]
    if reading:
        out["reading"] = sum(reading) / len(reading)
    out["n"] = float(sum(len(h) for h in hits.values()))
    return out


def text_free_token_savings(
    samples: Iterable[Sample], full_tokens: int, compressed_tokens: int
) -> dict[str, float]:
    """What a question-agnostic router can save without ever compressing small text, on these samples.

    Reading answers need their text tile at full resolution (all-compressed reading is ~0 %), and a router that
    sees tiles but not the question cannot tell which text tile a question will read, so keeping every reading
    answer means keeping every text tile. Returns the fraction of visual tokens saved (Σ over the samples) when
    exactly the tiles without text go to 1/16 (`text_free`), and when every thumbnail goes too
    (`text_free_and_thumbnails`; the thumbnail carries the whole-canvas view that spatial and count read).
    """
    if not 0 < compressed_tokens <= full_tokens:
        raise ValueError(
            f"need 0 < compressed_tokens <= full_tokens, got {compressed_tokens}, {full_tokens}"
        )
    saved_per_tile = full_tokens - compressed_tokens
    total = text_free = thumbnails = 0
    for s in samples:
        cols, rows = s.meta["grid"]
        grid = cols * rows
        thumbnail = 1 if grid > 1 else 0  # the tiler adds one to every multi-tile image
        total += full_tokens * (grid + thumbnail)
        text_free += saved_per_tile * (grid - len(set(s.meta["text_tiles"])))
        thumbnails += saved_per_tile * thumbnail
    if not total:
        raise ValueError("no samples")
    return {
        "text_free": text_free / total,
        "text_free_and_thumbnails": (text_free + thumbnails) / total,
    }


def _tiles(sample: Sample) -> tuple[int, int | None]:
    """(tiles of the grid, the thumbnail's index or None): the tiler adds a thumbnail to multi-tile images."""
    cols, rows = sample.meta["grid"]
    grid = cols * rows
    return grid, (grid if grid > 1 else None)


def bound_oracle(sample: Sample) -> list[bool]:
    """The world bound's routing (`text_free_token_savings`): every tile without small text and the thumbnail
    at 1/16 — the most a question-blind router can compress without ever compressing text. Flags in tile order."""
    grid, thumb = _tiles(sample)
    text = set(sample.meta["text_tiles"])
    return [i == thumb or i not in text for i in range(grid + (thumb is not None))]


def evidence_oracle(sample: Sample) -> list[bool]:
    """A question-aware oracle: every tile but the question's evidence tiles and the thumbnail at 1/16."""
    grid, thumb = _tiles(sample)
    evidence = set(sample.meta["evidence_tiles"])
    return [i != thumb and i not in evidence for i in range(grid + (thumb is not None))]


ORACLES = {"bound oracle": bound_oracle, "evidence oracle": evidence_oracle}
