"""InternVL's fine-tuning rows ⇄ Conversations, and the preference-pair and prompt rows of MPO and
GSPO.

A conversation row (InternVL's format):
    {"image": PATH | [PATHS] (optional: text-only), "conversations": [{"from": "human", "value":
    "<image>\\n..."},
     {"from": "gpt", "value": "..."}, ...], "category": "..." (optional)}
with an optional leading {"from": "system"} turn, and `Image-1: <image>\\nImage-2: <image>\\n...`
for several images.
A prompt row {"image", "question", "answer"} reads as a one-turn conversation too. A pair row
(MMPR):
{"image", "question", "chosen", "rejected"}. Parquet image cells may hold bytes ({"bytes": ...,
"path": ...}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tessera.data.readers import Row
from tessera.data.records import (
    IMAGE_PLACEHOLDER,
    Conversation,
    DataError,
    PreferencePair,
    PromptRecord,
    Turn,
)

HUMAN, GPT, SYSTEM = ("human", "user"), ("gpt", "assistant"), ("system",)


def _images(row: Row) -> tuple[Any, ...]:
    value = row.data.get("image", row.data.get("images"))
    if value is None or value == "" or value == []:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict) and item.get("bytes"):
            out.append(bytes(item["bytes"]))
        elif isinstance(item, dict) and item.get("path"):
            out.append(_resolve(row, item["path"]))
        elif isinstance(item, (bytes, bytearray)):
            out.append(bytes(item))
        elif isinstance(item, str) and item:
            out.append(_resolve(row, item))
        else:
            raise DataError(
                f"{row.where}: image entries must be paths (or Parquet image cells), "
                f"got {item!r:.60}"
            )
    return tuple(out)


def _resolve(row: Row, path: str) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else row.root / p)


def _text(row: Row, key: str) -> str:
    value = row.data.get(key)
    if not isinstance(value, str):
        raise DataError(f"{row.where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _category(row: Row) -> str:
    value = row.data.get("category", row.data.get("family", ""))
    return str(value) if value is not None else ""


def conversation(row: Row) -> Conversation:
    """The row as a Conversation; DataError (naming file:line) when it is not one."""
    if row.error:
        raise DataError(f"{row.where}: {row.error}")
    data = row.data
    if "conversations" not in data:
        if "question" in data and "answer" in data:
            return Conversation(
                _images(row),
                (Turn(_text(row, "question"), _text(row, "answer")),),
                category=_category(row),
                where=row.where,
            )
        raise DataError(
            f"{row.where}: no 'conversations' (nor 'question' and 'answer'); keys: {sorted(data)}"
        )
    turns_raw = data["conversations"]
    if not isinstance(turns_raw, list) or not all(isinstance(t, dict) for t in turns_raw):
        raise DataError(
            f"{row.where}: 'conversations' must be a list of {{'from', 'value'}} objects"
        )
    system = None
    if turns_raw and turns_raw[0].get("from") in SYSTEM:
        system, turns_raw = str(turns_raw[0].get("value", "")), turns_raw[1:]
    turns, question = [], None
    for k, t in enumerate(turns_raw):
        who, value = t.get("from"), t.get("value")
        if not isinstance(value, str):
            raise DataError(f"{row.where}: turn {k + 1} has no string 'value'")
        if who in HUMAN:
            if question is not None:
                raise DataError(
                    f"{row.where}: turn {k + 1}: two human turns in a row (each needs a gpt answer)"
                )
            question = value
        elif who in GPT:
            if question is None:
                raise DataError(
                    f"{row.where}: turn {k + 1}: a gpt turn without a human question before it"
                )
            turns.append(Turn(question, value))
            question = None
        else:
            raise DataError(
                f"{row.where}: turn {k + 1}: unknown speaker {who!r} (use human, gpt or system)"
            )
    if not turns:
        raise DataError(
            f"{row.where}: the conversation has no gpt turn (nothing to learn)", "no gpt turn"
        )
    if question is not None:
        raise DataError(f"{row.where}: the last human turn has no gpt answer", "no gpt turn")
    images = _images(row)
    placeholders = sum(t.question.count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders and placeholders != len(images):
        raise DataError(
            f"{row.where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images"
        )
    return Conversation(images, tuple(turns), system, _category(row), row.where)


def prompt(row: Row) -> PromptRecord:
    """A question with its reference answer: {"image", "question", "answer"} or a conversation's
    first turn."""
    if row.error:
        raise DataError(f"{row.where}: {row.error}")
    conv = conversation(row)
    turn = conv.turns[0]
    extra = {k: v for k, v in row.data.items() if k not in ("image", "images", "conversations")}
    return PromptRecord(conv.images, turn.question, turn.answer, conv.category, row.where, extra)


def pair(row: Row) -> PreferencePair:
    """An MMPR preference row: {"image", "question" (or "prompt"), "chosen", "rejected"}."""
    if row.error:
        raise DataError(f"{row.where}: {row.error}")
    missing = [k for k in ("chosen", "rejected") if k not in row.data]
    if missing or not ("question" in row.data or "prompt" in row.data):
        raise DataError(
            f"{row.where}: a preference pair needs question, chosen and rejected; "
            f"keys: {sorted(row.data)}"
        )
    question = _text(row, "question" if "question" in row.data else "prompt")
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise DataError(f"{row.where}: chosen and rejected are the same answer")
    return PreferencePair(_images(row), question, chosen, rejected, row.where)


def to_row(conv: Conversation, image_paths: list[str]) -> dict[str, Any]:
    """The InternVL row of `conv`, its images written at `image_paths` (relative to the dataset
    root)."""
    turns = []
    if conv.system is not None:
        turns.append({"from": "system", "value": conv.system})
    placeholders = sum(t.question.count(IMAGE_PLACEHOLDER) for t in conv.turns)
    for k, t in enumerate(conv.turns):
        question = t.question
        if k == 0 and image_paths and not placeholders:
            if len(image_paths) == 1:
                question = f"{IMAGE_PLACEHOLDER}\n{question}"
            else:
                question = (
                    "".join(
                        f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(len(image_paths))
                    )
                    + question
                )
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": t.answer}]
    row: dict[str, Any] = {}
    if image_paths:
        row["image"] = image_paths[0] if len(image_paths) == 1 else list(image_paths)
    row["conversations"] = turns
    if conv.category:
        row["category"] = conv.category
    return row
