"""The world: determinism, valid samples for every family, verifiers, split disjointness, grid variety,
curriculum, eval sets, corpus, the CLI and the text-geometry probe."""

from __future__ import annotations

import io
import json
import re

import pytest

from tessera.geometry import tile_grid
from tessera.world import (
    ALL_FAMILIES,
    FAMILIES,
    READING_FAMILIES,
    build,
    corpus,
    eval_items,
    level,
    make_sample,
    normalise,
    pick_family,
    score,
    verify,
)
from tessera.world.scenes import CELL, CELLS_PER_TILE, COLOURS, SHAPES, TILE


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_same_seed_same_bytes_and_answers(family):
    a, b = make_sample(123, family), make_sample(123, family)
    assert _png(a.image) == _png(b.image)
    assert (a.question, a.answer, a.thinking_answer, a.meta) == (
        b.question,
        b.answer,
        b.thinking_answer,
        b.meta,
    )


def test_family_drawn_from_seed_matches_explicit_family():
    for seed in range(20):
        implicit = make_sample(seed)
        explicit = make_sample(seed, pick_family(seed))
        assert implicit.family == pick_family(seed)
        assert (
            _png(implicit.image) == _png(explicit.image) and implicit.question == explicit.question
        )
    assert len({pick_family(s) for s in range(200)}) == len(FAMILIES)


def test_different_seeds_differ():
    images = {_png(make_sample(s, "label").image) for s in range(20)}
    assert len(images) == 20


# ---- every family, many seeds ---------------------------------------------------------------------


@pytest.mark.parametrize("difficulty", [0.0, 0.5, 1.0])
def test_every_family_yields_valid_samples(difficulty):
    for family in ALL_FAMILIES:
        for seed in range(40):
            s = make_sample(seed, family, difficulty=difficulty)
            w, h = s.image.size
            cols, rows = s.meta["grid"]
            assert (w, h) == (cols * TILE, rows * TILE) and tile_grid(w, h, TILE, 1, 6) == (
                cols,
                rows,
            )
            assert cols * rows <= level(difficulty).max_tiles
            assert s.family == family and s.question.endswith("?") or family == "describe"
            assert s.answer and "\n" not in s.answer
            assert verify(family, s.answer, s.answer)
            assert all(
                0 <= t < cols * rows for t in s.meta["evidence_tiles"] + s.meta["text_tiles"]
            )
            json.dumps(s.meta)  # serialisable for samples.jsonl
            if family == "reasoning":
                assert s.thinking_answer.startswith("<think>\n")
                assert s.thinking_answer.endswith(f"</think>\n\n{s.answer}")
                assert verify(family, s.thinking_answer, s.answer)
            else:
                assert s.thinking_answer is None


def test_answers_are_consistent_with_the_scene():
    for seed in range(60):
        for family in FAMILIES:
            scene, task, _, _ = build(seed, family)
            q, a = task.question, task.answer
            if family == "colour":
                kind = re.match(r"What colour is the (\w+)\?", q).group(1)
                assert [s.colour for s in scene.shapes if s.kind == kind] == [a]
            elif family == "shape":
                colour = re.match(r"What shape is the (\w+) object\?", q).group(1)
                assert [s.kind for s in scene.shapes if s.colour == colour] == [a]
            elif family == "count":
                m = re.match(r"How many (?:shapes|(\w+) shapes|(\w+)s) are there\?", q)
                assert int(a) == scene.count(kind=m.group(2), colour=m.group(1))
            elif family == "label":
                name = re.match(r"What is the label of the (\w+ \w+)\?", q).group(1)
                assert scene.find(name).label == a and a.isdigit() and len(a) == 2
            elif family == "document":
                key = re.match(
                    r"In the document, what is the number after the (\w+) mark\?", q
                ).group(1)
                assert scene.document.code_for(key) == a and len(a) == 3
            elif family == "spatial":
                m = re.match(
                    r"Is the (\w+ \w+) (left or right of|above or below) the (\w+ \w+)\?", q
                )
                sa, sb = scene.find(m.group(1)), scene.find(m.group(3))
                axis = 0 if m.group(2).startswith("left") else 1
                before = sa.centre[axis] < sb.centre[axis]
                assert (
                    a == ("left" if before else "right")
                    if axis == 0
                    else a == ("above" if before else "below")
                )
            elif family == "reasoning":
                m = re.match(
                    r"What is the label of the (\w+ \w+) (plus|minus) the number of (\w+)s\?", q
                )
                if m:
                    label, n = int(scene.find(m.group(1)).label), scene.count(kind=m.group(3))
                    assert int(a) == (label + n if m.group(2) == "plus" else label - n) >= 0
                else:
                    m = re.match(
                        r"What is the sum of the labels of the (\w+ \w+) and the (\w+ \w+)\?", q
                    )
                    assert int(a) == int(scene.find(m.group(1)).label) + int(
                        scene.find(m.group(2)).label
                    )


def test_scene_invariants():
    """Unique (colour, kind) pairs and labels, text inside the canvas, documents in one tile and token-aligned."""
    for seed in range(100):
        scene, _, _, _ = build(seed, "document")
        names = [s.name for s in scene.shapes]
        labels = [s.label for s in scene.shapes]
        assert len(set(names)) == len(names) and len(set(labels)) == len(labels)
        for s in scene.shapes:
            assert s.kind in SHAPES and s.colour in COLOURS
            lx, ly = s.label_cell
            assert lx < scene.cols * CELLS_PER_TILE and ly < scene.rows * CELLS_PER_TILE
        d = scene.document
        assert d.x % 2 == 0  # every entry is the top row of its own 1/4 token (2×2 cells)
        assert d.x // CELLS_PER_TILE == (d.x + d.width - 1) // CELLS_PER_TILE
        assert d.y // CELLS_PER_TILE == (d.y + d.height - 1) // CELLS_PER_TILE
        assert len(set(d.keys)) == len(d.keys) and 3 <= len(d.keys) <= 6 and d.y % 2 == 0
        assert all(scene.tile_of(*d.cell(i)) == scene.tile_of(d.x, d.y) for i in range(len(d.keys)))


def test_documents_are_one_entry_per_quarter_token_and_shared_at_one_sixteenth():
    """At 1/4 (2×2 cells per token) every entry has a token to itself, key and code together; at 1/16 (4×4
    cells) tokens are shared by several entries: the squeeze that compression must cost."""
    shared = 0
    for seed in range(100):
        scene, _, _, _ = build(seed, "document")
        d = scene.document
        quarter = [(cx // 2, cy // 2) for cx, cy in (d.cell(i) for i in range(len(d.keys)))]
        cells = [d.cell(i) for i in range(len(d.keys))]
        key_and_code = [{((cx + k) // 2, cy // 2) for k in range(2)} for cx, cy in cells]
        assert len(set(quarter)) == len(quarter) and all(len(t) == 1 for t in key_and_code)
        sixteenth = [(cx // 4, cy // 4) for cx, cy in (d.cell(i) for i in range(len(d.keys)))]
        shared += len(set(sixteenth)) < len(sixteenth)
    assert shared >= 80  # most full-difficulty documents put several entries into one 1/16 token


def test_counts_and_objects_follow_the_curriculum():
    for difficulty in (0.0, 0.5, 1.0):
        lv = level(difficulty)
        for seed in range(50):
            scene, _, _, _ = build(seed, "count", difficulty=difficulty)
            assert 1 <= len(scene.shapes) <= lv.max_objects
            assert all(len(s.label) == lv.label_digits for s in scene.shapes)
            assert max(scene.count(kind=k) for k in SHAPES) <= lv.max_same_kind
            if lv.slots:
                assert all(s.x % 4 == 0 and s.y % 4 == 0 for s in scene.shapes)
    with pytest.raises(ValueError):
        level(1.5)


# ---- verifiers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,answer",
    [
        ("colour", "red"),
        ("count", "3"),
        ("label", "47"),
        ("document", "093"),
        ("reasoning", "50"),
        ("shape", "triangle"),
    ],
)
def test_verifier_accepts_allowed_forms(family, answer):
    forms = [
        answer,
        answer.upper(),
        f"  {answer}  ",
        f"{answer}.",
        f"The answer is {answer}.",
        f"Answer: {answer}",
        f"the answer is: {answer}",
        f"**{answer}**",
        f'"{answer}"',
        f"Final answer: {answer}!",
        f"<think>\nsome steps, maybe 12 + 3 = 15\n</think>\n\n{answer}",
        f"<think>\n</think>\n\n{answer}.",
        f"<think>a</think><think>b</think> The answer is {answer}",
    ]
    for form in forms:
        assert verify(family, form, answer), form


@pytest.mark.parametrize(
    "family,answer,wrong",
    [
        ("colour", "red", ["blue", "reddish", "red or blue", "not red", "", "<think>\nred"]),
        ("count", "3", ["4", "33", "3 or 4", "three", "03", "<think>\n3\n"]),
        ("label", "47", ["74", "470", "4 7", "47 48", "4"]),
        ("document", "093", ["93", "094", "0930", "0 93", "C093"]),
        (
            "reasoning",
            "50",
            ["49", "51", "<think>\n47 + 3 = 50\n</think>\n\n49", "<think>\n47 + 3 = 50", "500"],
        ),
        ("spatial", "left", ["right", "above", "left or right", "to the right"]),
    ],
)
def test_verifier_rejects_wrong_answers(family, answer, wrong):
    for w in wrong:
        assert not verify(family, w, answer), w


def test_spatial_phrasings():
    for form in [
        "left",
        "To the left.",
        "on the left",
        "left of it",
        "left of the blue square",
        "The answer is left",
    ]:
        assert verify("spatial", form, "left"), form
    for form in ["above", "Above it.", "above the red circle"]:
        assert verify("spatial", form, "above"), form


def test_verifier_unknown_family_and_normalise():
    with pytest.raises(ValueError):
        verify("nope", "1", "1")
    assert normalise('  **"The answer is 47."**  ') == "47"


# ---- splits, eval sets, corpus --------------------------------------------------------------------


def test_eval_split_is_disjoint_from_train():
    items = eval_items(20)
    assert len(items) == 20 * len(FAMILIES) and len({(i.seed, i.family) for i in items}) == len(
        items
    )
    train_pngs = {_png(make_sample(s, f).image) for s in range(30) for f in ("label", "document")}
    eval_pngs = {
        _png(make_sample(s, f, split="eval").image)
        for s in range(30)
        for f in ("label", "document")
    }
    assert not train_pngs & eval_pngs
    a, b = make_sample(5, "label"), make_sample(5, "label", split="eval")
    assert (
        a.meta["split"] == "train" and b.meta["split"] == "eval" and _png(a.image) != _png(b.image)
    )
    with pytest.raises(ValueError):
        make_sample(10**9, "label")  # train seeds stop where eval seeds begin
    with pytest.raises(ValueError):
        eval_items(3, split="train")
    assert eval_items(3)[: 2 * len(FAMILIES)] == eval_items(2)  # growing a set only appends


def test_score():
    results = [
        ("label", "47", "47"),
        ("label", "48", "47"),
        ("document", "093", "093"),
        ("colour", "red", "blue"),
    ]
    s = score(results)
    assert s["label"] == 0.5 and s["document"] == 1.0 and s["colour"] == 0.0
    assert (
        s["overall"] == pytest.approx(0.5) and s["reading"] == pytest.approx(0.75) and s["n"] == 4
    )
    assert set(READING_FAMILIES) <= set(FAMILIES)


def test_corpus_covers_every_word_the_model_writes():
    def words(text: str) -> list[str]:
        return re.sub(r"[?.,:]", " ", text).split()

    texts = list(corpus(30))
    vocab = set(words(" ".join(texts)))
    for seed in range(40):
        for family in ALL_FAMILIES:
            _, task, _, _ = build(seed + 500, family)
            missing = [
                w
                for w in words(task.question + " " + task.answer)
                if w not in vocab and not w.isdigit()
            ]
            assert not missing, (family, missing)
    assert any("<think>" in t for t in texts) and any(
        t.startswith("A ") and "labelled" in t for t in texts
    )


# ---- geometry: grids vary, text stays on the patch lattice -----------------------------------------


def test_grids_vary():
    grids = {
        tile_grid(*make_sample(s).image.size, tile_size=TILE, min_tiles=1, max_tiles=6)
        for s in range(200)
    }
    tiles = {c * r for c, r in grids}
    assert tiles == {1, 2, 3, 4, 5, 6}, grids
    assert len(grids) >= 10


def test_text_sits_in_its_cell():
    """Label ink lies inside the label's 14 px cell (a glyph never straddles a patch)."""
    import numpy as np

    for seed in range(10):
        scene, _, _, _ = build(seed, "label")
        from tessera.world.scenes import Scene, render

        for s in scene.shapes:
            solo = render(Scene(scene.cols, scene.rows, "white", "plain", (0, 0, 0), (s,), None))
            g = np.asarray(solo.convert("L"))
            lx, ly = s.label_cell
            ink = g < 128
            ink[s.y * CELL : (s.y + s.size) * CELL, s.x * CELL : (s.x + s.size) * CELL] = (
                False  # the shape itself
            )
            ys, xs = np.nonzero(ink)
            assert ys.min() >= ly * CELL and ys.max() < (ly + 1) * CELL
            assert xs.min() >= lx * CELL and xs.max() < (lx + 1) * CELL


def test_document_ink_stays_in_its_entry_cells():
    """Every mark and digit of a document lies inside its entry's two cells (nothing straddles a patch row)."""
    import numpy as np

    from tessera.world.scenes import PAPER, Scene, render

    for seed in range(10):
        scene, _, _, _ = build(seed, "document")
        d = scene.document
        g = np.asarray(render(Scene(scene.cols, scene.rows, "white", "plain", (0, 0, 0), (), d)))
        ink = (
            np.abs(g.astype(int) - np.array(PAPER)).sum(-1) > 60
        )  # not paper, not the grey panel border
        inside = np.zeros_like(ink)
        for i in range(len(d.keys)):
            cx, cy = d.cell(i)
            inside[cy * CELL : (cy + 1) * CELL, cx * CELL : (cx + 2) * CELL] = True
        border = np.zeros_like(ink)
        x0, y0, x1, y1 = (
            d.x * CELL - 4,
            d.y * CELL - 3,
            (d.x + d.width) * CELL + 3,
            (d.y + d.height) * CELL + 2,
        )
        border[max(0, y0) : y1 + 1, max(0, x0) : x1 + 1] = True
        border[y0 + 1 : y1, x0 + 1 : x1] = False  # only the outline
        assert not (ink & ~inside & ~border).any()
        cells = [d.cell(i) for i in range(len(d.keys))]
        assert all(
            ink[cy * CELL : (cy + 1) * CELL, cx * CELL : (cx + 2) * CELL].any() for cx, cy in cells
        )


def test_probe_geometry_and_template_reading():
    from tessera.bench.probe import geometry, template_reading

    g = geometry()
    assert (
        g["glyphs_per_patch"] == 2
        and g["glyph_slots_per_token_1_16"] == 4 * g["glyph_slots_per_token_1_4"]
    )
    assert g["entries_per_token_1_4"] == 1 and g["max_entries_per_token_1_16"] == 4
    full = template_reading(n=10)
    squeezed = template_reading(n=10, squeeze=3)
    assert full == 1.0 and squeezed < 0.8


# ---- CLI ------------------------------------------------------------------------------------------


def test_world_sample_command(tmp_path):
    from tessera.cli import main

    assert (
        main(
            [
                "world",
                "sample",
                "--n",
                "3",
                "--out",
                str(tmp_path),
                "--seed",
                "7",
                "--family",
                "reasoning",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [7, 8, 9] and all(r["family"] == "reasoning" for r in rows)
    for r in rows:
        s = make_sample(r["seed"], "reasoning")
        assert (tmp_path / r["image"]).read_bytes() == _png(s.image)
        assert (r["question"], r["answer"]) == (s.question, s.answer)


def test_processor_tiles_are_exact_crops():
    """The seam the world relies on: canvases are whole tile grids, so the processor's tiles are exact crops
    and the text stays on the patch lattice (tessera.image.preprocess with the tiny preset's tiling)."""
    import numpy as np
    import torch

    from tessera.image import preprocess

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for seed in range(3):
        s = make_sample(seed, "document")
        pixels, (cols, rows) = preprocess(s.image, TILE, 1, 6, True)
        assert [cols, rows] == s.meta["grid"] and pixels.shape[0] == cols * rows + (cols * rows > 1)
        rgb = torch.tensor(np.asarray(s.image, np.float32) / 255).permute(
            2, 0, 1
        )  # [H,W,3] → [3,H,W]
        for i in range(cols * rows):
            ty, tx = divmod(i, cols)
            crop = rgb[:, ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE]
            assert torch.allclose(pixels[i] * std + mean, crop, atol=1e-5)


@pytest.mark.parametrize("family", ["colour", "spatial", "reasoning", "count"])
def test_lookup_survives_the_samples_meta(family):
    """A sample's meta carries its Lookup (JSON-serialisable); reading it back gives the task's own."""
    import json

    from tessera.world import Lookup, build

    for seed in range(5):
        _, task, _, meta = build(seed, family, "train", 1.0)
        assert Lookup.from_meta(json.loads(json.dumps(meta["lookup"]))) == task.lookup
        assert len(task.lookup.names) in (0, len(task.lookup.cells))


def test_a_chains_claims_are_the_direct_questions_and_its_sum_checks():
    from tessera.world.claims import Claim, arithmetic_consistent, perception_claims
    from tessera.world.tasks import build, count_question, label_question

    for seed in range(40):
        scene, task, _, _ = build(seed, "reasoning")
        claims = perception_claims(task.think)
        named = [s for s in scene.shapes if f"The {s.name} is labelled {s.label}." in task.think]
        first = min(named, key=lambda s: task.think.index(f"The {s.name} "))
        assert claims[0] == Claim(label_question(first.name), first.label)
        assert len(claims) == 2 and claims[1].question.startswith(("What is the label", "How many"))
        if claims[1].question.startswith("How many"):
            kind = claims[1].question.split()[2][:-1]
            assert claims[1] == Claim(count_question(kind), str(scene.count(kind=kind)))
        assert arithmetic_consistent(task.think, task.answer) is True
        assert arithmetic_consistent(task.think, f"The answer is {task.answer}.") is True
        assert arithmetic_consistent(task.think, str(int(task.answer) + 1)) is False
    assert arithmetic_consistent("The red circle is labelled 4. 4 + 3 = 8.", "8") is False
    assert arithmetic_consistent("The red circle is labelled 4.", "4") is None
    assert perception_claims("There is 1 diamond. There are 3 diamonds.") == [
        Claim(count_question("diamond"), "1"),
        Claim(count_question("diamond"), "3"),
    ]


@pytest.mark.parametrize(
    "a, op, b, text",
    [
        (47, "+", 85, "47 + 85: 7 + 5 = 12, 4 + 8 + 1 = 13, so 47 + 85 = 132."),
        (47, "-", 9, "47 - 9: 17 - 9 = 8, 4 - 0 - 1 = 3, so 47 - 9 = 38."),
        (20, "-", 1, "20 - 1: 10 - 1 = 9, 2 - 0 - 1 = 1, so 20 - 1 = 19."),
        (5, "+", 47, "5 + 47: 5 + 7 = 12, 0 + 4 + 1 = 5, so 5 + 47 = 52."),
        (5, "-", 5, "5 - 5: 5 - 5 = 0, so 5 - 5 = 0."),
    ],
)
def test_worked_sums_go_one_column_at_a_time(a, op, b, text):
    from tessera.world.tasks import worked_sum

    assert worked_sum(a, b, op) == text


def test_worked_sums_columns_spell_the_result():
    import random

    from tessera.world.claims import arithmetic_consistent
    from tessera.world.tasks import worked_sum

    rng = random.Random(0)
    for _ in range(2000):
        a, b, op = rng.randrange(100), rng.randrange(100), rng.choice("+-")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        steps = worked_sum(a, b, op).split(": ", 1)[1].split(", so")[0].split(", ")
        values = [int(step.split(" = ")[1]) for step in steps]  # units column first
        result = int(str(values[-1]) + "".join(str(v % 10) for v in reversed(values[:-1])))
        assert result == (a + b if op == "+" else a - b)
        assert arithmetic_consistent(worked_sum(a, b, op), str(result))
    with pytest.raises(ValueError, match="no worked sum"):
        worked_sum(3, 5, "-")


def test_text_free_token_savings_counts_tiles_without_text_and_thumbnails():
    from types import SimpleNamespace

    from tessera.world import text_free_token_savings

    one = SimpleNamespace(
        meta={"grid": [1, 1], "text_tiles": []}
    )  # 16 tokens, 12 saved, no thumbnail
    four = SimpleNamespace(
        meta={"grid": [2, 2], "text_tiles": [0, 3, 3]}
    )  # 5 tiles = 80 tokens; 2 text-free
    got = text_free_token_savings([one, four], full_tokens=16, compressed_tokens=4)
    assert got["text_free"] == pytest.approx((12 + 2 * 12) / 96)
    assert got["text_free_and_thumbnails"] == pytest.approx((12 + 3 * 12) / 96)
    with pytest.raises(ValueError, match="compressed_tokens"):
        text_free_token_savings([one], 4, 16)
