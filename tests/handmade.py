"""A hand-made dataset in InternVL's format, drawn with Pillow: a task the shipped tiny-sft was
never taught.

Each image is a 112×112 canvas of one background colour with a smaller square of another colour in
one quadrant.
Questions: 'In which quadrant is the square?' (category `quadrant`: top left / top right / bottom
left / bottom
right) and 'What colour is the background?' (category `background`). Used by tests
(conftest.write_dataset) and
by the demo in docs/log/2026-12-02-data.md:

    python tests/handmade.py OUT_DIR N SEED [NAME]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 20),
    "purple": (140, 40, 170),
    "orange": (240, 140, 20),
}
QUADRANTS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}


def write(folder, n: int, seed: int = 0, name: str = "data.jsonl", size: int = 112) -> Path:
    """n rows (alternating quadrant / background questions) with their PNGs under folder/img; the
    JSONL path."""
    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    half = size // 2
    with open(folder / name, "w") as f:
        for i in range(n):
            background, square = rng.sample(sorted(COLOURS), 2)
            quadrant = rng.choice(sorted(QUADRANTS))
            qx, qy = QUADRANTS[quadrant]
            side = rng.randint(16, 30)
            x0 = qx * half + rng.randint(3, half - side - 3)
            y0 = qy * half + rng.randint(3, half - side - 3)
            img = Image.new("RGB", (size, size), COLOURS[background])
            ImageDraw.Draw(img).rectangle([x0, y0, x0 + side, y0 + side], fill=COLOURS[square])
            path = f"img/{seed}_{i:05d}.png"
            img.save(folder / path)
            if i % 2 == 0:
                question, answer, category = (
                    "In which quadrant is the square?",
                    quadrant,
                    "quadrant",
                )
            else:
                question, answer, category = (
                    "What colour is the background?",
                    background,
                    "background",
                )
            row = {
                "image": path,
                "category": category,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
            f.write(json.dumps(row) + "\n")
    return folder / name


if __name__ == "__main__":
    out, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(write(out, count, seed, *(sys.argv[4:5] or ["data.jsonl"])))
