"""`tessera bench NAME ...`: each benchmark lives in `tessera/bench/<name>.py` with `add_arguments` and `run`.

Only the requested benchmark's module is imported: each pulls in heavy, optional dependencies (transformers,
servers), so its own arguments are parsed in a second step.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tessera.device import add_device_arguments, devices_from_args

BENCHMARKS = {
    "preprocess": "our image preprocessing vs transformers' InternVL image processor",
    "router": "Flash: accuracy and visual tokens for full / compressed / router / random routing",
    "engine": "our engine's decode throughput vs transformers generate",
    "serve": "coupled vs decoupled (DvD) vs decoupled + router serving throughput and latency",
    "cascade": "Cascade RL in miniature (Table 16: SFT, +MPO, +GSPO x1/x2, Cascade) and Best-of-N",
    "best_of_n": "Best-of-N on the reasoning family: N = 1, 4, 8 with vote, critic and critic-weighted selection",
    "family_generate": "tiny Qwen3-MoE and GPT-OSS decoders: our engine vs transformers generate, batch 1 and 8",
    "vllm_serve": "tessera serve vs vllm serve of the hf export (and the vllm language backend), side by side",
    "gpu": "on a CUDA GPU: chat, eval, training steps, the engine and decoupled serving, tiny and 1B shapes",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items())
    parser.add_argument("benchmark", choices=list(BENCHMARKS))
    parser.add_argument(
        "options",
        nargs=argparse.REMAINDER,
        help="the benchmark's own options (see tessera bench NAME -h)",
    )


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"tessera.bench.{args.benchmark}")
    parser = argparse.ArgumentParser(
        prog=f"tessera bench {args.benchmark}", description=BENCHMARKS[args.benchmark]
    )
    module.add_arguments(parser)
    if not any("--device" in a.option_strings for a in parser._actions):
        add_device_arguments(
            parser
        )  # every benchmark takes the flags; those below run on the CPU only
    options = parser.parse_args(args.options)
    devices = devices_from_args(options)
    if not getattr(module, "USES_DEVICE", False) and devices.device.type != "cpu":
        if options.device != "auto":
            print(
                f"error: benchmark {args.benchmark} runs on the CPU only (got --device {options.device})",
                file=sys.stderr,
            )
            return 2
        print(f"note: benchmark {args.benchmark} runs on the CPU", file=sys.stderr)
    return int(module.run(options) or 0)
