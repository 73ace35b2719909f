"""Rewards: exact after normalisation, numeric with tolerance, multiple-choice letter, \\boxed{} /
last number,
and a user's own `module:function`; `tessera eval --data` scores a file per category with any of
them."""

import copy
import json
import sys
import types

import pytest

from tessera.cli import main
from tessera.data.rewards import (
    boxed,
    boxed_content,
    choice,
    choice_letter,
    exact,
    last_number,
    numeric,
    resolve,
)
from tessera.model.checkpoint import save_checkpoint


def test_exact_normalises():
    assert exact("  The Red. ", "red") == 1.0
    assert exact("<think>\nhmm\n</think>\n\nBlue!", "blue") == 1.0
    assert exact("top  left", "Top left") == 1.0
    assert exact("red square", "red") == 0.0


def test_numeric_reads_the_last_number_within_tolerance():
    assert last_number("I count 3, no wait, 1,204.5 in total") == 1204.5
    assert numeric("the answer is 12", "12.0") == 1.0
    assert numeric("about 3.14159", "3.1416", rel_tol=1e-4) == 1.0
    assert numeric("13", "12") == 0.0 and numeric("none", "12") == 0.0


def test_choice_letters():
    assert [
        choice_letter(t) for t in ("B", "(c)", "D.", "Answer: A", "I think the answer is (B) blue")
    ] == ["B", "C", "D", "A", "B"]
    assert (
        choice("The answer is C.", "C") == 1.0
        and choice("(A)", "B") == 0.0
        and choice("no idea", "B") == 0.0
    )


def test_boxed_and_last_number():
    assert boxed_content(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert boxed(r"thus \boxed{42}", "42") == 1.0
    assert boxed("so it is 42", r"\boxed{42}") == 1.0  # no box: the last number
    assert boxed(r"\boxed{41}", "42") == 0.0


def test_module_function_rewards(monkeypatch):
    module = types.ModuleType("my_verifier")
    module.score = lambda prediction, answer: float(answer in prediction)
    monkeypatch.setitem(sys.modules, "my_verifier", module)
    assert resolve("my_verifier:score")("it is red", "red") == 1.0
    assert resolve("exact") is exact
    with pytest.raises(ValueError, match="unknown reward"):
        resolve("fuzzy")
    with pytest.raises(ValueError, match="cannot import"):
        resolve("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no callable 'nope'"):
        resolve("my_verifier:nope")


def test_eval_data_json_per_category(tiny, tmp_path, write_dataset, capsys, monkeypatch):
    base = save_checkpoint(copy.deepcopy(tiny), tmp_path / "base")
    path = write_dataset(tmp_path / "ds", 6, seed=3)
    assert main(["eval", str(base), "--data", str(path), "--json", "--records"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 6 and set(result["categories"]) == {"quadrant", "background"}
    assert result["counts"] == {"background": 3, "quadrant": 3}
    records = result["records"]
    assert result["overall"] == sum(r["correct"] for r in records) / 6
    # a verifier that accepts anything: every category at 1.0
    module = types.ModuleType("always")
    module.yes = lambda prediction, answer: 1.0
    monkeypatch.setitem(sys.modules, "always", module)
    assert main(["eval", str(base), "--data", str(path), "--json", "--reward", "always:yes"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["overall"] == 1.0 and result["categories"] == {"background": 1.0, "quadrant": 1.0}
