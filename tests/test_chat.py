"""Chat template, image-token expansion, label masks and thinking format."""

import pytest

from tessera.chat import (
    EMPTY_THINK,
    IMG_CONTEXT,
    SPECIAL_TOKENS,
    ChatTokenizer,
    TokenizerError,
    build_tokenizer,
    fallback_corpus,
)


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return build_tokenizer(fallback_corpus() * 5, vocab_size=512)


def test_special_token_ids_are_fixed(tok):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.tokenizer.token_to_id(t) == i
    assert tok.img_context_id == 3


def test_prompt_expands_each_image_with_its_real_count(tok):
    ids = tok.build_prompt("how many circles", [5, 2])
    text = tok.decode(ids, skip_special_tokens=False)
    assert ids.count(tok.img_context_id) == 7
    assert (
        f"Image-1: <img>{IMG_CONTEXT * 5}</img>\nImage-2: <img>{IMG_CONTEXT * 2}</img>\nhow many circles"
        in text
    )
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n" + EMPTY_THINK)


def test_thinking_on_leaves_the_think_block_to_the_model(tok):
    text = tok.decode(tok.build_prompt("q", [1], thinking=True), skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")


def test_loss_mask_covers_exactly_the_answer_and_im_end(tok):
    ex = tok.build_example("what colour", "red", [4])
    answer_ids = tok.encode("red") + [tok.im_end_id]
    assert len(ex.input_ids) == len(ex.loss_mask)
    assert [i for i, m in zip(ex.input_ids, ex.loss_mask) if m] == answer_ids
    assert ex.loss_mask[-len(answer_ids) :] == [1] * len(answer_ids)
    assert sum(ex.loss_mask) == len(answer_ids)


def test_thinking_example_trains_on_the_think_block(tok):
    answer = "<think>\n3 plus 4 is 7\n</think>\n\n7"
    ex = tok.build_example("total", answer, [1], thinking=True)
    trained = [i for i, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert trained[0] == tok.think_id and trained[-1] == tok.im_end_id
    assert tok.final_answer(tok.decode(trained[:-1], skip_special_tokens=False)) == "7"


def test_digits_are_single_tokens_and_text_round_trips(tok):
    ids = tok.encode("4096 circles")
    assert tok.decode(ids) == "4096 circles"
    assert [tok.decode([i]) for i in ids[:4]] == ["4", "0", "9", "6"]


def test_image_tokens_inside_the_question_are_caught(tok):
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        tok.build_prompt(f"sneaky {IMG_CONTEXT}", [2])


def test_tokenizer_file_errors(tmp_path, tok):
    with pytest.raises(TokenizerError, match="no tokenizer"):
        ChatTokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer"):
        ChatTokenizer.from_file(tmp_path)
    tok.save(tmp_path)
    assert ChatTokenizer.from_file(tmp_path).encode("red circle") == tok.encode("red circle")


# ---- internvl3_5_gpt_oss (Harmony-style) -------------------------------------------------------------


@pytest.fixture(scope="module")
def harmony() -> ChatTokenizer:
    return build_tokenizer(fallback_corpus() * 5, vocab_size=512, template="internvl3_5_gpt_oss")


def test_harmony_prompt_follows_the_official_template(harmony):
    from tessera.chat import HARMONY_SYSTEM

    text = harmony.decode(harmony.build_prompt("how many circles", [2]), skip_special_tokens=False)
    assert text == (
        f"<|start|>system<|message|>{HARMONY_SYSTEM}<|end|><|start|>user<|message|>"
        f"<img>{IMG_CONTEXT * 2}</img>\nhow many circles<|end|><|start|>assistant"
        "<|channel|>final<|message|>"
    )
    thinking = harmony.decode(
        harmony.build_prompt("q", [], thinking=True, system=""), skip_special_tokens=False
    )
    assert (
        thinking == "<|start|>user<|message|>q<|end|><|start|>assistant"
    )  # the model names its channel


def test_harmony_example_has_loss_after_start_assistant_through_return(harmony):
    ex = harmony.build_example("q", "red", [1], system="")
    ids, mask = ex.input_ids, ex.loss_mask
    first = mask.index(1)
    assert harmony.decode(ids[:first], skip_special_tokens=False).endswith("<|start|>assistant")
    assert (
        harmony.decode(ids[first:], skip_special_tokens=False)
        == "<|channel|>final<|message|>red<|return|>"
    )
    assert all(mask[first:]) and ids[-1] == harmony.im_end_id == harmony.tokenizer.token_to_id(
        "<|return|>"
    )
    assert harmony.im_start_id == harmony.tokenizer.token_to_id("<|start|>")


def test_harmony_final_answer_and_missing_tokens(harmony, tok):
    assert harmony.final_answer("<|channel|>final<|message|> 42 <|return|>") == "42"
    assert harmony.final_answer("42") == "42"
    with pytest.raises(TokenizerError, match=r"<\|start\|>.*internvl3_5_gpt_oss"):
        ChatTokenizer(tok.tokenizer, template="internvl3_5_gpt_oss")
    with pytest.raises(TokenizerError, match="unknown chat template"):
        ChatTokenizer(tok.tokenizer, template="chatml")


def test_checkpoint_loader_attaches_the_config_template(harmony, tmp_path):
    import dataclasses

    from tessera.config import preset
    from tessera.model.checkpoint import load_checkpoint, save_checkpoint
    from tessera.model.vlm import VisionLanguageModel

    config = preset("tiny")
    config = dataclasses.replace(config, template="internvl3_5_gpt_oss")
    model = VisionLanguageModel(config)
    model.tokenizer = harmony
    save_checkpoint(model, tmp_path / "ckpt")
    back = load_checkpoint(tmp_path / "ckpt")
    assert (
        back.tokenizer.template == "internvl3_5_gpt_oss"
        and back.tokenizer.im_end_id == harmony.im_end_id
    )
