"""Question families over the world's scenes: questions, exact answers, worked thinking chains, descriptions.

Families (FAMILIES, all evaluated; answers are one word or one number so a tiny LM can write them):
  colour     "What colour is the triangle?"                         → red
  shape      "What shape is the red object?"                         → circle
  count      "How many circles are there?" / "... blue shapes ..."   → 2
  label      "What is the label of the red circle?"                  → 47         (reading, small text)
  document   "In the document, what is the number after the red mark?" → 482      (reading, dense text)
  spatial    "Is the red circle left or right of the blue square?"   → left
  reasoning  label ± a count, or the sum of two labels, with a worked `<think>` chain → 50
plus `describe` (not evaluated): a dense description of the whole scene, the `pretrain` stage's caption.

Seeds: a sample is a pure function of (seed, family, split, difficulty). Splits live in disjoint seed ranges
(SPLIT_OFFSETS); with `family=None` the family is drawn from the seed, and the sample equals the one made
with that family named explicitly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from tessera.seeds import SPLIT_OFFSETS
from tessera.world.curriculum import Level, level
from tessera.world.scenes import COLOURS, SHAPES, Scene, Shape, layout, render

FAMILIES = ["colour", "shape", "count", "label", "document", "spatial", "reasoning"]
READING_FAMILIES = ["label", "document"]  # the ones that need small text at full resolution
DESCRIBE = "describe"
ALL_FAMILIES = FAMILIES + [DESCRIBE]
SEEDS_PER_SPLIT = 10**9
MAX_ATTEMPTS = 200
MIN_SHAPES = {"spatial": 2}  # families that need more shapes than the curriculum level may give


@dataclass
class Sample:
    """One image with one question. `thinking_answer` is the whole assistant text in thinking mode,
    `<think>\\n…\\n</think>\\n\\n{answer}` (reasoning family only; None elsewhere). `meta` is JSON-serialisable:
    seed, split, difficulty, stage, grid (cols, rows), size (w, h), text_tiles (tiles with small text) and
    evidence_tiles (tiles holding what the answer depends on), both as row-major tile indices."""

    image: Image.Image
    question: str
    answer: str
    family: str
    thinking_answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    scene: Scene | None = None  # what was drawn (for dense grounding targets); not serialised


@dataclass(frozen=True)
class Lookup:
    """What an answer is read from, for attention grounding: one group per thing the answer looks up (a spatial
    question's two objects, a sum's two labels), each with the (x, y) cells that show it and the question's words
    (consecutive) that name it; `coarse` when the answer compares where things are, so the evidence is their
    tokens on the view of the whole canvas — the thumbnail's, or the only tile's (a tile's tokens do not know
    which tile they are in). `chain`: the numbers a thinking chain reads off the image, (text, group) each.
    `counted`: (group, anchors) for each group whose answer is how many things there are — one cell per thing,
    its top-left (the cell the grounding targets mark as its anchor), none for the answer 0; the group's `cells`
    are still every cell of the things (tessera.train.data.WorldStream.count_sink picks which a loss uses)."""

    cells: tuple[tuple[tuple[int, int], ...], ...] = ()
    names: tuple[tuple[str, ...], ...] = ()
    coarse: bool = False
    chain: tuple[
        tuple[str, int], ...
    ] = ()  # the worked chain's numbers read off the image: (text, group), in order
    counted: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = ()

    def to_meta(self) -> dict[str, Any]:
        return {
            "cells": [[list(c) for c in group] for group in self.cells],
            "names": [list(w) for w in self.names],
            "coarse": self.coarse,
            "chain": [list(read) for read in self.chain],
            "counted": [[g, [list(c) for c in anchors]] for g, anchors in self.counted],
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Lookup:
        return cls(
            tuple(tuple(tuple(c) for c in group) for group in meta["cells"]),
            tuple(tuple(w) for w in meta["names"]),
            bool(meta["coarse"]),
            tuple((text, int(group)) for text, group in meta["chain"]),
            tuple(
                (int(g), tuple(tuple(c) for c in anchors)) for g, anchors in meta.get("counted", ())
            ),
        )


@dataclass(frozen=True)
class _Task:
    question: str
    answer: str
    think: str | None  # the worked chain (inside the think block), if any
    evidence: tuple[int, ...]  # tiles
    lookup: Lookup = Lookup()  # what the answer is read from (attention grounding)


def _plural(n: int, noun: str) -> str:
    return (
        f"{n} {noun}" if n == 1 else f"{n} {noun[:-1]}ies" if noun.endswith("y") else f"{n} {noun}s"
    )


def _tiles(scene: Scene, shapes: list[Shape], labels: bool = False) -> tuple[int, ...]:
    tiles = {t for s in shapes for t in scene.shape_tiles(s)}
    if labels:
        tiles |= {scene.tile_of(*s.label_cell) for s in shapes}
    return tuple(sorted(tiles))


def _block(*shapes: Shape) -> tuple[tuple[int, int], ...]:
    """Every cell of the shapes' blocks."""
    return tuple((s.x + i, s.y + j) for s in shapes for j in range(s.size) for i in range(s.size))


def _anchors(*shapes: Shape) -> tuple[tuple[int, int], ...]:
    """One cell per shape, its top-left: what a counting lookup attends to (a block's other cells would weigh a
    big shape more than a small one)."""
    return tuple((s.x, s.y) for s in shapes)


def label_question(name: str) -> str:
    """The label family's question about the shape called `name` ("red circle"); thinking chains' claims
    (tessera.world.claims) are re-asked in exactly these words."""
    return f"What is the label of the {name}?"


def count_question(kind: str) -> str:
    return f"How many {kind}s are there?"


# ---- the families: each returns None when the scene cannot support the question ---------------------


def _colour(rng: random.Random, scene: Scene, lv: Level) -> _Task | None:
    unique = [s for s in scene.shapes if scene.count(kind=s.kind) == 1]
    if not unique:
        return None
    s = rng.choice(unique)
    return _Task(
        f"What colour is the {s.kind}?",
        s.colour,
        None,
        _tiles(scene, [s]),
        Lookup((_block(s),), ((s.kind,),)),
    )


def _shape(rng: random.Random, scene: Scene, lv: Level) -> _Task | None:
    unique = [s for s in scene.shapes if scene.count(colour=s.colour) == 1]
    if not unique:
        return None
    s = rng.choice(unique)
    return _Task(
        f"What shape is the {s.colour} object?",
        s.kind,
        None,
        _tiles(scene, [s]),
        Lookup((_block(s),), ((s.colour,),)),
    )


def _count(rng: random.Random, scene: Scene, lv: Level) -> _Task | None:
    r = rng.random()
    if r < 0.5:  # a kind, sometimes one that is absent (answer 0) so the model must look
        kind = rng.choice(SHAPES if rng.random() < 0.2 else sorted({s.kind for s in scene.shapes}))
        hits = [s for s in scene.shapes if s.kind == kind]
        question, names = count_question(kind), ((f"{kind}s",),)
    elif r < 0.8:
        colour = rng.choice(sorted({s.colour for s in scene.shapes}))
        hits = [s for s in scene.shapes if s.colour == colour]
        question, names = f"How many {colour} shapes are there?", ((colour,),)
    else:
        hits = list(scene.shapes)
        question, names = "How many shapes are there?", ((),)
    counted = ((0, _anchors(*hits)),)
    return _Task(
        question,
        str(len(hits)),
        None,
        _tiles(scene, hits),
        Lookup((_block(*hits),), names, counted=counted)
        if hits
        else Lookup(((),), counted=counted),
    )


def _label(rng: random.Random, scene: Scene, lv: Level) -> _Task | None:
    s = rng.choice(scene.shapes)
    return _Task(
        label_question(s.name),
        s.label,
        None,
        _tiles(scene, [s], labels=True),
        Lookup(((s.label_cell,),), ((s.colour, s.kind),)),
    )


def _document(rng: random.Random, scene: Scene, lv: Level) -> _Task | None:
    doc = scene.document
    if doc is None:
        return None
    key = rng.choice(doc.keys)
    x, y = doc.cell(doc.keys.index(key))
    return _Task(
        f"In the document, what is the number after the {key} mark?",
        doc.code_for(key),
        None,
        (scene.tile_of(doc.x, doc.y),),
        Lookup((((x, y), (x + 1, y)),), ((key,),)),
    )


def _spatial(rng: random.Random, scene: Scene, lv: Level) -> _Task | None:
    pairs = []
    for a in scene.shapes:
        for b in scene.shapes:
            if a is b:
                continue
            dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
            # 28 px (two cells) between centres: an unambiguous relation even in the thumbnail
            if abs(dx) >= 28:
                pairs.append((a, b, "left or right of", "left" if dx < 0 else "right"))
            if abs(dy) >= 28:
                pairs.append((a, b, "above or below", "above" if dy < 0 else "below"))
    if not pairs:
        return None
    a, b, axis, answer = rng.choice(pairs)
    return _Task(
        f"Is the {a.name} {axis} the {b.name}?",
        answer,
        None,
        _tiles(scene, [a, b]),
        Lookup((_block(a), _block(b)), ((a.colour, a.kind), (b.colour, b.kind)), coarse=True),
    )


def worked_sum(a: int, b: int, op: str) -> str:
    """The column arithmetic of a chain, units first, then the result: "47 + 85: 7 + 5 = 12, 4 + 8 + 1 = 13,
    so 47 + 85 = 132." / "47 - 9: 17 - 9 = 8, 4 - 0 - 1 = 3, so 47 - 9 = 38." (a >= b for "-").

    A small model that reads the digits well still adds whole numbers badly when it must write the sum's first
    digit before it has looked at the units (80 % of greedy chains got the sum wrong in a probe,
    docs/log/2026-11-24-notes-4.md); one column at a time, each step is a one-digit fact plus a carry it has just written."""
    if op not in ("+", "-") or a < 0 or b < 0 or (op == "-" and a < b):
        raise ValueError(f"no worked sum for {a} {op} {b}")
    da, db = str(a)[::-1], str(b)[::-1]  # units first
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        if op == "+":
            value = x + y + carry
            steps.append(f"{x} + {y}{' + 1' if carry else ''} = {value}")
            carry = value // 10
        else:
            borrow = x - y - carry < 0
            top = x + 10 if borrow else x
            steps.append(f"{top} - {y}{' - 1' if carry else ''} = {top - y - carry}")
            carry = int(borrow)
    result = a + b if op == "+" else a - b
    return f"{a} {op} {b}: {', '.join(steps)}, so {a} {op} {b} = {result}."


def _reasoning(rng: random.Random, scene: Scene, lv: Level) -> _Task | None:
    if not scene.shapes:
        return None
    s = rng.choice(scene.shapes)
    label = int(s.label)
    others = [o for o in scene.shapes if o is not s]
    variant = rng.choice(["plus", "minus", "sum"] if others else ["plus", "minus"])
    if variant == "sum":
        o = rng.choice(others)
        value = label + int(o.label)
        chain = (
            f"The {s.name} is labelled {s.label}. The {o.name} is labelled {o.label}. "
            f"{worked_sum(label, int(o.label), '+')}"
        )
        return _Task(
            f"What is the sum of the labels of the {s.name} and the {o.name}?",
            str(value),
            chain,
            _tiles(scene, [s, o], labels=True),
            Lookup(
                ((s.label_cell,), (o.label_cell,)),
                ((s.colour, s.kind), (o.colour, o.kind)),
                chain=((s.label, 0), (o.label, 1)),
            ),
        )
    kind = rng.choice(sorted({o.kind for o in scene.shapes}))
    n = scene.count(kind=kind)
    if variant == "minus" and label < n:
        variant = "plus"  # answers stay non-negative
    value = label + n if variant == "plus" else label - n
    op = "+" if variant == "plus" else "-"
    verb = "is" if n == 1 else "are"
    chain = f"The {s.name} is labelled {s.label}. There {verb} {_plural(n, kind)}. {worked_sum(label, n, op)}"
    hits = [o for o in scene.shapes if o.kind == kind]
    return _Task(
        f"What is the label of the {s.name} {variant} the number of {kind}s?",
        str(value),
        chain,
        _tiles(scene, [s] + hits, labels=True),
        Lookup(
            ((s.label_cell,), _block(*hits)),
            ((s.colour, s.kind), (f"{kind}s",)),
            chain=((s.label, 0), (str(n), 1)),
            counted=((1, _anchors(*hits)),),
        ),
    )


def _position(scene: Scene, s: Shape) -> str:
    """Coarse position of a shape's centre: thirds of the canvas on each axis."""
    w, h = scene.size
    cx, cy = s.centre
    v = ("top", "middle", "bottom")[min(2, int(3 * cy / h))]
    u = ("left", "centre", "right")[min(2, int(3 * cx / w))]
    return "centre" if (v, u) == ("middle", "centre") else f"{v} {u}"


def describe(scene: Scene) -> str:
    """A dense description: background, every shape with its label and position, every document line."""
    parts = [f"A {scene.background} background."]
    for s in scene.shapes:
        article = "An" if s.name[0] in "aeiou" else "A"
        parts.append(f"{article} {s.name} labelled {s.label} at the {_position(scene, s)}.")
    if scene.document is not None:
        doc = scene.document
        entries = ", ".join(f"{k} {c}" for k, c in zip(doc.keys, doc.codes))  # "red 482, blue 105"
        parts.append(f"A document with {_plural(len(doc.keys), 'entry')}: {entries}.")
    return " ".join(parts)


def _describe(rng: random.Random, scene: Scene, lv: Level) -> _Task | None:
    tiles = {t for s in scene.shapes for t in scene.shape_tiles(s)} | set(scene.text_tiles())
    return _Task("Describe the image.", describe(scene), None, tuple(sorted(tiles)))


_FAMILY_FNS: dict[str, Callable[[random.Random, Scene, Level], _Task | None]] = {
    "colour": _colour,
    "shape": _shape,
    "count": _count,
    "label": _label,
    "document": _document,
    "spatial": _spatial,
    "reasoning": _reasoning,
    DESCRIBE: _describe,
}


# ---- sampling -------------------------------------------------------------------------------------


def global_seed(seed: int, split: str) -> int:
    """The split's seed range: train [0, 1e9), eval [1e9, 2e9), test [2e9, 3e9)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLIT_OFFSETS)}")
    if not 0 <= seed < SEEDS_PER_SPLIT:
        raise ValueError(
            f"seed must lie in [0, {SEEDS_PER_SPLIT}) (splits own disjoint seed ranges), got {seed}"
        )
    return SPLIT_OFFSETS[split] + seed


def pick_family(seed: int, split: str = "train") -> str:
    """The family `make_sample(seed, family=None, split)` uses: uniform over FAMILIES, fixed by the seed."""
    return FAMILIES[random.Random(global_seed(seed, split) * 64 + 63).randrange(len(FAMILIES))]


def build(
    seed: int, family: str | None = None, split: str = "train", difficulty: float = 1.0
) -> tuple[Scene, _Task, str, dict[str, Any]]:
    """The scene and question for a seed, without rendering (fast: used by corpus())."""
    family = pick_family(seed, split) if family is None else family
    if family not in _FAMILY_FNS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(ALL_FAMILIES)}")
    g = global_seed(seed, split)
    lv = level(difficulty)
    rng = random.Random(g * 64 + ALL_FAMILIES.index(family))
    fn = _FAMILY_FNS[family]
    for _ in range(MAX_ATTEMPTS):
        doc = family == "document" or rng.random() < lv.distractor_document
        scene = layout(rng, lv, document=doc, min_shapes=MIN_SHAPES.get(family, 1))
        task = (
            fn(rng, scene, lv) if scene.shapes else None
        )  # every family refers to at least one shape
        if task is not None:
            break
    else:
        raise RuntimeError(
            f"no {family} question fits {MAX_ATTEMPTS} scenes for seed {seed} ({split}, difficulty "
            f"{difficulty}); the family's preconditions and the curriculum level disagree"
        )
    meta = {
        "seed": seed,
        "split": split,
        "difficulty": difficulty,
        "stage": lv.stage,
        "grid": [scene.cols, scene.rows],
        "size": list(scene.size),
        "text_tiles": scene.text_tiles(),
        "evidence_tiles": list(task.evidence),
        "lookup": task.lookup.to_meta(),
    }
    return scene, task, family, meta


def thinking_text(chain: str, answer: str) -> str:
    """The assistant text in thinking mode (InternVL3.5 / Qwen3 format)."""
    return f"<think>\n{chain}\n</think>\n\n{answer}"


def make_sample(
    seed: int, family: str | None = None, split: str = "train", difficulty: float = 1.0
) -> Sample:
    """The sample for `seed` in `split` (family drawn from the seed when None), rendered.

    `difficulty` ∈ [0, 1] is the curriculum knob (see curriculum.py); evaluation uses 1.0.
    """
    scene, task, family, meta = build(seed, family, split, difficulty)
    thinking = thinking_text(task.think, task.answer) if task.think is not None else None
    return Sample(render(scene), task.question, task.answer, family, thinking, meta, scene)


def corpus(n: int, seed: int = 0) -> Iterator[str]:
    """Every kind of text the model reads or writes, for tokenizer training: first the world's vocabulary,
    then for n seeds and every family (difficulties cycling over the curriculum) the question, the answer,
    the thinking text and the scene description. No image is rendered."""
    words = list(COLOURS) + list(SHAPES) + [f"{k}s" for k in SHAPES] + list("0123456789")
    words += [
        "left",
        "right",
        "above",
        "below",
        "top",
        "middle",
        "bottom",
        "centre",
        "background",
        "document",
        "mark",
    ]
    yield " ".join(words)
    for i in range(n):
        difficulty = (0.0, 0.5, 1.0)[i % 3]
        for family in ALL_FAMILIES:
            scene, task, _, _ = build(seed + i, family, "train", difficulty)
            yield task.question
            yield task.answer
            if task.think is not None:
                yield thinking_text(task.think, task.answer)
            if family != DESCRIBE:
                yield describe(scene)
