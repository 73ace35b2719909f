"""A source of Conversations (a user's files, or the world through tessera.data.world) → Encoded
samples.

`ConversationStream(index)` runs in the DataLoader worker: it takes the source's record at `index`,
opens its
images there (paths are read lazily, with tessera.image's limits), tiles them and tokenises the
conversation
(tessera.data.encode). It is picklable, so the packing, square averaging, resume and DDP of
`tessera.train.data.stream_batches` apply unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tessera.data.encode import encode_ids
from tessera.data.records import Conversation, question_text
from tessera.data.scan import ScanReport, scan
from tessera.data.source import Records
from tessera.image import ImageProcessor
from tessera.train.data import Encoded

log = logging.getLogger(__name__)


@dataclass
class ConversationStream:
    source: Callable[[int], Conversation]
    tokenizer: Any  # tessera.chat.ChatTokenizer
    config: Any  # tessera.config.ModelConfig
    _processor: Any = field(default=None, repr=False, compare=False)

    def processor(self):
        if self._processor is None:
            self._processor = ImageProcessor.from_config(self.config)
        return self._processor

    def __call__(self, index: int) -> Encoded:
        conv = self.source(index)
        tpt = self.config.tokens_per_tile
        if conv.images:
            pixels = self.processor()(list(conv.images))
            image_tokens = [n * tpt for n in pixels.tiles_per_image]
            tiles = pixels.pixel_values
        else:
            image_tokens, tiles = (
                [],
                torch.zeros(0, 3, self.config.tile_size, self.config.tile_size),
            )
        ids, mask = encode_ids(self.tokenizer, conv, image_tokens)
        questions = tuple(question_text(t.question) for t in conv.turns)
        return Encoded(ids, mask, tiles, image_tokens, conv.category, index, questions=questions)


def scan_for(
    model, path: str, max_tokens: int, kind: str = "conversation", skip_bad: bool = False
) -> ScanReport:
    """tessera.data.scan with the model's tokenizer and tiling; `max_tokens` capped by the model's
    positions."""
    limit = min(max_tokens, model.config.language.max_position_embeddings)
    return scan(
        path,
        model.tokenizer,
        ImageProcessor.from_config(model.config),
        model.config.tokens_per_tile,
        limit,
        kind=kind,
        skip_bad=skip_bad,
    )


def file_stream(
    model, path: str, max_tokens: int, skip_bad: bool = False, seed: int = 0, shuffle: bool = True
) -> tuple[ConversationStream, ScanReport]:
    """The scanned records of `path` as a stream of Encoded samples, cycling in seeded epochs."""
    report = scan_for(model, path, max_tokens, skip_bad=skip_bad)
    log.info(
        "%s: %d records%s",
        path,
        len(report.records),
        f"; {report.summary()}" if report.skipped else "",
    )
    return ConversationStream(
        Records(tuple(report.records), seed, shuffle), model.tokenizer, model.config
    ), report
