"""Answer checkers for GSPO rewards and `tessera eval --data`: `reward(prediction, answer) -> float`
in [0, 1].

Built-ins: `exact` (equal after normalisation: the text after any think block, lower case, outer
punctuation
and articles dropped, spaces collapsed), `numeric` (the last number of the prediction within a
relative
tolerance of the answer's), `choice` (the multiple-choice letter), `boxed` (the `\\boxed{…}`
content, else the
last number, compared exactly). `resolve("module:function")` imports a user's own verifier, called
the same way.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

from tessera.chat import END_THINK, THINK

Reward = Callable[[str, str], float]

_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CHOICE = re.compile(r"(?:^|[^A-Za-z])\(?([A-Ha-h])\)?(?:[.):]|\s|$)")


def final_text(text: str) -> str:
    """The answer after a think block (everything when there is none)."""
    if END_THINK in text:
        text = text.split(END_THINK, 1)[1]
    return text.replace(THINK, "").strip()


def normalize(text: str) -> str:
    text = final_text(text).lower()
    text = re.sub(r"[\s]+", " ", text).strip()
    text = text.strip(" .,!?;:'\"`")
    text = _ARTICLES.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip()


def exact(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(final_text(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric(prediction: str, answer: str, rel_tol: float = 1e-4, abs_tol: float = 1e-9) -> float:
    got, want = last_number(prediction), last_number(answer)
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol))


def choice_letter(text: str) -> str | None:
    """The option letter: 'B', '(B)', 'B.', 'Answer: B' → 'B' (the last one written)."""
    text = final_text(text).strip()
    if len(text) == 1 and text.isalpha():
        return text.upper()
    found = _CHOICE.findall(text)
    return found[-1].upper() if found else None


def choice(prediction: str, answer: str) -> float:
    got, want = choice_letter(prediction), choice_letter(answer)
    return float(got is not None and got == want)


def boxed_content(text: str) -> str | None:
    """The content of the last `\\boxed{…}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j].strip()
            depth -= 1
    return None


def boxed(prediction: str, answer: str) -> float:
    got = boxed_content(prediction)
    if got is None:
        number = last_number(prediction)
        if number is None:
            return 0.0
        got = f"{number:g}"
    want = boxed_content(answer) or answer
    if exact(got, want):
        return 1.0
    a, b = last_number(got), last_number(want)
    return float(
        a is not None
        and b is not None
        and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
        and normalize(re.sub(_NUMBER, "", got)) == normalize(re.sub(_NUMBER, "", want))
    )


BUILTIN: dict[str, Reward] = {"exact": exact, "numeric": numeric, "choice": choice, "boxed": boxed}


def resolve(spec: str) -> Reward:
    """A built-in by name, or `module:function` (imported; it must be callable as f(prediction,
    answer))."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown reward {spec!r}; use one of {', '.join(BUILTIN)} or module:function"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {module_name} has no callable {attr!r}")
    return fn
