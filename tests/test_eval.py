"""Held-out evaluation: batched greedy generation equals one-by-one generation; the JSON report's fields."""

from __future__ import annotations

import json

import pytest
import torch

from tessera.chat import build_tokenizer
from tessera.config import preset
from tessera.engine import SamplingParams, generate
from tessera.evaluate import evaluate, format_report


@pytest.fixture(scope="module")
def model():
    from tessera.model.init import init_model
    from tessera.world import corpus

    cfg = preset("tiny")
    cfg.vision.num_layers, cfg.language.num_layers = 2, 2
    tok = build_tokenizer(corpus(30), vocab_size=cfg.language.vocab_size)
    m = init_model(cfg, tok, seed=0).eval()
    with (
        torch.no_grad()
    ):  # a sharper random LM so greedy outputs differ between prompts and run for a while
        m.language_model.lm_head.weight.mul_(20)
    return m


def test_batched_greedy_matches_single_prompt_generation(model):
    tok = model.tokenizer
    prompts = [
        tok.build_prompt(q, [])
        for q in ("What colour is the circle?", "How many shapes?", "Describe the image.")
    ]
    with torch.no_grad():
        greedy = SamplingParams(max_tokens=6, stop_ids=frozenset([tok.im_end_id]))
        batched = generate(model, prompts, None, greedy).answers()
        for p, out in zip(prompts, batched):
            single = generate(model, [p], None, greedy).answers()[0]
            assert out == single
    assert len({len(p) for p in prompts}) > 1  # the prompts really needed padding


def test_eval_result_fields_and_report(model, markdown_tables):
    r = evaluate(model, seed=3, n=14, batch_size=5)
    data = r.to_json()
    for key in (
        "overall",
        "families",
        "visual_tokens_per_image",
        "n",
        "routing",
        "samples_per_second",
    ):
        assert key in data
    assert data["n"] == 14 and data["routing"] == "full" and "records" not in data
    from tessera.world import FAMILIES

    assert set(data["families"]) == set(FAMILIES) and all(v == 2 for v in r.counts.values())
    assert 0.0 <= data["overall"] <= 1.0
    # every image carries whole tiles of 16 tokens (1/4 branch), thumbnails included
    assert all(rec["visual_tokens"] % 16 == 0 and rec["visual_tokens"] >= 16 for rec in r.records)
    assert data["visual_tokens_per_image"] == pytest.approx(
        sum(x["visual_tokens"] for x in r.records) / 14
    )
    [table] = markdown_tables(format_report(r))  # one row per family, then the totals
    rows = {row["family"]: row for row in table}
    assert list(rows) == list(r.families) + ["overall"]
    assert all(rows[f]["n"] == str(r.counts[f]) for f in r.families)
    assert rows["overall"]["n"] == "14"
    percent = lambda cell: float(cell.rstrip("%")) / 100
    for family, accuracy in r.families.items():
        assert percent(rows[family]["accuracy"]) == pytest.approx(accuracy, abs=5e-4)
    assert percent(rows["overall"]["accuracy"]) == pytest.approx(r.overall, abs=5e-4)
    json.dumps(data)  # serialisable


def test_eval_is_deterministic_and_compressed_routing_uses_fewer_tokens(model):
    a = evaluate(model, seed=5, n=7)
    b = evaluate(model, seed=5, n=7, batch_size=2)
    assert [x["prediction"] for x in a.records] == [x["prediction"] for x in b.records]
    c = evaluate(model, seed=5, n=7, routing="compressed")
    assert c.visual_tokens_per_image == pytest.approx(a.visual_tokens_per_image / 4)
    assert c.compressed_tile_fraction == 1.0


def test_eval_command_prints_one_json_object(model, tmp_path, capsys):
    from tessera.cli import main
    from tessera.model.checkpoint import save_checkpoint

    save_checkpoint(model, tmp_path / "ckpt")
    assert main(["eval", str(tmp_path / "ckpt"), "--n", "7", "--seed", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n"] == 7 and data["routing"] == "full" and len(data["families"]) == 7
    with pytest.raises(
        ValueError, match="critic"
    ):  # Best-of-N needs a critic attached to the model
        evaluate(model, n=7, best_of=4)
