"""`tessera bench NAME ...`: each benchmark lives in `tessera/bench/<name>.py` with `add_arguments` and `run`."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "preprocess": "our image preprocessing vs transformers' InternVL image processor",
    "router": "Flash: accuracy and visual tokens for full / compressed / router / random routing",
    "engine": "our engine's decode throughput vs transformers generate",
    "serve": "coupled vs decoupled (DvD) vs decoupled + router serving throughput and latency",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_text in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(f"tessera.bench.{name}").add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(f"tessera.bench.{args.benchmark}").run(args)
