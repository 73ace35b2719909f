"""The world as one source among others: index → Conversation, and its export as InternVL files.

`WorldSource(index)` draws the same sample as `tessera.train.data.WorldStream.sample(index)` (same
family pick,
seed, difficulty and thinking draw) and returns it as a Conversation with its image in memory;
`export` writes
N of them as `images/*.png` + `annotation.jsonl` + `meta.json` (InternVL's layout), which read back
through
`tessera.data.readers` into the same Conversations — so training on the files and on the stream sees
the same
samples (tests/test_data_world.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tessera.data.internvl import to_row
from tessera.data.records import Conversation, Turn
from tessera.world import make_sample


@dataclass
class WorldSource:
    families: dict[str, float] | None = None  # family → weight; None: the world's own pick
    thinking_prob: float = 0.0
    seed: int = 0
    split: str = "train"
    difficulty: Callable[[int], float] | float = 1.0

    def level(self, index: int) -> float:
        return self.difficulty(index) if callable(self.difficulty) else float(self.difficulty)

    def __call__(self, index: int) -> Conversation:
        rng = random.Random(self.seed * 1_000_003 + index)
        family = None
        if self.families:
            names = sorted(self.families)
            family = rng.choices(names, weights=[self.families[n] for n in names])[0]
        s = make_sample(
            self.seed + index, family=family, split=self.split, difficulty=self.level(index)
        )
        thinking = s.thinking_answer is not None and rng.random() < self.thinking_prob
        answer = s.thinking_answer if thinking else s.answer
        return Conversation(
            (s.image,),
            (Turn(s.question, answer),),
            category=s.family,
            where=f"world:{self.split}:{self.seed + index}",
        )


def export(
    source: Callable[[int], Conversation],
    n: int,
    out: str | Path,
    start: int = 0,
    name: str = "world",
) -> Path:
    """Write source(start) … source(start + n - 1) in InternVL's format under `out`; returns the
    meta JSON."""
    if n < 1:
        raise ValueError(f"export needs n >= 1, got {n}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    annotation = out / "annotation.jsonl"
    with annotation.open("w") as f:
        for index in range(start, start + n):
            conv = source(index)
            paths = []
            for k, image in enumerate(conv.images):
                rel = f"images/{index:08d}_{k}.png"
                image.save(out / rel)  # PNG: lossless, the pixels read back exactly
                paths.append(rel)
            f.write(json.dumps(to_row(conv, paths)) + "\n")
    meta = out / "meta.json"
    meta.write_text(
        json.dumps(
            {name: {"root": ".", "annotation": annotation.name, "repeat_time": 1, "length": n}},
            indent=2,
        )
        + "\n"
    )
    return meta
