"""MPO on a user's preference pairs and GSPO on a user's prompts, with a built-in or
`module:function` reward."""

import copy
import json
import sys
import types

import pytest
from PIL import Image

from tessera.cli import main
from tessera.model.checkpoint import save_checkpoint
from tessera.train.records_rl import gspo_inputs, mpo_inputs


@pytest.fixture
def base(tiny, tmp_path):
    return save_checkpoint(copy.deepcopy(tiny).float(), tmp_path / "base")


def _files(tmp_path):
    Image.new("RGB", (112, 112), (200, 0, 0)).save(tmp_path / "r.png")
    Image.new("RGB", (224, 112), (0, 0, 200)).save(tmp_path / "b.png")
    pairs = [
        {"image": "r.png", "question": "Colour?", "chosen": "red", "rejected": "blue"},
        {"image": "b.png", "question": "Colour?", "chosen": "blue", "rejected": "green"},
        {
            "image": ["r.png", "b.png"],
            "question": "Image-1: <image>\nImage-2: <image>\nWhich is red?",
            "chosen": "the first",
            "rejected": "the second",
        },
    ]
    prompts = [
        {"image": "r.png", "question": "Colour?", "answer": "red", "category": "colour"},
        {"question": "What is 2 plus 2?", "answer": "4", "category": "sum"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return tmp_path / "pairs.jsonl", tmp_path / "prompts.jsonl"


def test_records_become_queries_with_their_images(tiny, tmp_path):
    pairs_path, prompts_path = _files(tmp_path)
    pairs, prepared, report = mpo_inputs(tiny, str(pairs_path))
    assert len(pairs) == 3 and report.num_skipped == 0
    assert (
        pairs[0].chosen[-1] == tiny.tokenizer.im_end_id
        and tiny.tokenizer.decode(pairs[0].rejected) == "blue"
    )
    multi = prepared[pairs[2].query.key()]
    assert len(multi.image_tokens) == 2 and multi.image_features.shape[0] == sum(multi.image_tokens)
    assert len({p.query.key() for p in pairs}) == 3
    queries, prepared, verify, _ = gspo_inputs(tiny, str(prompts_path), "numeric")
    assert prepared[queries[1].key()].image_tokens == [] and verify("sum", "it is 4", "4")


def test_train_mpo_and_gspo_on_files_report_rewards(base, tmp_path, capsys, monkeypatch):
    pairs_path, prompts_path = _files(tmp_path)
    assert (
        main(
            [
                "train",
                "mpo",
                "--init",
                str(base),
                "--data",
                str(pairs_path),
                "--out",
                str(tmp_path / "mpo"),
                "--steps",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("mpo: step 2") and "reward_accuracy" in last and "reward_margin" in last
    module = types.ModuleType("lenient")
    module.score = lambda prediction, answer: float(
        len(prediction) > 0
    )  # any non-empty answer earns 1
    monkeypatch.setitem(sys.modules, "lenient", module)
    config = tmp_path / "gspo.json"
    config.write_text(
        json.dumps(
            {
                "data": {
                    "group_size": 2,
                    "queries_per_rollout": 2,
                    "mini_batches": 1,
                    "max_new_tokens": 4,
                }
            }
        )
    )
    assert (
        main(
            [
                "train",
                "gspo",
                "--config",
                str(config),
                "--init",
                str(base),
                "--data",
                str(prompts_path),
                "--reward",
                "lenient:score",
                "--out",
                str(tmp_path / "gspo"),
                "--steps",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("gspo: step 1") and "reward " in last
    with pytest.raises(SystemExit, match="--reward scores GSPO"):
        main(
            [
                "train",
                "sft",
                "--data",
                str(prompts_path),
                "--reward",
                "exact",
                "--out",
                str(tmp_path / "x"),
            ]
        )


@pytest.mark.parametrize("stage", ["vico", "router", "question_router"])
def test_flash_stages_train_on_conversation_files(base, tmp_path, write_dataset, capsys, stage):
    data = write_dataset(tmp_path / "ds", 8)
    extra = ["--rows", "2", "--row-tokens", "256"] if stage == "vico" else []
    assert (
        main(
            [
                "train",
                stage,
                "--init",
                str(base),
                "--data",
                str(data),
                "--out",
                str(tmp_path / stage),
                "--steps",
                "1",
                "--no-progress",
                "--precision",
                "fp32",
                *extra,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "data: 8 records" in out and out.strip().splitlines()[-1].startswith(f"{stage}: step 1")


def test_critic_trains_on_a_prompt_file(base, tmp_path, write_dataset, capsys):
    data = write_dataset(tmp_path / "ds", 12)
    out = tmp_path / "critic"
    assert (
        main(
            [
                "critic",
                str(base),
                "--data",
                str(data),
                "--reward",
                "exact",
                "--group-size",
                "2",
                "--epochs",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "report.json").exists() and "critic written to" in capsys.readouterr().out
