"""The world through the same door: WorldSource ⇄ WorldStream, and exported files ⇄ the stream."""

import copy

import torch

from tessera.data.readers import read_rows
from tessera.data.world import WorldSource, export
from tessera.train.conversations import ConversationStream, file_stream
from tessera.train.data import WorldStream
from tessera.train.sft import SFTData
from tessera.train.stage import lm_stage
from tessera.train.trainer import TrainConfig, Trainer


def test_world_source_encodes_like_the_world_stream(tiny):
    source = ConversationStream(WorldSource(thinking_prob=0.5, seed=7), tiny.tokenizer, tiny.config)
    stream = WorldStream(tiny.tokenizer, tiny.config, thinking_prob=0.5, seed=7)
    for i in range(6):
        a, b = source(i), stream(i)
        assert a.input_ids == b.input_ids and a.loss_mask == b.loss_mask
        assert torch.equal(a.pixel_values, b.pixel_values) and a.image_tokens == b.image_tokens
        assert a.family == b.family


def test_exported_files_read_back_as_the_same_samples(tiny, tmp_path):
    source = WorldSource({"reasoning": 1.0, "colour": 1.0}, thinking_prob=1.0, seed=3)
    meta = export(source, 8, tmp_path / "world")
    assert len(list(read_rows(meta))) == 8
    files, report = file_stream(tiny, str(meta), 512, shuffle=False)
    live = ConversationStream(source, tiny.tokenizer, tiny.config)
    assert report.num_skipped == 0 and len(report.records) == 8
    assert any(
        conv.turns[0].thinking for conv in report.records
    )  # the thinking chains survive the round trip
    for i in range(8):
        a, b = files(i), live(i)
        assert a.input_ids == b.input_ids and a.loss_mask == b.loss_mask and a.family == b.family
        assert torch.equal(a.pixel_values, b.pixel_values)


def test_training_on_files_and_on_the_stream_reaches_the_same_loss(tiny, tmp_path):
    source = WorldSource(seed=11)
    meta = export(source, 20, tmp_path / "world")  # more than 3 steps read: the files do not cycle
    data = SFTData(rows=2, row_tokens=400, workers=0)
    losses = []
    for kind in ("files", "stream"):
        model = copy.deepcopy(tiny).train()
        if kind == "files":
            make, _ = file_stream(model, str(meta), data.row_tokens, shuffle=False)
        else:
            make = ConversationStream(source, model.tokenizer, model.config)
        stage = lm_stage("sft", model, make, data)
        cfg = TrainConfig(
            steps=3, warmup_steps=1, lr=1e-4, precision="fp32", progress=False, log_every=1
        )
        result = Trainer(model, stage, cfg, tmp_path / kind).fit()
        losses.append([(h["loss"], h["position"]) for h in result.history])
    assert losses[0] == losses[1]
    assert len(losses[0]) == 3


def test_world_export_command(tmp_path, capsys):
    import json

    from tessera.cli import main

    out = tmp_path / "w"
    assert (
        main(
            [
                "world",
                "export",
                "--format",
                "internvl",
                "--n",
                "3",
                "--out",
                str(out),
                "--family",
                "colour",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "annotation.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(
        r["category"] == "colour" and (out / r["image"]).exists() for r in rows
    )
    assert rows[0]["conversations"][0]["value"].startswith("<image>\n")
    assert json.loads((out / "meta.json").read_text())["world"]["length"] == 3
    assert "wrote 3 samples" in capsys.readouterr().out
