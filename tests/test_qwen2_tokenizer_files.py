"""Checkpoints that ship Qwen2's vocab.json + merges.txt instead of tokenizer.json load their tokenizer.

The tokenizer we build from those files must give the ids transformers' Qwen2 tokenizer gives.
"""

from __future__ import annotations

import json
import random

import pytest
import transformers

from tessera.chat import ChatTokenizer, TokenizerError, qwen2_tokenizer
from tessera.model.checkpoint import convert, load_checkpoint, save_checkpoint


def write_qwen2_files(tok: ChatTokenizer, folder) -> None:
    """Our tokenizer.json as the files of a Qwen2 release: the BPE vocabulary and merges, and the
    special tokens in tokenizer_config.json's added_tokens_decoder."""
    data = json.loads(tok.tokenizer.to_str())
    special = {t["content"]: t["id"] for t in data["added_tokens"]}
    vocab = data["model"]["vocab"]  # ours holds the special tokens first (Qwen2's come after)
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    decoder = {str(i): {"content": t, "special": True} for t, i in special.items()}
    config = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": decoder}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = [
        "the",
        " red",
        "Circle",
        "42",
        "3.5",
        "don't",
        "we'll",
        "\n\n",
        "  ",
        "\t",
        "é",
        "中文",
        "🙂",
        "<img>",
        "<IMG_CONTEXT>",
        "</img>",
        "<think>",
        "?!",
        "x1y2",
        "ABC def",
    ]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(n)] + [
        "What colour is the circle?\n",
        "Image-1: <img></img>\nHow many?  ",
        "   lead",
    ]


@pytest.fixture
def qwen2_folder(tmp_path, tokenizer):
    write_qwen2_files(tokenizer, tmp_path)
    return tmp_path


def test_the_rebuilt_tokenizer_gives_transformers_qwen2_ids(qwen2_folder, tokenizer):
    ours = ChatTokenizer.from_file(qwen2_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(qwen2_folder, use_fast=False)
    assert type(theirs).__name__ == "Qwen2Tokenizer"
    for text in texts():
        want = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text) == want, text
        assert ours.decode(want, skip_special_tokens=False) == theirs.decode(want)
    assert ours.img_context_id == tokenizer.img_context_id
    assert ours.im_end_id == tokenizer.im_end_id


def test_a_checkpoint_with_qwen2_files_loads_its_tokenizer_and_converts(tmp_path, tiny):
    folder = tmp_path / "release"
    save_checkpoint(tiny, folder, layout="hf")
    write_qwen2_files(tiny.tokenizer, folder)
    (folder / "tokenizer.json").unlink()
    model = load_checkpoint(folder)
    prompt = "What colour is the circle?"
    want = tiny.tokenizer.build_prompt(prompt, [16])
    assert model.tokenizer.build_prompt(prompt, [16]) == want
    assert model.config.image_context_token_id == tiny.tokenizer.img_context_id
    convert(folder, tmp_path / "tessera", to="tessera")  # writes the rebuilt tokenizer.json
    assert (tmp_path / "tessera" / "tokenizer.json").is_file()
    assert load_checkpoint(tmp_path / "tessera").tokenizer.build_prompt(prompt, [16]) == want


def test_disagreeing_files_are_a_clear_error(qwen2_folder):
    config = json.loads((qwen2_folder / "tokenizer_config.json").read_text())
    first = min(config["added_tokens_decoder"], key=int)
    config["added_tokens_decoder"][str(int(first) + 5000)] = config["added_tokens_decoder"].pop(
        first
    )
    (qwen2_folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="the files disagree"):
        qwen2_tokenizer(qwen2_folder)
