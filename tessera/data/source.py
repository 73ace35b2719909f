"""Sources: a global stream index → a record. Files cycle through their records in a fresh shuffled
order each
epoch (seeded, so the record at an index never changes and resume is exact); the world
(tessera.data.world) is
a source too."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Records:
    """`records[perm_epoch(index % n)]`, epoch = index // n; `shuffle=False` keeps the file
    order."""

    records: tuple[Any, ...]
    seed: int = 0
    shuffle: bool = True
    _perm: dict[int, list[int]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.records = tuple(self.records)
        if not self.records:
            raise ValueError("a source needs at least one record")

    def __len__(self) -> int:
        return len(self.records)

    def __call__(self, index: int) -> Any:
        epoch, offset = divmod(index, len(self.records))
        if not self.shuffle:
            return self.records[offset]
        if epoch not in self._perm:
            order = list(range(len(self.records)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perm = {epoch: order}  # one epoch at a time: the stream moves forward
        return self.records[self._perm[epoch][offset]]
