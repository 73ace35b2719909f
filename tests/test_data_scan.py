"""Bad input: each case is a clear error naming file and line before training starts, or, with
--skip-bad-records, a count of what was skipped and why, and the run's final line says so."""

import copy
import json

import pytest
from PIL import Image

from tessera.cli import main
from tessera.data import DataError
from tessera.data.readers import read_rows
from tessera.model.checkpoint import save_checkpoint
from tessera.train.conversations import scan_for

GOOD = {
    "image": "ok.png",
    "conversations": [
        {"from": "human", "value": "<image>\nColour?"},
        {"from": "gpt", "value": "red"},
    ],
}


def _write(tmp_path, bad_line: str) -> str:
    Image.new("RGB", (112, 112), (200, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really")
    lines = [json.dumps(GOOD), bad_line, json.dumps(GOOD)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


CASES = {
    "malformed record": ('{"image": "ok.png", "conversations": [', "malformed line"),
    "missing image": (json.dumps({**GOOD, "image": "nowhere.png"}), "image 1 not found"),
    "unreadable image": (json.dumps({**GOOD, "image": "garbage.png"}), "image 1 unreadable"),
    "no gpt turn": (
        json.dumps(
            {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]}
        ),
        "no gpt turn",
    ),
    "longer than the context": (
        json.dumps(
            {
                **GOOD,
                "conversations": [
                    {"from": "human", "value": "<image>\nColour?"},
                    {"from": "gpt", "value": "red " * 600},
                ],
            }
        ),
        "longer than the context",
    ),
    "image tokens in the text": (
        json.dumps(
            {
                **GOOD,
                "conversations": [
                    {"from": "human", "value": "<image>\n<IMG_CONTEXT> Colour?"},
                    {"from": "gpt", "value": "red"},
                ],
            }
        ),
        "IMG_CONTEXT",
    ),
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_each_bad_record_names_file_and_line(tiny, tmp_path, reason):
    line, message = CASES[reason]
    path = _write(tmp_path, line)
    with pytest.raises(DataError) as err:
        scan_for(tiny, path, 512)
    assert (
        f"{path}:2: " in str(err.value)
        and message in str(err.value)
        and "--skip-bad-records" in str(err.value)
    )
    report = scan_for(tiny, path, 512, skip_bad=True)
    assert len(report.records) == 2 and report.skipped == {reason: 1} and report.total == 3
    assert report.summary() == f"skipped 1 of 3 records (1 {reason})"


def test_gpt_turn_only_and_two_humans(tiny, tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {"conversations": [{"from": "gpt", "value": "b"}]},
        {"conversations": []},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        scan_for(tiny, str(path), 512)
    text = str(err.value)
    assert "3 bad record(s)" in text and "d.jsonl:1: turn 2: two human turns" in text
    assert "d.jsonl:2: turn 1: a gpt turn without a human question" in text and "d.jsonl:3:" in text


def test_oversized_image_hits_the_same_pixel_limit(tiny, tmp_path):
    from tessera.data.scan import scan
    from tessera.image import ImageProcessor

    path = _write(tmp_path, json.dumps(GOOD))
    processor = ImageProcessor.from_config(tiny.config, max_pixels=100)
    with pytest.raises(DataError, match=r"d.jsonl:1: image 1 unreadable: .*max_pixels"):
        scan(path, tiny.tokenizer, processor, 16, 512)


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(read_rows(tmp_path / "none.jsonl"))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match="bin.jsonl: cannot read: not UTF-8"):
        list(read_rows(tmp_path / "bin.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read as Parquet"):
        list(read_rows(tmp_path / "bad.parquet"))
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(DataError, match=r"bad.json:1: not valid JSON"):
        list(read_rows(tmp_path / "bad.json"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        list(read_rows(tmp_path / "d.csv"))


def test_train_stops_before_training_or_skips_and_says_so(tiny, tmp_path, capsys):
    base = save_checkpoint(copy.deepcopy(tiny).float(), tmp_path / "base")
    path = _write(tmp_path, json.dumps({**GOOD, "image": "nowhere.png"}))
    args = [
        "train",
        "sft",
        "--init",
        str(base),
        "--data",
        path,
        "--steps",
        "1",
        "--rows",
        "2",
        "--row-tokens",
        "256",
        "--no-progress",
        "--precision",
        "fp32",
    ]
    with pytest.raises(SystemExit, match=r"d.jsonl:2: image 1 not found"):
        main(args + ["--out", str(tmp_path / "stop")])
    assert not (tmp_path / "stop" / "checkpoints").exists()
    assert main(args + ["--out", str(tmp_path / "skip"), "--skip-bad-records"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("sft: step 1") and "skipped 1 of 3 records (1 missing image)" in last
    scan = json.loads((tmp_path / "skip" / "data_scan.json").read_text())
    assert scan["skipped"] == {"missing image": 1} and scan["used"] == 2


def test_data_on_a_world_only_stage_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="still reads only the world"):
        main(["train", "pretrain", "--data", "x.jsonl", "--out", str(tmp_path)])


def test_text_only_data_trains(tiny, tmp_path):
    base = save_checkpoint(copy.deepcopy(tiny).float(), tmp_path / "base")
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(
            json.dumps({"question": f"{i} plus 1?", "answer": str(i + 1)}) + "\n" for i in range(4)
        )
    )
    assert (
        main(
            [
                "train",
                "sft",
                "--init",
                str(base),
                "--data",
                str(path),
                "--out",
                str(tmp_path / "run"),
                "--steps",
                "1",
                "--rows",
                "2",
                "--row-tokens",
                "128",
                "--no-progress",
            ]
        )
        == 0
    )
