"""What the benchmarks share to write their results: a section of docs/BENCHMARKS.md, and the machine's line."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def replace_section(path: Path, heading: str, body: str) -> None:
    """Replace the text under `heading` (up to the next '## ' heading) in a markdown file, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines[start:end] = [heading, "", body.rstrip(), ""]
    else:
        lines += ["", heading, "", body.rstrip()]
    path.write_text("\n".join(lines).rstrip() + "\n")


def machine() -> str:
    model = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        platform.processor(),
    )
    return f"{os.cpu_count()} CPU(s), {model}; Python {platform.python_version()}, torch {torch.__version__}"
