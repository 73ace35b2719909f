"""A Conversation → token ids and loss mask, given each image's visual-token count.

The text is exactly what `ChatTokenizer.build_example` and `tessera.train.data.encode_turns` make
for the world's
samples (the first turn's prompt through `<|im_start|>assistant\\n`, plus the empty think block when
the answer
does not think; each later turn appended), so a world sample read back from exported files encodes
to the same
ids. `<image>` placeholders become the images' `<img>…</img>` blocks where they stand; without
placeholders the
blocks go before the first question (`Image-1: …` for several), as InternVL does.
"""

from __future__ import annotations

from collections.abc import Sequence

from tessera.chat import EMPTY_THINK, IM_END, IM_START
from tessera.data.records import IMAGE_PLACEHOLDER, Conversation, DataError


def user_texts(tokenizer, questions: Sequence[str], image_tokens: Sequence[int]) -> list[str]:
    """Each turn's user text with the image blocks in place (`<image>` placeholders, else before the
    first)."""
    if not any(IMAGE_PLACEHOLDER in q for q in questions):
        first = tokenizer.user_text(questions[0], image_tokens) if image_tokens else questions[0]
        return [first, *questions[1:]]
    blocks = iter(tokenizer.image_block(n) for n in image_tokens)
    out = []
    for q in questions:
        parts = q.split(IMAGE_PLACEHOLDER)
        out.append(parts[0] + "".join(next(blocks) + p for p in parts[1:]))
    return out


def encode_ids(
    tokenizer, conv: Conversation, image_tokens: Sequence[int]
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask): loss on every answer and its `<|im_end|>`."""
    if len(image_tokens) != len(conv.images):
        raise ValueError(
            f"{conv.where}: {len(conv.images)} images but {len(image_tokens)} token counts"
        )
    users = user_texts(tokenizer, [t.question for t in conv.turns], image_tokens)
    system = tokenizer.system if conv.system is None else conv.system
    ids: list[int] = []
    mask: list[int] = []
    for k, (user, turn) in enumerate(zip(users, conv.turns)):
        think = "" if turn.thinking else EMPTY_THINK
        if k == 0:
            text = f"{IM_START}system\n{system}{IM_END}\n" if system else ""
            text += f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{think}"
        else:
            text = f"\n{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{think}"
        prompt = tokenizer.encode(text)
        target = tokenizer.encode(turn.answer) + [tokenizer.im_end_id]
        ids += prompt + target
        mask += [0] * len(prompt) + [1] * len(target)
    try:
        tokenizer.check_image_tokens(ids, image_tokens)
    except ValueError as e:
        raise DataError(f"{conv.where}: {e}", "image tokens in the text") from None
    return ids, mask


def prompt_ids(
    tokenizer,
    question: str,
    image_tokens: Sequence[int],
    thinking: bool = False,
    system: str | None = None,
) -> list[int]:
    """The prompt of a one-turn question (for generation), placeholders handled as in training."""
    user = user_texts(tokenizer, [question], image_tokens)[0]
    system = tokenizer.system if system is None else system
    text = f"{IM_START}system\n{system}{IM_END}\n" if system else ""
    text += f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n" + (
        "" if thinking else EMPTY_THINK
    )
    ids = tokenizer.encode(text)
    tokenizer.check_image_tokens(ids, image_tokens)
    return ids
