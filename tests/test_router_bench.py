"""`tessera bench router`: the Flash table's arithmetic, its markdown and the docs section it rewrites."""

from __future__ import annotations

import pytest

from tessera.bench.docs import replace_section
from tessera.bench.router import vision_cost, vision_macs
from tessera.bench.router_report import markdown, plot
from tessera.config import preset
from tessera.evaluate import EvalResult
from tessera.flash_table import merge, summarise


def result(
    mode: str, accs: dict[str, float], tokens: float, qps: float, compressed: float
) -> EvalResult:
    return EvalResult(
        overall=sum(accs.values()) / len(accs),
        families=accs,
        counts=dict.fromkeys(accs, 10),
        visual_tokens_per_image=tokens,
        n=10 * len(accs),
        routing=mode,
        seed=0,
        seconds=1.0,
        samples_per_second=qps,
        generated_tokens_per_second=1.0,
        compressed_tile_fraction=compressed,
    )


def test_summary_ratios_and_targets(tmp_path, markdown_tables):
    fams = ["colour", "label", "document"]
    results = {
        "full": result("full", dict(zip(fams, [1.0, 0.8, 0.6])), 64.0, 2.0, 0.0),
        "compressed": result("compressed", dict(zip(fams, [1.0, 0.2, 0.1])), 16.0, 3.0, 1.0),
        "router": result("router", dict(zip(fams, [1.0, 0.8, 0.58])), 48.0, 2.5, 0.33),
        "random": result("random", dict(zip(fams, [1.0, 0.5, 0.3])), 48.0, 2.5, 0.33),
        "question": result("question", dict(zip(fams, [1.0, 0.8, 0.6])), 30.0, 2.6, 0.7),
        "router@question": result(
            "router@question", dict(zip(fams, [1.0, 0.6, 0.4])), 30.0, 2.6, 0.7
        ),
        "random@question": result(
            "random@question", dict(zip(fams, [1.0, 0.3, 0.2])), 30.0, 2.6, 0.7
        ),
    }
    bound = {"text_free": 0.105, "text_free_and_thumbnails": 0.25}
    s = summarise(results, None, None, bound)
    s.update(
        relative_threshold=0.5,
        absolute_threshold=0.0,
        question_relative_threshold=0.0,
        question_absolute_threshold=0.6,
        seeds=[0, 50000],
        tuning={
            "n": 14,
            "full": 0.9,
            "bound": bound,
            "relative_threshold": 0.5,
            "question_absolute_threshold": 0.6,
            "router": [
                {
                    "threshold": 0.5,
                    "overall": 0.8,
                    "reading": 0.7,
                    "visual_tokens": 48.0,
                    "tokens_saved": 25.0,
                    "accuracy_kept": 88.9,
                },
            ],
            "question": [
                {
                    "threshold": 0.6,
                    "overall": 0.9,
                    "reading": 0.9,
                    "visual_tokens": 30.0,
                    "tokens_saved": 53.1,
                    "accuracy_kept": 100.0,
                },
            ],
        },
    )
    assert s["tokens_saved"] == pytest.approx(25.0)
    assert s["bound_share"] == pytest.approx(100.0)  # 25 % saved of a 25 % bound
    assert s["accuracy_kept"] == pytest.approx(100 * (2.38 / 3) / (2.4 / 3))
    assert s["compressed_reading_drop"] == pytest.approx(100 * (0.7 - 0.15))
    assert s["router_minus_random_families"]["label"] == pytest.approx(30.0)
    assert s["router_minus_random_families"]["document"] == pytest.approx(28.0)
    assert s["throughput_ratio"] == pytest.approx(1.25)
    q = s["question"]
    assert q["tokens_saved"] == pytest.approx(100 * (1 - 30 / 64))
    assert q["accuracy_kept"] == pytest.approx(100.0)
    assert q["minus_router"]["label"] == pytest.approx(20.0)
    assert q["minus_router"]["document"] == pytest.approx(20.0)
    assert q["throughput_ratio"] == pytest.approx(1.3)
    assert all(s["targets"].values())
    text = markdown(s, "ckpt")
    modes, tuning, targets = markdown_tables(text)
    assert [row["routing"] for row in modes] == list(results)  # one row per routing
    assert {row["routing"]: float(row["visual tokens / image"]) for row in modes} == {
        m: r.visual_tokens_per_image for m, r in results.items()
    }
    assert [(row["router"], row["chosen"]) for row in tuning] == [
        ("router", "yes"),
        ("question", "yes"),
    ]
    assert {row["target"] for row in targets} == set(s["targets"])
    assert all(row["met"] == "yes" for row in targets)
    results["question"] = result("question", dict(zip(fams, [1.0, 0.6, 0.5])), 40.0, 1.0, 0.5)
    worse = summarise(results, None, None, bound)["targets"]
    assert not worse["question router keeps >= 98 % of full's accuracy"]
    assert not worse["question >= router + 10 points on label (same budget)"]
    assert not worse["end-to-end eval throughput with question > full"]
    plot(s, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_merging_held_out_seeds_weighs_families_by_count():
    a = result("router", {"colour": 1.0, "label": 0.5}, 40.0, 2.0, 0.4)
    b = result("router", {"colour": 0.5, "label": 0.5}, 60.0, 4.0, 0.2)
    b.counts = {"colour": 30, "label": 10}
    b.n = 40
    m = merge([a, b])
    assert m.counts == {"colour": 40, "label": 20} and m.n == 60
    assert m.families["colour"] == pytest.approx((10 * 1.0 + 30 * 0.5) / 40)
    assert m.overall == pytest.approx((m.families["colour"] + 0.5) / 2)
    assert m.visual_tokens_per_image == pytest.approx((20 * 40 + 40 * 60) / 60)


def test_replace_section_keeps_the_rest(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text(
        "# Benchmarks\n\n## Preprocessing\n\nkeep me\n\n## Flash\n\nold\n\n## Serving\n\nkeep too\n"
    )
    replace_section(doc, "## Flash", "new table")
    text = doc.read_text()
    assert "old" not in text and "new table" in text and "keep me" in text and "keep too" in text
    assert text.index("## Preprocessing") < text.index("## Flash") < text.index("## Serving")
    fresh = tmp_path / "C.md"
    replace_section(fresh, "## Flash", "body")
    assert fresh.read_text().startswith("# Benchmarks") and "## Flash\n\nbody" in fresh.read_text()


def test_vision_macs_parts_and_timing_on_a_tiny_model():
    from PIL import Image

    from tessera.model.vlm import VisionLanguageModel

    cfg = preset("tiny")
    m = vision_macs(cfg)
    assert m["router"] < 0.1 * m["vit"] and m["mlp1"] < m["vit"] and m["mlp2"] > 0
    model = VisionLanguageModel(cfg).eval()
    cost = vision_cost(model, [Image.new("RGB", (200, 100), "white")], rounds=1)
    assert cost["tiles"] == 3 and cost["sec_full"] > 0 and cost["mac_ratio"] >= 1.0
