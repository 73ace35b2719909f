"""The `tessera` command. Each subcommand lives in `tessera/commands/<name>.py` and defines
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command runs, so
`tessera --help` stays fast and a broken optional dependency only breaks its own command."""

from __future__ import annotations

import argparse
import importlib
import sys

# command → (module under tessera.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("init", "write a random-initialised checkpoint for a preset"),
    "convert": (
        "convert",
        "convert a checkpoint between the official, tessera and transformers layouts",
    ),
    "chat": ("chat", "ask a checkpoint about an image"),
    "world": ("world", "render the world's scenes and questions"),
    "train": ("train", "run one training stage"),
    "recipe": ("recipe", "run the whole training cascade and write a report"),
    "eval": ("eval", "evaluate a checkpoint on a held-out world set"),
    "merge": ("merge", "fold a LoRA run's adapter into its base and write the merged checkpoint"),
    "critic": ("critic", "train the Best-of-N critic of a checkpoint on its own verified answers"),
    "serve": ("serve", "OpenAI-compatible API server (coupled or decoupled vision)"),
    "vision-server": ("vision_server", "a standalone DvD vision server"),
    "bench": ("bench", "benchmarks: preprocess, router, engine, serve"),
    "demo": ("demo", "evaluate the shipped model and answer questions about fresh scenes"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera", description="InternVL3.5, complete: model, router, DvD serving, Cascade RL."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(f"tessera.commands.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(f"tessera.commands.{COMMANDS[args.command][0]}")
    try:
        return int(module.run(args) or 0)
    except ValueError as e:
        from tessera.device import (
            DeviceError,  # imported here so that `tessera --help` never loads torch
        )

        if not isinstance(
            e, DeviceError
        ):  # a bad --device / --dtype, or CUDA asked for where there is none
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
