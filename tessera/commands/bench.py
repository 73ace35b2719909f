"""`tessera bench NAME ...`: each benchmark lives in `tessera/bench/<name>.py` with `add_arguments` and `run`.

Only the requested benchmark's module is imported: each pulls in heavy, optional dependencies (transformers,
servers), so its own arguments are parsed in a second step.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "preprocess": "our image preprocessing vs transformers' InternVL image processor",
    "router": "Flash: accuracy and visual tokens for full / compressed / router / random routing",
    "engine": "our engine's decode throughput vs transformers generate",
    "serve": "coupled vs decoupled (DvD) vs decoupled + router serving throughput and latency",
    "cascade": "Cascade RL in miniature (Table 16: SFT, +MPO, +GSPO x1/x2, Cascade) and Best-of-N",
    "best_of_n": "Best-of-N on the reasoning family: N = 1, 4, 8 with vote, critic and critic-weighted selection",
    "family_generate": "tiny Qwen3-MoE and GPT-OSS decoders: our engine vs transformers generate, batch 1 and 8",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items())
    parser.add_argument("benchmark", choices=list(BENCHMARKS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (see tessera bench NAME -h)")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"tessera.bench.{args.benchmark}")
    parser = argparse.ArgumentParser(prog=f"tessera bench {args.benchmark}", description=BENCHMARKS[args.benchmark])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.options)) or 0)
