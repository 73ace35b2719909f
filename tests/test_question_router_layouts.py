"""The question-aware router in every checkpoint layout: strict tessera loading, official and hf round trips
that keep it bit for bit (and keep its routing decisions), hf exports that leave it out and say so, and
`tessera chat --routing question --show-routing`."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import unit_config
from PIL import Image
from safetensors.torch import load_file, save_file

from tessera.cli import main as cli
from tessera.config import ConfigError
from tessera.model.checkpoint import CheckpointError, load_checkpoint, load_config, save_checkpoint
from tessera.model.vlm import VisionLanguageModel
from tessera.routing import encode_routed

QUESTION = "what is the label of the red diamond?"


def perturb_question_router_(model: VisionLanguageModel, seed: int = 0) -> None:
    """Move the zero-init query_proj and film (and every norm and bias) off their init, so the question router
    decides differently from the released one and a dropped or swapped tensor would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.question_router.named_parameters():
            if name.startswith(("query_proj.", "film.")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def question_model(tokenizer, seed: int = 0) -> VisionLanguageModel:
    """A released-size Flash unit model (the official layout can hold its router) with a trained-looking
    question router, non-default question thresholds and the shared tokenizer."""
    torch.manual_seed(seed)
    model = VisionLanguageModel(unit_config(flash=True, vocab_size=1024, preset="unit"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p))
    model.add_question_router()
    perturb_question_router_(model, seed)
    model.config.flash.question_relative_threshold = 0.3
    model.config.flash.question_absolute_threshold = 0.2
    model.tokenizer = tokenizer
    return model.eval()


def assert_same_weights(a: VisionLanguageModel, b: VisionLanguageModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def routed(model, pixel_values):
    features, decision = encode_routed(
        model, pixel_values, [pixel_values.shape[0]], "question", questions=[QUESTION]
    )
    return features, decision


@pytest.fixture(scope="module")
def model(tokenizer):
    return question_model(tokenizer)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("qr") / "tessera"
    save_checkpoint(model, path)
    return path


def test_the_question_router_is_the_models_own_and_decides_from_the_question(model):
    pv = torch.randn(6, 3, 56, 56)
    _, asked = routed(model, pv)
    _, released = encode_routed(model, pv, [6], "router")
    assert asked.p_compress is not None and not torch.equal(asked.p_compress, released.p_compress)
    _, other = encode_routed(model, pv, [6], "question", questions=["what colour is the square?"])
    assert not torch.equal(other.p_compress, asked.p_compress)


def test_tessera_layout_saves_and_loads_it_strictly(model, saved):
    flash = json.loads((saved / "config.json").read_text())["flash"]
    assert flash["question_router"] is True
    assert (flash["question_relative_threshold"], flash["question_absolute_threshold"]) == (
        0.3,
        0.2,
    )
    loaded = load_checkpoint(saved)
    assert loaded.config == model.config and loaded.config.flash.question_router
    assert_same_weights(model, loaded)


@pytest.mark.parametrize("via", ["official", "hf"])
def test_round_trip_through_a_released_layout_keeps_it_bit_for_bit(model, saved, tmp_path, via):
    # --keep-flash matters for hf only (without it the hf export leaves the routers out)
    assert cli(["convert", str(saved), str(tmp_path / via), "--to", via, "--keep-flash"]) == 0
    keys = set(load_file(tmp_path / via / "model.safetensors"))
    prefix = "question_router." if via == "official" else "model.question_router."
    mine = {k for k in keys if "question_router" in k}
    assert mine and all(k.startswith(prefix) for k in mine)
    assert prefix + "film.weight" in keys and prefix + "pooling.attn1.in_proj_weight" in keys
    # the released router keeps its layout's names beside it
    assert (
        "gating.gate.1.weight" if via == "official" else "model.gating.gate_proj.weight"
    ) in keys
    config, layout = load_config(tmp_path / via)
    assert layout == via and config == model.config
    assert cli(["convert", str(tmp_path / via), str(tmp_path / "back"), "--to", "tessera"]) == 0
    pv = torch.randn(5, 3, 56, 56)
    before_features, before = routed(model, pv)
    for folder in (via, "back"):
        loaded = load_checkpoint(tmp_path / folder)
        assert loaded.config == model.config, folder
        assert_same_weights(model, loaded)
        features, after = routed(loaded, pv)
        assert torch.equal(after.compress, before.compress), folder
        assert torch.equal(after.p_compress, before.p_compress), folder
        assert torch.equal(features, before_features), folder
    assert 0 < int(before.compress.sum()) < 5  # the decision being compared is not all-or-nothing


def test_keeping_it_in_a_released_layout_says_only_tessera_reads_it(model, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tessera.model.checkpoint"):
        save_checkpoint(model, tmp_path / "official", layout="official")
    [note] = [r.getMessage() for r in caplog.records if "question-aware router" in r.getMessage()]
    assert "question_router.*" in note and "only Tessera reads it" in note and "\n" not in note


def test_hf_export_leaves_it_out_and_names_it(model, saved, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert cli(["convert", str(saved), str(tmp_path / "hf"), "--to", "hf"]) == 0
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "\n" not in notes[0]
    n = sum(k.startswith("question_router.") for k in model.state_dict())
    assert "left out the Flash router" in notes[0]
    assert f"and the question-aware router (question_router.*: {n} tensors" in notes[0]
    assert not any("question_router" in k for k in load_file(tmp_path / "hf/model.safetensors"))
    config, _ = load_config(tmp_path / "hf")
    assert not config.flash.enabled and not config.flash.question_router
    assert not hasattr(load_checkpoint(tmp_path / "hf"), "question_router")


def test_a_flash_model_without_it_stays_plain_in_every_layout(tmp_path, tokenizer):
    torch.manual_seed(0)
    plain = VisionLanguageModel(unit_config(flash=True, vocab_size=1024))
    for layout in ("tessera", "official", "hf"):
        save_checkpoint(plain, tmp_path / layout, layout=layout)
        loaded = load_checkpoint(tmp_path / layout)
        assert loaded.config.flash.enabled and not loaded.config.flash.question_router, layout
        assert not hasattr(loaded, "question_router"), layout


def test_old_config_json_without_the_question_fields_loads(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(VisionLanguageModel(unit_config(flash=True, vocab_size=1024)), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for name in ("question_router", "question_relative_threshold", "question_absolute_threshold"):
        del raw["flash"][name]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    flash = load_checkpoint(tmp_path).config.flash
    assert flash.enabled and not flash.question_router


def _drop_question_weights(folder, prefix: str) -> None:
    file = folder / "model.safetensors"
    state = {k: v for k, v in load_file(file).items() if not k.startswith(prefix)}
    save_file(state, str(file), metadata={"format": "pt"})


def test_config_that_names_it_without_its_weights_fails_loudly(model, tmp_path):
    save_checkpoint(model, tmp_path / "tessera")
    _drop_question_weights(tmp_path / "tessera", "question_router.")
    with pytest.raises(
        CheckpointError, match=r"says flash.question_router .* no question_router\.\*"
    ):
        load_checkpoint(tmp_path / "tessera")
    # official: the embedded tessera_config still names it, the weights were stripped
    save_checkpoint(model, tmp_path / "official", layout="official")
    _drop_question_weights(tmp_path / "official", "question_router.")
    with pytest.raises(CheckpointError, match="no question_router"):
        load_checkpoint(tmp_path / "official")


def test_weights_the_config_does_not_name_fail_loudly(model, tmp_path):
    save_checkpoint(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["flash"]["question_router"] = False
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="weights hold the question-aware router"):
        load_checkpoint(tmp_path)


def test_released_layout_weights_switch_it_on_without_our_config_block(model, tmp_path):
    save_checkpoint(model, tmp_path / "hf", layout="hf")
    raw = json.loads((tmp_path / "hf/config.json").read_text())
    del raw["tessera_config"]
    (tmp_path / "hf/config.json").write_text(json.dumps(raw))
    loaded = load_checkpoint(tmp_path / "hf")
    assert loaded.config.flash.question_router
    assert torch.equal(loaded.question_router.film.weight, model.question_router.film.weight)


def test_question_weights_without_flash_are_refused(model, tmp_path):
    save_checkpoint(model, tmp_path, layout="official")
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["tessera_config"], raw["flash_mode"]
    del raw["flash_relative_threshold"], raw["flash_absolute_threshold"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    _drop_question_weights(tmp_path, ("mlp2.", "pooling_before_gating.", "gating."))
    with pytest.raises(ConfigError, match="question_router needs flash.enabled"):
        load_checkpoint(tmp_path)


# ---- tessera chat --routing question --show-routing ------------------------------------------------------


@pytest.fixture(scope="module")
def chat_ckpts(tmp_path_factory):
    """(tiny checkpoint with a question router, the same without one)."""
    root = tmp_path_factory.mktemp("chat")
    assert cli(["init", "--preset", "tiny", "--out", str(root / "plain"), "--seed", "1"]) == 0
    model = load_checkpoint(root / "plain")
    model.add_question_router()
    perturb_question_router_(model)
    save_checkpoint(model, root / "question")
    image = root / "x.png"
    Image.new("RGB", (300, 120), "red").save(image)
    return root / "question", root / "plain", image


def test_chat_routes_by_the_question_and_draws_it(chat_ckpts, tmp_path, capsys):
    ckpt, _, image = chat_ckpts
    out = tmp_path / "routing.png"
    args = ["chat", str(ckpt), "--image", str(image), QUESTION, "--routing", "question"]
    assert cli([*args, "--show-routing", str(out), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "4 tiles, " in err and " compressed, " in err and "visual tokens]" in err
    assert f"routing picture written to {out}" in err
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > 300


def test_chat_question_routing_without_the_router_is_a_clear_error(chat_ckpts, tmp_path, capsys):
    _, plain, image = chat_ckpts
    out = tmp_path / "routing.png"
    args = ["chat", str(plain), "--image", str(image), QUESTION, "--routing", "question"]
    assert cli([*args, "--show-routing", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no question-aware router" in err
    assert "Traceback" not in err and not out.exists()


def test_show_routing_without_an_image_is_a_clear_error(chat_ckpts, tmp_path, capsys):
    ckpt, _, _ = chat_ckpts
    assert cli(["chat", str(ckpt), QUESTION, "--show-routing", str(tmp_path / "r.png")]) == 2
    assert "give one with --image" in capsys.readouterr().err
