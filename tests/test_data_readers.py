"""Every format: InternVL meta JSON (root, repeat_time, length), bare JSONL, JSON lists, Parquet
(paths and
image bytes), multi-image prompts, text-only rows, multi-turn, system turns, pairs and prompts."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tessera.data import DataError
from tessera.data.encode import encode_ids
from tessera.data.internvl import conversation, pair, prompt
from tessera.data.readers import read_rows
from tessera.data.source import Records
from tessera.train.conversations import ConversationStream, scan_for


def _png(path, colour=(200, 10, 10), size=(112, 112)):
    Image.new("RGB", size, colour).save(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_meta_json_resolves_root_and_repeats(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "a.png")
    rows = [
        {
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": f"<image>\nq{i}"},
                {"from": "gpt", "value": f"a{i}"},
            ],
        }
        for i in range(4)
    ]
    _jsonl(tmp_path / "ann.jsonl", rows)
    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps(
            {"mine": {"root": "imgs", "annotation": "ann.jsonl", "repeat_time": 1.5, "length": 4}}
        )
    )
    read = [conversation(r) for r in read_rows(meta)]
    assert [c.turns[0].answer for c in read] == ["a0", "a1", "a2", "a3", "a0", "a1"]
    assert read[0].images == (str(tmp_path / "imgs" / "a.png"),)
    assert read[0].where == f"{tmp_path / 'ann.jsonl'}:1"
    meta.write_text(
        json.dumps({"mine": {"root": "imgs", "annotation": "ann.jsonl", "repeat_time": 0.5}})
    )
    assert len(list(read_rows(meta))) == 2
    meta.write_text(json.dumps({"mine": {"root": "imgs", "annotation": "ann.jsonl", "length": 9}}))
    with pytest.raises(DataError, match="declares length 9"):
        list(read_rows(meta))


def test_multi_image_text_only_multi_turn_and_system(tiny, tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", (0, 0, 200), (224, 112))
    rows = [
        {
            "image": ["a.png", "b.png"],
            "conversations": [
                {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nWhich is blue?"},
                {"from": "gpt", "value": "the second"},
            ],
        },
        {
            "conversations": [
                {"from": "human", "value": "What is 2 plus 2?"},
                {"from": "gpt", "value": "4"},
            ]
        },
        {
            "image": "a.png",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "<think>\nit is red\n</think>\n\nyes"},
            ],
        },
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    report = scan_for(tiny, str(path), 2048)
    multi, text, turns = report.records
    assert (
        len(multi.images) == 2
        and text.images == ()
        and len(turns.turns) == 2
        and turns.system == "Be brief."
    )
    assert turns.turns[1].thinking and not turns.turns[0].thinking
    stream = ConversationStream(
        Records(tuple(report.records), shuffle=False), tiny.tokenizer, tiny.config
    )
    e = stream(0)
    tpt = tiny.config.tokens_per_tile
    assert e.image_tokens == [tpt, 3 * tpt]  # 1 tile; 2 tiles + thumbnail
    decoded = tiny.tokenizer.decode(e.input_ids, skip_special_tokens=False)
    assert (
        "Image-1: <img>" in decoded
        and "Image-2: <img>" in decoded
        and decoded.count("<IMG_CONTEXT>") == 4 * tpt
    )
    e = stream(1)
    assert e.image_tokens == [] and e.pixel_values.shape[0] == 0
    e = stream(2)
    decoded = tiny.tokenizer.decode(e.input_ids, skip_special_tokens=False)
    assert "Be brief." in decoded and decoded.count("<|im_start|>assistant") == 2
    targets = tiny.tokenizer.decode(
        [t for t, m in zip(e.input_ids, e.loss_mask) if m], skip_special_tokens=False
    )
    assert targets == "red<|im_end|><think>\nit is red\n</think>\n\nyes<|im_end|>"


def test_placeholder_free_rows_put_the_image_first_like_the_world(tiny, tmp_path):
    _png(tmp_path / "a.png")
    with_ph = conversation(
        next(
            read_rows(
                _jsonl(
                    tmp_path / "x.jsonl",
                    [
                        {
                            "image": "a.png",
                            "conversations": [
                                {"from": "human", "value": "<image>\nQ?"},
                                {"from": "gpt", "value": "A"},
                            ],
                        }
                    ],
                )
            )
        )
    )
    without = conversation(
        next(
            read_rows(
                _jsonl(
                    tmp_path / "y.jsonl",
                    [
                        {
                            "image": "a.png",
                            "conversations": [
                                {"from": "human", "value": "Q?"},
                                {"from": "gpt", "value": "A"},
                            ],
                        }
                    ],
                )
            )
        )
    )
    ids, mask = encode_ids(tiny.tokenizer, with_ph, [16])
    example = tiny.tokenizer.build_example("Q?", "A", [16])
    assert ids == example.input_ids and mask == example.loss_mask
    assert encode_ids(tiny.tokenizer, without, [16]) == (ids, mask)


def test_json_list_and_parquet_with_paths_and_bytes(tmp_path):
    _png(tmp_path / "a.png")
    buf = io.BytesIO()
    Image.new("RGB", (112, 112), (1, 2, 3)).save(buf, format="PNG")
    rows = [
        {"image": "a.png", "question": "Q1", "answer": "A1", "category": "c"},
        {
            "image": "a.png",
            "conversations": [{"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}],
        },
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    got = [prompt(r) for r in read_rows(tmp_path / "d.json")]
    assert [(p.question, p.answer, p.category) for p in got] == [
        ("Q1", "A1", "c"),
        ("Q2", "A2", ""),
    ]
    table = pa.table(
        {
            "image": [{"bytes": buf.getvalue(), "path": None}, {"bytes": None, "path": "a.png"}],
            "question": ["Q1", "Q2"],
            "answer": ["A1", "A2"],
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    got = [prompt(r) for r in read_rows(tmp_path / "d.parquet")]
    assert got[0].images == (buf.getvalue(),) and got[1].images == (str(tmp_path / "a.png"),)
    assert got[1].where.endswith("d.parquet:2")


def test_pairs_mmpr_style(tmp_path):
    path = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"image": "a.png", "question": "Q", "chosen": "good", "rejected": "bad"},
            {"image": "a.png", "question": "Q", "chosen": "same", "rejected": "same"},
            {"image": "a.png", "question": "Q", "chosen": "x"},
        ],
    )
    rows = list(read_rows(path))
    p = pair(rows[0])
    assert (p.question, p.chosen, p.rejected) == ("Q", "good", "bad")
    with pytest.raises(DataError, match=r"p.jsonl:2: chosen and rejected are the same"):
        pair(rows[1])
    with pytest.raises(DataError, match=r"p.jsonl:3: a preference pair needs"):
        pair(rows[2])


def test_records_shuffle_each_epoch_deterministically():
    src = Records(tuple(range(10)), seed=1)
    first = [src(i) for i in range(10)]
    second = [src(i) for i in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert [Records(tuple(range(10)), seed=1)(i) for i in range(20)] == first + second
    assert [Records(tuple(range(3)), shuffle=False)(i) for i in range(4)] == [0, 1, 2, 0]
