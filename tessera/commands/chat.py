"""`tessera chat CKPT --image FILE "question"`: one answer from a checkpoint."""

from __future__ import annotations

import argparse
import sys

from tessera.device import add_device_arguments, devices_from_args
from tessera.routing import MODES, RoutingError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("question")
    p.add_argument("--image", help="image file (PNG, JPEG, ...); omit for a text-only question")
    p.add_argument(
        "--thinking", action="store_true", help="let the model write a <think> block first"
    )
    p.add_argument(
        "--routing", default="full", choices=MODES, help="Flash: which tiles keep full resolution"
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--best-of",
        type=int,
        default=1,
        help="Best-of-N: sample N answers, keep the critic's favourite",
    )
    p.add_argument(
        "--show-routing",
        metavar="OUT.png",
        help="draw the image with kept and compressed tiles marked",
    )
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    # imports stay in functions here: `tessera chat --help` builds its parser without them
    import tessera
    from tessera.image import ImageError

    if args.show_routing and not args.image:
        print(
            "error: --show-routing draws the image's tiles; give one with --image", file=sys.stderr
        )
        return 2
    devices = devices_from_args(args)
    model = tessera.load(args.checkpoint, device=devices.device, dtype=devices.dtype)
    pipe = tessera.Pipeline(model)
    try:
        if args.best_of > 1:
            from tessera.best_of_n import Critic, best_of_n

            answer = best_of_n(
                pipe,
                args.image,
                args.question,
                n=args.best_of,
                thinking=args.thinking,
                routing=args.routing,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature or 0.7,
                top_p=args.top_p,
                seed=args.seed,
                critic=Critic.load(args.checkpoint).to(devices.device),
            )
        else:
            answer = pipe.chat(
                args.image,
                args.question,
                thinking=args.thinking,
                routing=args.routing,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
            )
    except (ImageError, FileNotFoundError, RoutingError) as e:
        # RoutingError: e.g. --routing question on a model without the question-aware router
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(answer.text.strip())
    if args.image:
        print(
            f"[{answer.tiles} tiles, {answer.compressed_tiles} compressed, {answer.visual_tokens} visual tokens]",
            file=sys.stderr,
        )
    if args.show_routing:
        from tessera.routing import draw_routing

        try:
            draw_routing(model, args.image, args.routing, args.show_routing, question=args.question)
        except (RoutingError, OSError) as e:
            print(f"error: --show-routing: {e}", file=sys.stderr)
            return 2
        print(f"routing picture written to {args.show_routing}", file=sys.stderr)
    return 0
