"""The curriculum knob: one number, `difficulty` in [0, 1], mapped to concrete scene settings.

Why a curriculum: the calibration (docs/DESIGN.md, "The world") measured that a tiny ViT trained end to end
does not learn to read small text at random positions in minutes, but reads it quickly at fixed positions.
The world removes sub-patch position variance for good (every glyph sits at a fixed offset inside a 14 px
patch, see scenes.py). What remains hard is *finding* the right text among several (which label, which
document entry). Lookup needs reading features before attention can learn to select, so the curriculum starts
with a single object and a single document entry (pure reading), one tile and fixed slots, and grows the
number of things to choose between with the difficulty. Measured with the world's probe (probe.py: ViT
4×192 + 2-layer reader, batch 32, lr 2e-4, one thread; 256 held-out full-difficulty documents, accuracy of
the whole 3-digit code):
  trained directly at difficulty 1 (letter keys*)             0.4 % at step 1,000
  hold 300 steps at 0, ramp to 1 over 400; colour keys, seed 1  3.5 % at 1,000, 42 % at 1,200, 79 % at 1,500
  the same, seed 0                                             38 % at 1,000 (mid-jump)
  the same with letter keys*, two seeds                        78 % / 2.3 % at 1,000
  the same at 4 tokens per tile (1/16), colour / letter keys*  0 % / 2 % at 1,000
  (* scenes.DOC_KEYS set to letters, drawn in KEY_INK; the world itself uses colour marks)
The lookup leaves its plateau suddenly and at a seed-dependent step (≈ 800–1,100 here): a trainer should hold
the low difficulties until the reading families leave their plateau, then ramp, and budget for the jump.

The mapping is continuous in the counts, so a trainer can ramp the difficulty linearly; `stage` names three
coarse phases for reports. Difficulty 1 is the evaluation distribution; evaluation and RL always use it.
  d = 0      1 tile, 1 object on a slot, 1 document entry at its tile's corner
  d = 0.5    ≤ 3 tiles, 1–3 objects placed freely, 1–3 entries
  d = 1      ≤ 6 tiles, 2–6 objects, 3–6 entries in one or two columns, distractor documents in half the scenes
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
    distractor_document: (
        float  # chance that a scene for a non-document question still has a document
    )
    max_same_kind: int  # at most this many shapes of one kind (bounds the count answers)

    @property
    def stage(self) -> str:
        return "fixed" if self.slots else "growing" if self.difficulty < 0.75 else "full"


def level(difficulty: float = 1.0) -> Level:
    """The scene settings at `difficulty` ∈ [0, 1] (1 = the evaluation distribution)."""
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must lie in [0, 1], got {difficulty}")
    d = float(difficulty)
    max_objects = 1 + round(5 * d)
    max_entries = 1 + round(5 * d)
    return Level(
        d,
        max_tiles=1 + round(5 * d),
        min_objects=1 if d < 0.75 else 2,
        max_objects=max_objects,
        shape_sizes=(2,) if d < 0.25 else (2, 3) if d < 0.75 else (2, 3, 4),
        label_digits=2,
        code_digits=3,
        min_entries=1 + round(2 * (d - 0.5) / 0.5) if d > 0.5 else 1,
        max_entries=max_entries,
        max_columns=1
        if max_entries <= 2
        else 2,  # one column holds at most 3 entries (scenes.MAX_ENTRY_ROWS)
        slots=d < 0.25,
        distractor_document=0.5 * d,
        max_same_kind=min(4, max_objects),
    )
