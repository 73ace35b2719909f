"""The curriculum knob: one number, `difficulty` in [0, 1], mapped to concrete scene settings.

Why a curriculum: the calibration (docs/DESIGN.md, "The world") measured that a tiny ViT trained end to end
does not learn to read small text at random positions in minutes, but reads it quickly at fixed positions.
The world already removes sub-patch position variance (every glyph sits at a fixed offset inside a 14 px
patch, see scenes.py); the curriculum removes the rest early on: few objects on a fixed slot lattice, the
document always in a tile's top-left corner, short codes and labels, few tiles. Difficulty 1 is the
evaluation distribution; evaluation and RL always use it.

Stages (piecewise, so a trainer can also think of three phases):
  d < 1/3   "fixed":    1–2 tiles, 1–3 objects on slots, 1-digit labels, 2–3 document entries of 2 digits
  d < 2/3   "growing":  ≤ 4 tiles, 2–4 objects placed freely, 2-digit labels, 2–4 entries of 3 digits
  d ≥ 2/3   "full":     ≤ 6 tiles, 2–6 objects, 2-digit labels, 4–8 entries in two columns, distractor documents
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Level:
    """Concrete scene settings for one difficulty."""

    difficulty: float
    max_tiles: int  # largest tile grid a canvas may have (the tiny preset allows 6)
    min_objects: int
    max_objects: int
    shape_sizes: tuple[int, ...]  # shape side in patch cells (14 px each)
    label_digits: int  # digits in a shape's label
    code_digits: int  # digits in a document code (≤ 3: an entry is a key and 3 glyph slots)
    min_entries: int  # entries in a document
    max_entries: int
    max_columns: int  # entries side by side in a document row
    slots: bool  # objects on a fixed 4-cell lattice and the document at its tile's top-left
    distractor_document: float  # chance that a scene for a non-document question still has a document
    max_same_kind: int  # at most this many shapes of one kind (bounds the count answers)

    @property
    def stage(self) -> str:
        return "fixed" if self.difficulty < 1 / 3 else "growing" if self.difficulty < 2 / 3 else "full"


def level(difficulty: float = 1.0) -> Level:
    """The scene settings at `difficulty` ∈ [0, 1] (1 = the evaluation distribution)."""
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must lie in [0, 1], got {difficulty}")
    d = float(difficulty)
    if d < 1 / 3:
        return Level(d, max_tiles=2, min_objects=1, max_objects=3, shape_sizes=(2,), label_digits=1, code_digits=2,
                     min_entries=2, max_entries=3, max_columns=1, slots=True, distractor_document=0.0, max_same_kind=2)
    if d < 2 / 3:
        return Level(d, max_tiles=4, min_objects=2, max_objects=4, shape_sizes=(2, 3), label_digits=2, code_digits=3,
                     min_entries=2, max_entries=4, max_columns=2, slots=False, distractor_document=0.25, max_same_kind=3)
    return Level(d, max_tiles=6, min_objects=2, max_objects=6, shape_sizes=(2, 3, 4), label_digits=2, code_digits=3,
                 min_entries=4, max_entries=8, max_columns=2, slots=False, distractor_document=0.5, max_same_kind=4)
