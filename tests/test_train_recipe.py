"""The recipe end to end (init → pretrain → sft → mpo → gspo → vico → vico_compressed → router →
question_router → vico_tiles ×2 → eval → report), its resume, and the `tessera train` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tessera.train.recipe import (
    RecipeConfig,
    StagePlan,
    quick_recipe,
    read_timings,
    record_timing,
    resolve_paths,
    run_recipe,
    stage_finished,
    tiny_recipe,
)
from tessera.train.trainer import TrainConfig

CASCADE = [
    "pretrain",
    "sft",
    "spatial",
    "count",
    "count2",
    "focus",
    "mpo",
    "gspo",
    "vico",
    "vico_compressed",
    "router",
    "question_router",
    "vico_tiles",
    "vico_tiles2",
]


def tiny_plan() -> RecipeConfig:
    small = dict(rows=1, row_tokens=384, workers=0)
    one = dict(steps=1, warmup_steps=1, log_every=1, progress=False)
    return RecipeConfig(
        tokenizer_corpus=20,
        eval_n=2,
        probe_n=2,
        chance_n=20,
        eval_families=["colour", "label"],
        critic_queries=2,
        stages=[
            StagePlan("pretrain", TrainConfig(**one), dict(small)),
            StagePlan("sft", TrainConfig(**one, eval_every=1), dict(small)),
        ],
    )


def report_tables(report: str, markdown_tables) -> dict[tuple[str, ...], list[dict[str, str]]]:
    """The report's tables by their column headers."""
    return {tuple(t[0]): t for t in markdown_tables(report) if t}


def check_outputs(out, n, markdown_tables, stages=("pretrain", "sft")):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["n"] == n and set(summary["eval"]["families"]) <= set(summary["chance"])
    assert set(summary["stage_seconds"]) == set(stages)
    assert all(s > 0 for s in summary["stage_seconds"].values())
    report = (out / "report.md").read_text()
    tables = report_tables(report, markdown_tables)
    families = tables["family", "n", "accuracy", "chance"]  # the final evaluation, chance beside it
    assert families[-1]["family"] == "overall" and families[-1]["n"] == str(n)
    assert "curves.png" in report
    assert {row["family"] for row in families[:-1]} == set(summary["eval"]["families"])
    assert (out / "curves.png").stat().st_size > 1000
    stage_table = tables["stage", "steps", "seconds", "s / step", "final loss"]
    stage_rows = {row["stage"]: row for row in stage_table}
    for stage in stages:
        assert (out / stage / "final" / "model.safetensors").exists()
        assert int(stage_rows[stage]["steps"]) == summary["stages"][stage]["steps"]
    return summary


def test_recipe_smoke_and_resume(tmp_path, markdown_tables):
    import tessera

    result = run_recipe(tiny_plan(), tmp_path, progress=False)
    summary = check_outputs(tmp_path, 2, markdown_tables)
    assert result.final_checkpoint == tmp_path / "sft" / "final"
    model = tessera.load(result.final_checkpoint)
    assert model.tokenizer is not None
    from tessera.best_of_n import Critic

    Critic.load(result.final_checkpoint)  # the final model ships its Best-of-N critic
    evals = [
        json.loads(x)
        for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
        if "eval" in x
    ]
    assert len(evals) == 1 and 0 <= evals[0]["eval"]["overall"] <= 1
    # no Flash parts anywhere: no Flash table; the plan ends with sft, so its evaluation is the final one
    assert summary["flash"] is None and "## Flash" not in (tmp_path / "report.md").read_text()
    assert summary["stage_evals"]["sft"] == summary["eval"]
    # a second run finds every stage finished and reads the cached evaluation
    again = run_recipe(tiny_plan(), tmp_path, progress=False)
    assert again.summary["eval"] == summary["eval"]


@pytest.mark.slow
def test_quick_recipe_command(tmp_path, capsys, markdown_tables):
    from tessera.cli import main

    assert (
        main(["recipe", "--preset", "tiny", "--out", str(tmp_path), "--quick", "--no-progress"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "overall" in printed and "fewer visual tokens" in printed
    check_outputs(tmp_path, 14, markdown_tables, CASCADE)


def training_steps(folder):
    return [
        json.loads(x)["step"]
        for x in (folder / "metrics.jsonl").read_text().splitlines()
        if '"eval"' not in x
    ]


def files_with_times(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_quick_recipe_runs_the_whole_cascade_and_resumes_as_a_no_op(tmp_path, markdown_tables):
    import tessera
    from tessera.flash_table import default_modes

    plans = {p.name: p for p in quick_recipe().stages}
    assert list(plans) == CASCADE
    result = run_recipe("tiny", tmp_path, quick=True, progress=False)
    summary = check_outputs(tmp_path, 14, markdown_tables, CASCADE)
    for name, plan in plans.items():
        assert training_steps(tmp_path / name)[-1] == plan.train.steps, name
    # mpo collected from the SFT model's rollouts into its folder; gspo trained on queries filtered from them
    collect = json.loads((tmp_path / "mpo" / "collect.json").read_text())
    assert collect["pairs"] > 0 and (tmp_path / "mpo" / "queries.jsonl").exists()
    assert (
        json.loads((tmp_path / "gspo" / "metrics.jsonl").read_text().splitlines()[0])["sequences"]
        > 0
    )
    # the base stages train without Flash parts, vico adds them, the recipe ends on a Flash model with both routers
    assert tessera.load(tmp_path / "gspo" / "final").router is None
    assert tessera.load(tmp_path / "router" / "final").config.flash.question_router is False
    assert result.final_checkpoint == tmp_path / "vico_tiles2" / "final"
    final = tessera.load(result.final_checkpoint)
    assert final.router is not None and final.question_router is not None
    # the report: before/after per-family table, the Flash table, seconds per stage
    assert list(summary["stage_evals"]) == ["sft"] and summary["stage_evals"]["sft"]["n"] == 14
    flash = summary["flash"]
    assert list(flash["modes"]) == list(default_modes(final)) and flash["n"] == 7
    assert {"question", "router@question", "bound oracle"} <= set(flash["modes"])
    full, compressed = flash["modes"]["full"], flash["modes"]["compressed"]
    assert compressed["visual_tokens"] == pytest.approx(
        full["visual_tokens"] / 4
    )  # 1/16 instead of 1/4 per tile
    assert compressed["tokens_saved"] == pytest.approx(75.0) and full["tokens_saved"] == 0.0
    report = (tmp_path / "report.md").read_text()
    assert all(f"## {h}" in report for h in ("Per family through the cascade", "Flash", "Stages"))
    tables = report_tables(report, markdown_tables)
    cascade = next(t for head, t in tables.items() if head[0] == "family" and "after sft" in head)
    assert list(cascade[0])[-1] == "final" and cascade[-1]["family"] == "overall"
    flash_rows = next(t for h, t in tables.items() if h[0] == "routing" and "tokens saved" in h)
    assert [row["routing"] for row in flash_rows] == list(flash["modes"])
    saved = {row["routing"]: float(row["tokens saved"].rstrip(" %")) for row in flash_rows}
    assert saved["compressed"] == pytest.approx(75.0) and saved["full"] == 0.0

    # resume after completion: nothing is trained, saved or evaluated again; the same report is rewritten
    before = files_with_times(tmp_path)
    again = run_recipe("tiny", tmp_path, quick=True, progress=False)
    changed = {p.name for p, t in files_with_times(tmp_path).items() if before.get(p) != t}
    assert changed <= {"recipe.json", "report.md", "summary.json", "curves.png"}
    assert json.dumps(again.summary, sort_keys=True) == json.dumps(summary, sort_keys=True)

    # a stage whose folder is gone is trained again from the stage before it; the Flash table is re-measured
    before_last = tmp_path / "vico_tiles" / "final" / "model.safetensors"
    written = before_last.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "vico_tiles2")
    third = run_recipe("tiny", tmp_path, quick=True, progress=False)
    assert training_steps(tmp_path / "vico_tiles2") == [1, 2]
    assert before_last.stat().st_mtime_ns == written
    stored = json.loads((tmp_path / "evals.json").read_text())
    final_weights = tmp_path / "vico_tiles2" / "final" / "model.safetensors"
    assert stored["flash"]["key"]["weights"][1] == final_weights.stat().st_mtime_ns
    assert tessera.load(third.final_checkpoint).question_router is not None


def test_tiny_recipe_runs_the_cascade_in_order_with_constant_rl_learning_rates(tmp_path):
    config = tiny_recipe().validate()
    assert [p.name for p in config.stages] == CASCADE
    plans = {p.name: p for p in config.stages}
    assert plans["spatial"].kind == "sft" and plans["spatial"].data["repeat"] == [
        "spatial"
    ]  # sft again, own folder
    # counting's sink and probe only in its own phase: sft keeps the plain lookup (docs/TRAINING.md, session 6)
    assert (
        plans["count"].kind == "sft"
        and plans["count"].data["count_sink"]
        and plans["count"].data["count"] > 0
    )
    assert not plans["sft"].data.get("count_sink") and not plans["spatial"].data.get("count_sink")
    assert plans["mpo"].train.min_lr_ratio == plans["gspo"].train.min_lr_ratio == 1.0
    # gspo's offline accuracies are the file mpo writes into its own folder
    mpo_data = resolve_paths(plans["mpo"].data, tmp_path, tmp_path / "mpo")
    gspo_data = resolve_paths(plans["gspo"].data, tmp_path, tmp_path / "gspo")
    queries = str(Path(mpo_data["out"]) / "queries.jsonl")
    assert gspo_data["accuracies"] == queries == str(tmp_path / "mpo" / "queries.jsonl")
    assert set(config.eval_after) <= set(CASCADE)


def test_recipe_config_and_stage_state_fail_loudly(tmp_path):
    with pytest.raises(ValueError, match="eval_after names stage"):
        RecipeConfig(stages=tiny_recipe().stages[:2], eval_after=["mpo"]).validate()
    with pytest.raises(ValueError, match="once"):
        RecipeConfig(stages=tiny_recipe().stages[:2] * 2, eval_after=[]).validate()
    folder = tmp_path / "stage"
    assert not stage_finished(folder, 10)
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "model.safetensors").write_bytes(b"x")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "latest").write_text("step-000010\n")
    assert stage_finished(folder, 10) and not stage_finished(folder, 11)
    (folder / "checkpoints" / "latest").write_text("garbage\n")
    with pytest.raises(ValueError, match="not a step-N checkpoint"):
        stage_finished(folder, 10)


def test_stage_seconds_add_up_over_resumed_runs_and_restart_with_the_stage(tmp_path):
    path = tmp_path / "timings.json"
    record_timing(path, "vico", 10.0, resumed=False)
    record_timing(path, "vico", 5.0, resumed=True)  # the run that finished an interrupted stage
    record_timing(path, "router", 2.0, resumed=False)
    assert read_timings(path) == {"vico": 15.0, "router": 2.0}
    record_timing(path, "vico", 7.0, resumed=False)  # the stage trained again from scratch
    assert read_timings(path) == {"vico": 7.0, "router": 2.0}


def test_train_command_with_config_file(tmp_path, capsys):
    from tessera.cli import main

    cfg = tmp_path / "run.json"
    cfg.write_text(
        json.dumps(
            {
                "model": {"preset": "tiny"},
                "train": {"warmup_steps": 1, "log_every": 1},
                "data": {"workers": 0, "curriculum": [[0, 0.0], [10, 1.0]]},
            }
        )
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "sft",
                "--config",
                str(cfg),
                "--out",
                str(out),
                "--steps",
                "2",
                "--rows",
                "1",
                "--row-tokens",
                "384",
                "--no-progress",
                "--tokenizer-corpus",
                "20",
            ]
        )
        == 0
    )
    assert "sft: step 2" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert (out / "final" / "config.json").exists()
    with pytest.raises(ValueError, match="unknown SFTData option"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"data": {"rowz": 3}}))
        main(["train", "sft", "--config", str(bad), "--out", str(tmp_path / "bad"), "--steps", "1"])
