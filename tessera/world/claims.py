"""What a reasoning chain claims, in checkable pieces.

The reasoning family's worked chain (tasks._reasoning) reads numbers off the image and then does arithmetic,
one column at a time (tasks.worked_sum), ending on the whole sum:

    The red circle is labelled 47. There are 2 squares. 47 + 2: 7 + 2 = 9, 4 + 0 = 4, so 47 + 2 = 49.

A sampled chain can misread or miscount (a perception claim) or add wrongly (an arithmetic claim). Both kinds
can be checked without knowing the answer: a perception claim becomes the direct question the world asks for
it (the label and count families' own wording), which the model answers far more reliably than it reads inside
a chain; an arithmetic claim is recomputed. Best-of-N's critic (tessera.best_of_n) uses both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tessera.world.scenes import SHAPES
from tessera.world.tasks import count_question, label_question
from tessera.world.verify import normalise

_KINDS = "|".join(SHAPES)
_LABELLED = re.compile(r"The (\w+ (?:" + _KINDS + r")) is labelled (\d+)\.")
_COUNTED = re.compile(
    r"There (?:is|are) (\d+) (" + _KINDS + r"|" + "|".join(f"{k}s" for k in SHAPES) + r")\."
)
_SUM = re.compile(
    r"(\d+) ([+-]) (\d+) = (-?\d+)\."
)  # a whole sum ends a sentence; a column step ends in ","


@dataclass(frozen=True)
class Claim:
    """A perception claim: the direct question that checks it and the value the chain gave."""

    question: str
    value: str


def perception_claims(chain: str) -> list[Claim]:
    """Every label read and every count the chain states, in order of appearance."""
    found = [
        (m.start(), Claim(label_question(m.group(1)), m.group(2)))
        for m in _LABELLED.finditer(chain)
    ]
    for m in _COUNTED.finditer(chain):
        kind = m.group(2)
        kind = kind[:-1] if kind.endswith("s") and kind not in SHAPES else kind
        found.append((m.start(), Claim(count_question(kind), m.group(1))))
    return [claim for _, claim in sorted(found, key=lambda item: item[0])]


def arithmetic_consistent(chain: str, final: str) -> bool | None:
    """Whether the chain's last sum is right and is the final answer (in any form the verifiers accept); None
    when the chain states no sum."""
    sums = _SUM.findall(chain)
    if not sums:
        return None
    a, op, b, value = sums[-1]
    result = int(a) + int(b) if op == "+" else int(a) - int(b)
    return result == int(value) and normalise(final) == value
