"""Rows of a dataset, whatever file holds them: JSONL, JSON (a list of rows), Parquet, or an
InternVL meta JSON.

A meta JSON maps dataset names to `{"root": DIR, "annotation": FILE, "repeat_time": R, "length": N}`
(InternVL's
fine-tuning layout): each annotation file is read with image paths relative to its `root`; R > 1
repeats the
rows (the fraction too: 1.5 = every row once, then the first half again), R < 1 keeps the first R·N
rows. A bare
file's image paths are relative to the file's folder.

A row that is not a JSON object comes back as a `Row` with `error` set, so the scan can name its
file and line
(or count it as skipped); a file that cannot be read at all raises DataError at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tessera.data.records import DataError

SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Row:
    """One row as read: its fields (or the reason it could not be read), where it is, and its
    images' root."""

    data: dict[str, Any] | None
    where: str  # file:line (a Parquet or JSON row's line is its 1-based index)
    root: Path
    dataset: str = ""
    error: str = ""


def read_rows(path: str | Path) -> Iterator[Row]:
    """Every row of `path` (a data file or an InternVL meta JSON), in order, with repeats
    applied."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(
            f"{path}: a folder; give a .jsonl/.json/.parquet file or an InternVL meta JSON"
        )
    if path.suffix == ".json":
        data = _load_json(path)
        if _is_meta(data):
            yield from _meta_rows(path, data)
            return
        yield from _json_rows(path, data, path.parent)
        return
    yield from read_file(path, path.parent)


def read_file(path: Path, root: Path, dataset: str = "") -> Iterator[Row]:
    """The rows of one data file, by suffix."""
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path, root, dataset)
    elif path.suffix == ".json":
        yield from _json_rows(path, _load_json(path), root, dataset)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path, root, dataset)
    else:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use {', '.join(SUFFIXES)}")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None


def _is_meta(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and bool(data)
        and all(isinstance(v, dict) and "annotation" in v for v in data.values())
    )


def _meta_rows(path: Path, meta: dict[str, dict]) -> Iterator[Row]:
    for name, entry in meta.items():
        annotation = Path(entry["annotation"])
        annotation = annotation if annotation.is_absolute() else path.parent / annotation
        root = Path(entry.get("root", annotation.parent))
        root = root if root.is_absolute() else path.parent / root
        repeat = float(entry.get("repeat_time", 1))
        if repeat <= 0:
            raise DataError(
                f"{path}: dataset {name!r} has repeat_time {repeat}; it must be positive"
            )
        rows = list(read_file(annotation, root, name))
        length = entry.get("length")
        if length is not None and int(length) != len(rows):
            raise DataError(
                f"{path}: dataset {name!r} declares length {length} but {annotation} "
                f"has {len(rows)} rows"
            )
        whole, part = math.floor(repeat), repeat - math.floor(repeat)
        for _ in range(whole):
            yield from rows
        yield from rows[: round(part * len(rows))]


def _jsonl_rows(path: Path, root: Path, dataset: str) -> Iterator[Row]:
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    with f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Row(
                        None, where, root, dataset, f"malformed line: {e.msg} at column {e.colno}"
                    )
                    continue
                if not isinstance(data, dict):
                    yield Row(
                        None,
                        where,
                        root,
                        dataset,
                        f"malformed line: a JSON {type(data).__name__}, not an object",
                    )
                    continue
                yield Row(data, where, root, dataset)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: cannot read: not UTF-8 text ({e.reason})") from None


def _json_rows(path: Path, data: Any, root: Path, dataset: str = "") -> Iterator[Row]:
    if not isinstance(data, list):
        raise DataError(
            f"{path}: a JSON data file must hold a list of rows (or be an InternVL meta JSON whose "
            "entries name an 'annotation')"
        )
    for number, item in enumerate(data, start=1):
        where = f"{path}:{number}"
        if isinstance(item, dict):
            yield Row(item, where, root, dataset)
        else:
            yield Row(
                None,
                where,
                root,
                dataset,
                f"malformed row: a JSON {type(item).__name__}, not an object",
            )


def _parquet_rows(path: Path, root: Path, dataset: str) -> Iterator[Row]:
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a broken file
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None
    for number, item in enumerate(table.to_pylist(), start=1):
        yield Row(item, f"{path}:{number}", root, dataset)
