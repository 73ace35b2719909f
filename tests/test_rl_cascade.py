"""The Table-16 bench end to end at toy scale (slow: every stage, eval and Best-of-N run for real).

A random model never writes a well-formed answer, so the rewards are replaced by a rule on the first sampled
token (half the answers pass); everything else — collection, pairs, filter, MPO, two GSPO passes with a
resume in between, the cascade, the critic, the tables — is the real code path.
"""

import json
import math

import pytest


@pytest.mark.slow
def test_cascade_bench_runs_every_row(tmp_path, monkeypatch, make_tiny):
    import tessera.answers as answers_mod
    import tessera.best_of_n as best_of_n_mod
    from tessera.bench.cascade import format_cascade, quick_config, run_cascade
    from tessera.model.checkpoint import save_checkpoint

    save_checkpoint(make_tiny(), tmp_path / "sft")
    real = answers_mod.score

    def first_token_rule(tokenizer, r, query, verify):
        r = real(tokenizer, r, query, verify)
        r.format_ok, r.final = True, str(r.tokens[0] % 3)
        r.correct = r.tokens[0] % 2 == 0
        r.reward = float(r.correct)
        return r

    monkeypatch.setattr(answers_mod, "score", first_token_rule)
    monkeypatch.setattr(best_of_n_mod, "score", first_token_rule)
    summary = run_cascade(tmp_path / "sft", tmp_path / "out", quick_config(), log=lambda *_: None)
    assert list(summary["rows"]) == [
        "SFT",
        "+MPO",
        "+GSPO (1 pass)",
        "+GSPO (2 passes)",
        "Cascade (MPO → GSPO ½ pass)",
        "Cascade (MPO → GSPO 0.75 pass)",
        "Cascade (MPO → GSPO)",
    ]
    rows = summary["rows"]
    assert all(0.0 <= r["sampled"] <= 1.0 for r in rows.values())
    assert rows["+GSPO (2 passes)"]["cpu_seconds"] > rows["+GSPO (1 pass)"]["cpu_seconds"] > 0
    assert (
        rows["Cascade (MPO → GSPO)"]["cpu_seconds"]
        > rows["Cascade (MPO → GSPO ½ pass)"]["cpu_seconds"]
        > 0
    )
    assert rows["+GSPO (2 passes)"]["token_passes"] > rows["+GSPO (1 pass)"]["token_passes"] > 0
    assert (
        rows["Cascade (MPO → GSPO)"]["token_passes"]
        > rows["Cascade (MPO → GSPO ½ pass)"]["token_passes"]
        > rows["+MPO"]["token_passes"]
        > 0
    )
    assert (
        summary["mpo_reference"] == "rollout"
    )  # the collection's recorded log-probs: no reference pass
    assert summary["offline"]["pairs"] > 0 and summary["offline"]["filtered_queries"] > 0
    assert set(map(int, summary["best_of_n"]["by_n"])) == {1, 2, 4}
    assert (tmp_path / "out" / "critic" / "critic.safetensors").exists()
    assert (tmp_path / "out" / "offline" / "pairs.jsonl").exists()
    cfg = (
        quick_config()
    )  # a pass is pass_epochs epochs over the filtered queries, in rollout batches of mini-batches
    epoch = (
        math.ceil(summary["offline"]["filtered_queries"] / cfg.queries_per_rollout)
        * cfg.mini_batches
    )
    assert summary["steps_per_pass"] == cfg.pass_epochs * epoch
    assert (
        json.loads((tmp_path / "out" / "cascade.json").read_text())["steps_per_pass"]
        == summary["steps_per_pass"]
    )
    table = format_cascade(summary)
    assert "| Cascade (MPO → GSPO) |" in table and "oracle pass@N" in table
    assert "Cascade (MPO → GSPO) vs +GSPO (2 passes):" in table and "of its token passes" in table


def test_a_gspo_pass_of_no_epochs_is_refused():
    from tessera.bench.cascade import CascadeConfig

    with pytest.raises(ValueError, match="pass_epochs"):
        CascadeConfig(pass_epochs=0)


def test_token_passes_count_forward_positions_and_triple_the_differentiated_ones(make_tiny):
    import torch

    from tessera.bench.compute import count_token_passes

    model = make_tiny()
    ids = torch.randint(10, 100, (2, 7))  # [B,T] text only
    with count_token_passes(model) as meter:
        with torch.no_grad():
            model(ids)
        model(ids[:1, :5]).sum().backward()
    assert (meter.forward, meter.trained, meter.total) == (14, 5, 14 + 3 * 5)
    model(ids)  # outside the block: not counted
    assert meter.total == 29
    with count_token_passes(model) as again, torch.no_grad():  # counts only its own passes
        model(ids[:1])
    assert (again.forward, again.total, meter.total) == (7, 7, 29)


def test_cascade_stops_are_distinct_steps_inside_the_pass():
    from tessera.bench.cascade import CascadeConfig, cascade_stop_steps

    assert cascade_stop_steps((0.5, 0.9), 2368) == [(0.5, 1184), (0.9, 2131)]
    assert cascade_stop_steps((0.9, 0.5), 4) == [
        (0.5, 2),
        (0.9, 3),
    ]  # sorted; 0.9·4 rounds to the pass's end: one before
    assert cascade_stop_steps((0.5, 0.6), 2) == [(0.5, 1)]  # both round to step 1: measured once
    with pytest.raises(ValueError, match="cascade_stops"):
        CascadeConfig(cascade_stops=(0.5, 1.0))
