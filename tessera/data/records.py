"""The records every stage reads: a conversation (images, turns, optional thinking), a preference
pair, a prompt.

An image is a path (resolved against its dataset's root, opened lazily in the data worker) or an
in-memory
PIL image (the world's). `where` names the file and line a record came from, for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tessera.chat import THINK

IMAGE_PLACEHOLDER = "<image>"


def question_text(question: str) -> str:
    """A turn's question without its image placeholders: the text the question-aware router reads."""
    return " ".join(question.replace(IMAGE_PLACEHOLDER, " ").split())


class DataError(ValueError):
    """A record or file that cannot be used; the message starts with `file:line`. `reason` names the
    kind of
    problem (what `--skip-bad-records` counts)."""

    def __init__(self, message: str, reason: str = "malformed record"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Turn:
    """One question and its answer. With `thinking`, the answer is the whole
    `<think>\\n…\\n</think>\\n\\nfinal`."""

    question: str
    answer: str

    @property
    def thinking(self) -> bool:
        return self.answer.lstrip().startswith(THINK)


@dataclass(frozen=True)
class Conversation:
    """Images (paths or PIL images) and the turns about them. The questions may hold `<image>`
    placeholders
    (InternVL's convention); without any, the images go before the first question."""

    images: tuple[Any, ...]
    turns: tuple[Turn, ...]
    system: str | None = None  # None: the tokenizer's default system prompt
    category: str = ""
    where: str = ""  # file:line

    def __post_init__(self) -> None:
        if not self.turns:
            raise DataError(f"{self.where}: a conversation needs at least one question and answer")


@dataclass(frozen=True)
class PreferencePair:
    """MMPR-style: one question about the images, a preferred and a rejected answer."""

    images: tuple[Any, ...]
    question: str
    chosen: str
    rejected: str
    where: str = ""


@dataclass(frozen=True)
class PromptRecord:
    """A question with its reference answer, for GSPO rollouts and `tessera eval --data`."""

    images: tuple[Any, ...]
    question: str
    answer: str
    category: str = ""
    where: str = ""
    extra: dict[str, Any] = field(
        default_factory=dict, compare=False
    )  # the row's other fields, for a reward
