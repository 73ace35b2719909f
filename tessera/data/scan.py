"""Every record checked before training starts, so nothing fails mid-run.

A malformed row, a missing or unreadable image (decoded once, with the same pixel limit as
everywhere else:
tessera.image), a conversation without a gpt turn, text that holds image tokens itself, or a record
longer than
the context (`max_tokens`: the stage's packed row, the model's positions) is an error naming its
file and line
— all of them, up to a few, in one message — unless `skip_bad` is set: then the bad records are
dropped and
counted by reason (`ScanReport.skipped`), and the run says so in its log and its final line.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.data import internvl
from tessera.data.encode import encode_ids
from tessera.data.readers import read_rows
from tessera.data.records import Conversation, DataError, PreferencePair, PromptRecord, Turn
from tessera.image import DEFAULT_MAX_PIXELS, ImageError, load_image

log = logging.getLogger(__name__)

PARSERS: dict[str, Callable] = {
    "conversation": internvl.conversation,
    "prompt": internvl.prompt,
    "pair": internvl.pair,
}
SHOWN = 5  # errors quoted in one message


@dataclass
class ScanReport:
    records: list[Any]  # the usable records, in file order
    total: int  # rows read
    skipped: Counter = field(default_factory=Counter)  # reason → count
    first: dict[str, str] = field(default_factory=dict)  # reason → the first such error

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """'skipped 3 of 40 records (2 missing image, 1 no gpt turn)' or ''."""
        if not self.skipped:
            return ""
        reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
        return f"skipped {self.num_skipped} of {self.total} records ({reasons})"

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "used": len(self.records),
            "skipped": dict(self.skipped),
            "first": self.first,
        }


def as_conversation(record: Any) -> Conversation:
    """The conversation whose length bounds the record's (a pair's longer answer; a prompt's
    reference)."""
    if isinstance(record, Conversation):
        return record
    if isinstance(record, PreferencePair):
        longer = max((record.chosen, record.rejected), key=len)
        return Conversation(record.images, (Turn(record.question, longer),), where=record.where)
    if isinstance(record, PromptRecord):
        return Conversation(
            record.images, (Turn(record.question, record.answer),), where=record.where
        )
    raise TypeError(f"not a record: {type(record).__name__}")


def image_tokens(images, processor, tokens_per_tile: int, where: str) -> list[int]:
    """Visual tokens per image, decoding each once under the processor's pixel limit."""
    out = []
    for k, image in enumerate(images):
        if isinstance(image, str) and not Path(image).exists():
            raise DataError(f"{where}: image {k + 1} not found: {image}", "missing image")
        max_pixels = processor.max_pixels if processor is not None else DEFAULT_MAX_PIXELS
        try:
            img = load_image(image, max_pixels=max_pixels)
        except (ImageError, OSError) as e:
            raise DataError(f"{where}: image {k + 1} unreadable: {e}", "unreadable image") from None
        cols, rows = processor.grid(*img.size)
        tiles = cols * rows + (1 if processor.use_thumbnail and cols * rows > 1 else 0)
        out.append(tiles * tokens_per_tile)
    return out


def check_record(record: Any, tokenizer, processor, tokens_per_tile: int, max_tokens: int) -> None:
    conv = as_conversation(record)
    counts = image_tokens(conv.images, processor, tokens_per_tile, conv.where)
    ids, _ = encode_ids(tokenizer, conv, counts)
    if len(ids) > max_tokens:
        raise DataError(
            f"{conv.where}: {len(ids)} tokens ({sum(counts)} of them visual) is longer than the "
            f"context of {max_tokens}; shorten it or raise --row-tokens",
            "longer than the context",
        )


def scan(
    path: str | Path,
    tokenizer,
    processor,
    tokens_per_tile: int,
    max_tokens: int,
    kind: str = "conversation",
    skip_bad: bool = False,
) -> ScanReport:
    """Read and check every record of `path`; DataError listing the bad ones unless `skip_bad`."""
    if kind not in PARSERS:
        raise ValueError(f"unknown record kind {kind!r}; choose from {', '.join(PARSERS)}")
    parse = PARSERS[kind]
    report = ScanReport([], 0)
    errors: list[str] = []
    for row in read_rows(path):
        report.total += 1
        try:
            record = parse(row)
            check_record(record, tokenizer, processor, tokens_per_tile, max_tokens)
        except DataError as e:
            report.skipped[e.reason] += 1
            report.first.setdefault(e.reason, str(e))
            errors.append(str(e))
            continue
        report.records.append(record)
    if errors and not skip_bad:
        more = f"\n  ... and {len(errors) - SHOWN} more" if len(errors) > SHOWN else ""
        raise DataError(
            f"{len(errors)} bad record(s) in {path} (fix them, or pass --skip-bad-records to drop "
            "them):\n  " + "\n  ".join(errors[:SHOWN]) + more
        )
    if report.skipped:
        log.warning("%s: %s", path, report.summary())
        for reason, first in report.first.items():
            log.warning("first %s: %s", reason, first)
    if not report.records:
        raise DataError(f"{path}: no usable records ({report.total} read)")
    return report
