"""`tessera bench router`: the Flash table's arithmetic, its markdown and the docs section it rewrites."""

from __future__ import annotations

import pytest

from tessera.bench.docs import replace_section
from tessera.bench.router import markdown, plot, vision_cost, vision_macs
from tessera.config import preset
from tessera.evaluate import EvalResult
from tessera.flash_table import summarise


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
        "router": result("router", dict(zip(fams, [1.0, 0.8, 0.58])), 32.0, 2.5, 0.66),
        "random": result("random", dict(zip(fams, [1.0, 0.5, 0.3])), 32.0, 2.5, 0.66),
    }
    s = summarise(results, None, None)
    s.update(
        relative_threshold=0.5,
        absolute_threshold=0.5,
        sweep=[
            {
                "relative": 0.3,
                "router": {"overall": 0.7, "reading": 0.6, "visual_tokens": 30.0},
                "random": {"overall": 0.6, "reading": 0.4, "visual_tokens": 30.0},
            }
        ],
    )
    assert s["tokens_saved"] == pytest.approx(50.0)
    assert s["accuracy_kept"] == pytest.approx(100 * (2.38 / 3) / (2.4 / 3))
    assert s["compressed_reading_drop"] == pytest.approx(100 * (0.7 - 0.15))
    assert s["router_minus_random"] == pytest.approx(100 * (0.69 - 0.4))
    assert s["throughput_ratio"] == pytest.approx(1.25)
    assert all(s["targets"].values())
    text = markdown(s, "ckpt")
    modes, sweep, targets = markdown_tables(text)
    assert [row["routing"] for row in modes] == list(results)  # one row per mode, its measurements
    assert {row["routing"]: float(row["visual tokens / image"]) for row in modes} == {
        m: r.visual_tokens_per_image for m, r in results.items()
    }
    assert sweep == [
        {
            "relative threshold": "0.30",
            "visual tokens / image": "30.0",
            "router overall": "70.0",
            "router reading": "60.0",
            "random overall": "60.0",
            "random reading": "40.0",
        }
    ]
    assert {row["target"] for row in targets} == set(s["targets"])
    assert all(row["met"] == "yes" for row in targets)
    assert "50.0 % fewer visual tokens" in text
    s["world_bound"] = {"text_free": 0.105, "text_free_and_thumbnails": 0.263}
    assert "saves 10.5 % of the visual tokens (26.3 % with every thumbnail too)" in markdown(
        s, "ckpt"
    )
    plot(s, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


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
