"""The recipe end to end (init → pretrain → sft → eval → report), and the `tessera train` command."""

from __future__ import annotations

import json

import pytest

from tessera.train.recipe import RecipeConfig, StagePlan, run_recipe
from tessera.train.trainer import TrainConfig


def tiny_plan() -> RecipeConfig:
    small = dict(rows=1, row_tokens=384, workers=0)
    one = dict(steps=1, warmup_steps=1, log_every=1, progress=False)
    return RecipeConfig(tokenizer_corpus=20, eval_n=2, probe_n=2, chance_n=20, eval_families=["colour", "label"], stages=[
        StagePlan("pretrain", TrainConfig(**one), dict(small)),
        StagePlan("sft", TrainConfig(**one, eval_every=1), dict(small)),
    ])


def check_outputs(out, n):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["n"] == n and set(summary["eval"]["families"]) <= set(summary["chance"])
    assert set(summary["stage_seconds"]) == {"pretrain", "sft"}
    report = (out / "report.md").read_text()
    assert "| family | n | accuracy | chance |" in report and "curves.png" in report
    assert (out / "curves.png").stat().st_size > 1000
    for stage in ("pretrain", "sft"):
        assert (out / stage / "final" / "model.safetensors").exists()
    return summary


def test_recipe_smoke_and_resume(tmp_path):
    import tessera

    result = run_recipe(tiny_plan(), tmp_path, progress=False)
    summary = check_outputs(tmp_path, 2)
    assert result.final_checkpoint == tmp_path / "sft" / "final"
    model = tessera.load(result.final_checkpoint)
    assert model.tokenizer is not None
    evals = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines() if "eval" in x]
    assert len(evals) == 1 and 0 <= evals[0]["eval"]["overall"] <= 1
    # a second run finds every stage finished and only re-evaluates
    again = run_recipe(tiny_plan(), tmp_path, progress=False)
    assert again.summary["eval"]["families"] == summary["eval"]["families"]


@pytest.mark.slow
def test_quick_recipe_command(tmp_path, capsys):
    from tessera.cli import main

    assert main(["recipe", "--preset", "tiny", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    assert "overall" in capsys.readouterr().out
    check_outputs(tmp_path, 14)


def test_train_command_with_config_file(tmp_path, capsys):
    from tessera.cli import main

    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": {"preset": "tiny"}, "train": {"warmup_steps": 1, "log_every": 1},
                               "data": {"workers": 0, "curriculum": [[0, 0.0], [10, 1.0]]}}))
    out = tmp_path / "run"
    assert main(["train", "sft", "--config", str(cfg), "--out", str(out), "--steps", "2", "--rows", "1",
                 "--row-tokens", "384", "--no-progress", "--tokenizer-corpus", "20"]) == 0
    assert "sft: step 2" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert (out / "final" / "config.json").exists()
    with pytest.raises(ValueError, match="unknown SFTData option"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"data": {"rowz": 3}}))
        main(["train", "sft", "--config", str(bad), "--out", str(tmp_path / "bad"), "--steps", "1"])
