"""Exact verifiers: is a model's text a correct answer to a world question?

Accepted forms of a correct answer X (any family): "X", "x" (case), surrounding whitespace, a trailing
period / exclamation mark, quotes or markdown emphasis around it, "The answer is X", "Answer: X",
"Final answer: X", and any of these after a think block (`<think>…</think>` then the answer: only the text
after the last `</think>` is judged). A spatial answer may also read "to the left", "on the left", "left of it".
Rejected: anything else, including an unfinished think block, several candidates ("47 or 48"), extra digits
("470"), a number with leading zeros where the answer has none, and spelled-out numbers ("forty-seven" for
47): answers are exact strings. Descriptions (`describe`) are compared the same way, whole.
"""

from __future__ import annotations

import re

from tessera.world.tasks import ALL_FAMILIES

THINK, END_THINK = "<think>", "</think>"
_PREFIX = re.compile(
    r"^(?:so,?\s+)?(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*", re.IGNORECASE
)
_SPATIAL = re.compile(
    r"^(?:to the |on the |)(left|right)(?: of (?:it|them|the .+))?$"
    r"|^(above|below)(?: (?:it|them|the .+))?$"
)


def final_text(prediction: str) -> str | None:
    """The part of a prediction that is judged: the text after the last `</think>` when there is a think block,
    else the whole text. None when a think block was opened but never closed (no final answer)."""
    if END_THINK in prediction:
        return prediction.rsplit(END_THINK, 1)[1]
    if THINK in prediction:
        return None
    return prediction


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace, drop wrapping quotes/emphasis, an answer prefix and trailing punctuation."""
    t = " ".join(text.strip().split()).lower()
    for _ in range(3):  # wrappers may nest: **"47".**
        prev = t
        t = t.strip().rstrip(".!").strip()
        t = t.strip("*_`'\"").strip()
        t = _PREFIX.sub("", t, count=1)
        if t == prev:
            break
    return t


def verify(family: str, prediction: str, answer: str) -> bool:
    """True iff `prediction` (raw model text, possibly with a think block) gives exactly `answer`."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(ALL_FAMILIES)}")
    final = final_text(prediction)
    if final is None:
        return False
    got, want = normalise(final), normalise(answer)
    if not want:
        raise ValueError(f"empty reference answer for family {family!r}")
    if got == want:
        return True
    if family == "spatial":
        m = _SPATIAL.match(got)
        return m is not None and (m.group(1) or m.group(2)) == want
    return False
