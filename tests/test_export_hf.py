"""`tessera convert --to hf` / `--to official` folders as transformers reads them: the tokenizer
keeps our ids and stop token, the chat template renders Tessera's prompt character for character,
the image processor gives our tiles, and the model loads with no unexpected keys and gives our
logits in float32 — on the shipped checkpoints
(`checkpoints/tiny` is Flash: its hf export leaves the router out and says so)."""

import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tessera
from tessera.chat import IMG_CONTEXT, ChatTokenizer, build_tokenizer, fallback_corpus
from tessera.cli import main as cli
from tessera.config import preset
from tessera.image import ImageProcessor
from tessera.model import hf_export
from tessera.model.checkpoint import load_checkpoint, load_config

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TINY, TINY_SFT = ROOT / "checkpoints/tiny", ROOT / "checkpoints/tiny-sft"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: folder}: tiny (Flash) → hf, tiny-sft → hf, tiny-sft → official, via the CLI."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, src, to in (
        ("tiny-hf", TINY, "hf"),
        ("sft-hf", TINY_SFT, "hf"),
        ("sft-official", TINY_SFT, "official"),
    ):
        assert cli(["convert", str(src), str(root / name), "--to", to]) == 0
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def ours():
    return ChatTokenizer.from_file(TINY / "tokenizer.json")


def strings(n: int = 400, seed: int = 0) -> list[str]:
    """Prompts, answers and noise: words, digit runs, whitespace runs, punctuation, non-ASCII,
    special tokens."""
    rng = random.Random(seed)
    pieces = [
        "what",
        " is",
        " the",
        " colour",
        "Colour",
        " of",
        "  ",
        "\n",
        "\n\n",
        " \n ",
        "\t",
        "123",
        "4567",
        " 89",
        "?",
        "!",
        ".",
        ",",
        "'s",
        "'ll",
        " (x)",
        "[[1,2]]",
        "é",
        "ü",
        "日本",
        "😀",
        " ",
        "-",
        "_",
        "<|im_start|>",
        "<|im_end|>",
        "<IMG_CONTEXT>",
        "<img>",
        "</img>",
        "<think>",
        "</think>",
        "<box>",
        "Image-1: ",
        "ABC",
        " label",
        "x=3.5",
        "    indented",
        "\r\n",
        "...",
        "''",
        '"q"',
    ]
    out = ["hello world 12345", "ünïcode 😀 text", " leading space", "trailing space ", ""]
    for _ in range(n):
        out.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    return out


# ---- tokenizer
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-hf", "sft-official"])
def test_auto_tokenizer_keeps_our_ids_and_stop_token(exported, ours, name):
    tok = transformers.AutoTokenizer.from_pretrained(exported[name], trust_remote_code=True)
    for s in strings():
        assert tok(s)["input_ids"] == ours.encode(s), repr(s)
        assert tok.decode(ours.encode(s)) == ours.decode(ours.encode(s), skip_special_tokens=False)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == ours.im_end_id
    assert tok.pad_token_id == ours.pad_id
    assert (tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id) == (
        ours.img_start_id,
        ours.img_end_id,
        ours.img_context_id,
    )
    gen = json.loads((exported[name] / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted({ours.im_end_id, ours.pad_id})


# ---- chat template
# ------------------------------------------------------------------------------------


def image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def conversations():
    """(OpenAI-style messages, Tessera's (system, turns), images in the conversation, thinking)."""
    img, txt = {"type": "image"}, lambda t: {"type": "text", "text": t}
    return [
        (
            [{"role": "user", "content": [img, txt("What colour is the circle?")]}],
            (None, [("user", "What colour is the circle?", [0])]),
            1,
            False,
        ),
        (
            [{"role": "user", "content": "How many shapes?"}],
            (None, [("user", "How many shapes?", [])]),
            0,
            True,
        ),
        (
            [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": [txt("Q?"), img]},
            ],
            ("Answer in one word.", [("user", "Q?", [0])]),
            1,
            True,
        ),
        (
            [
                {"role": "system", "content": ""},
                {"role": "user", "content": [img, img, txt("Compare.")]},
            ],
            ("", [("user", "Compare.", [0, 1])]),
            2,
            False,
        ),
        (
            [
                {"role": "user", "content": [img, txt("Read the label.")]},
                {"role": "assistant", "content": "<think>\nit says 42\n</think>\n\n42"},
                {"role": "user", "content": [txt("And this one?"), txt("Be brief."), img]},
            ],
            (
                None,
                [
                    ("user", "Read the label.", [0]),
                    ("assistant", "42", []),
                    ("user", "And this one?\nBe brief.", [1]),
                ],
            ),
            2,
            False,
        ),
        (
            [
                {"role": "developer", "content": [txt("a")]},
                {"role": "system", "content": "b"},
                {"role": "user", "content": "hi"},
            ],
            ("a\nb", [("user", "hi", [])]),
            0,
            True,
        ),
    ]


@pytest.mark.parametrize("case", range(len(conversations())))
def test_chat_template_renders_tesseras_prompt(exported, ours, case):
    messages, (system, turns), n_images, thinking = conversations()[case]
    counts = [16 * (i + 1) for i in range(n_images)]
    want = ours.render(turns, counts, thinking, system)
    for name, placeholder in (("tiny-hf", IMG_CONTEXT), ("sft-official", "<image>")):
        tok = transformers.AutoTokenizer.from_pretrained(exported[name], trust_remote_code=True)
        text = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        assert text.count(placeholder) == n_images
        parts = text.split(placeholder)  # each placeholder becomes that image's <img>…</img> block
        got = parts[0] + "".join(ours.image_block(c) + p for c, p in zip(counts, parts[1:]))
        assert got == want


@pytest.fixture(scope="module")
def harmony_folder(tmp_path_factory):
    """A GPT-OSS (Harmony template) tokenizer with the export's tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("harmony")
    tok = build_tokenizer(fallback_corpus(), 512, template="internvl3_5_gpt_oss")
    tok.save(folder / "tokenizer.json")
    config = preset("tiny")
    tok_cfg = hf_export.tokenizer_config(tok, config)
    tok_cfg["chat_template"] = hf_export.chat_template(IMG_CONTEXT, tok.system, harmony=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return folder, ChatTokenizer.from_file(
        folder / "tokenizer.json", template="internvl3_5_gpt_oss"
    )


@pytest.mark.parametrize("case", range(len(conversations())))
def test_harmony_chat_template_renders_tesseras_gpt_oss_prompt(harmony_folder, case):
    folder, ours = harmony_folder
    messages, (system, turns), n_images, thinking = conversations()[case]
    counts = [16 * (i + 1) for i in range(n_images)]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|return|>"
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    parts = text.split(IMG_CONTEXT)
    got = parts[0] + "".join(ours.image_block(c) + p for c, p in zip(counts, parts[1:]))
    assert got == ours.render(turns, counts, thinking, system)


# ---- image processor and model
# ------------------------------------------------------------------------


def test_image_processor_gives_our_tiles_and_token_counts(exported):
    config, _ = load_config(exported["tiny-hf"])
    proc = transformers.AutoImageProcessor.from_pretrained(exported["tiny-hf"])
    images = [image(300, 100, 0), image(112, 112, 1), image(90, 400, 2), image(640, 480, 3)]
    mine = ImageProcessor.from_config(config)(images)
    theirs = proc(images=images, return_tensors="pt")
    assert theirs["num_patches"].tolist() == mine.tiles_per_image
    assert torch.equal(theirs["pixel_values"], mine.pixel_values)
    seq = json.loads((exported["tiny-hf"] / "processor_config.json").read_text())[
        "image_seq_length"
    ]
    assert seq == config.tokens_per_tile == 16


def test_auto_processor_expands_images_to_our_prompt(exported, ours):
    pytest.importorskip(
        "torchvision"
    )  # transformers' InternVL video processor needs it (the vLLM venv has it)
    proc = transformers.AutoProcessor.from_pretrained(exported["tiny-hf"])
    messages, (system, turns), _, thinking = conversations()[3]
    images = [image(300, 100, 0), image(112, 112, 1)]
    config, _ = load_config(exported["tiny-hf"])
    counts = [
        t * config.tokens_per_tile
        for t in ImageProcessor.from_config(config)(images).tiles_per_image
    ]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = proc(images=images, text=[text], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == ours.encode(ours.render(turns, counts, thinking, system))


def test_flash_export_is_the_full_resolution_model_with_one_note(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert cli(["convert", str(TINY), str(tmp_path / "hf"), "--to", "hf"]) == 0
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "left out the Flash router" in notes[0] and "tessera and official" in notes[0]
    config, layout = load_config(tmp_path / "hf")
    assert layout == "hf" and not config.flash.enabled
    names = set(json.loads((tmp_path / "hf/config.json").read_text()))
    assert not {"flash_relative_threshold", "flash_absolute_threshold"} & names
    assert cli(["convert", str(TINY), str(tmp_path / "keep"), "--to", "hf", "--keep-flash"]) == 0
    assert load_config(tmp_path / "keep")[0].flash.enabled


@pytest.mark.parametrize("name, src", [("tiny-hf", TINY), ("sft-hf", TINY_SFT)])
def test_auto_model_loads_cleanly_and_gives_our_logits(exported, ours, name, src):
    theirs, info = transformers.AutoModelForImageTextToText.from_pretrained(
        exported[name], dtype=torch.float32, output_loading_info=True
    )
    assert type(theirs).__name__ == "InternVLForConditionalGeneration"
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"]
    model = load_checkpoint(src, dtype=torch.float32)
    pixels = ImageProcessor.from_config(model.config)([image(300, 100, 5)])
    t = pixels.tiles_per_image[0] * model.config.tokens_per_tile
    ids = torch.tensor([ours.build_prompt("What colour is the circle?", [t])])
    with torch.no_grad():
        a = model(ids, pixel_values=pixels.pixel_values)
        b = theirs.eval()(input_ids=ids, pixel_values=pixels.pixel_values).logits
    assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-4


def test_official_export_reads_with_trust_remote_code(exported):
    folder = exported["sft-official"]
    raw = json.loads((folder / "config.json").read_text())
    assert raw["auto_map"]["AutoConfig"] == "configuration_internvl_chat.InternVLChatConfig"
    cfg = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(cfg).__name__ == "InternVLChatConfig" and cfg.llm_config.model_type == "qwen3"
    ours_cfg, layout = load_config(folder)
    assert layout == "official"
    assert cfg.get_text_config().hidden_size == ours_cfg.language.hidden_size
    assert cfg.vision_config.image_size == ours_cfg.vision.image_size
    assert (cfg.min_dynamic_patch, cfg.max_dynamic_patch) == (
        ours_cfg.min_tiles,
        ours_cfg.max_tiles,
    )
    again = cfg.to_dict()  # what a loader writes back
    assert again["llm_config"]["architectures"] == ["Qwen3ForCausalLM"]
    assert load_checkpoint(folder).config == tessera.load(TINY_SFT).config
    assert re.search(
        r"^from transformers import", (folder / "configuration_internvl_chat.py").read_text(), re.M
    )
