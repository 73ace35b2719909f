"""`tessera serve CKPT`: the OpenAI-compatible API, coupled or decoupled (DvD) vision."""

from __future__ import annotations

import argparse
import os
import sys

from tessera.device import add_device_arguments, devices_from_args
from tessera.routing import MODES
from tessera.serve.vision import MAX_BATCH_TILES, MAX_WAIT_MS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument(
        "--mode",
        choices=["coupled", "decoupled"],
        default="coupled",
        help="coupled: vision inside this process, between engine steps; decoupled: vision servers (DvD)",
    )
    p.add_argument(
        "--vision-workers",
        type=int,
        default=0,
        metavar="N",
        help="decoupled: start N local vision servers",
    )
    p.add_argument(
        "--vision-server",
        action="append",
        default=[],
        metavar="tcp://HOST:PORT",
        help="decoupled: a remote `tessera vision-server` (repeat for several)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("TESSERA_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $TESSERA_API_KEY, else open)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="the model id clients use (default: the checkpoint's folder name)",
    )
    p.add_argument(
        "--max-batch", type=int, default=16, help="sequences decoded together (KV cache slots)"
    )
    p.add_argument("--max-len", type=int, default=None, help="context per sequence in tokens")
    p.add_argument(
        "--max-waiting", type=int, default=64, help="engine queue bound; beyond it requests get 429"
    )
    p.add_argument(
        "--max-vision-inflight",
        type=int,
        default=32,
        help="image requests being encoded; beyond → 429",
    )
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument(
        "--max-body-bytes", type=int, default=32 * 2**20, help="request body size; beyond → 413"
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=10.0,
        help="decoupled: a vision worker silent this long is down (503; local: restart)",
    )
    p.add_argument("--max-tiles-per-request", type=int, default=64)
    p.add_argument(
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="pixels per image (decompression-bomb guard)",
    )
    p.add_argument(
        "--routing",
        choices=MODES,
        default="full",
        help="default routing when a request does not say (Flash models; question: a model with a "
        "question-aware router, Tessera's language backend only)",
    )
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="also fetch http(s) image URLs (off by default)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    p.add_argument(
        "--worker-threads", type=int, default=1, help="torch threads per local vision worker"
    )
    p.add_argument(
        "--max-batch-tiles",
        type=int,
        default=MAX_BATCH_TILES,
        help="tiles per ViT batch (vision workers, and coupled vision)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=MAX_WAIT_MS,
        help="vision workers: longest wait to fill a batch",
    )
    p.add_argument(
        "--vision-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="precision of the ViT, router and projectors, in either mode (the LLM keeps its own)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile (graphs are built at start-up, before the port opens)",
    )
    p.add_argument(
        "--language-backend",
        choices=["tessera", "vllm"],
        default="tessera",
        help="who runs the LLM: Tessera's engine, or a vLLM server fed the image features as "
        "image_embeds (vision stays here: coupled or --mode decoupled)",
    )
    p.add_argument(
        "--vllm-url",
        default=None,
        metavar="http://HOST:PORT",
        help="vllm backend: a running `vllm serve DIR --enable-mm-embeds` of `tessera convert CKPT DIR "
        "--to hf` (default: start one)",
    )
    p.add_argument(
        "--vllm-python",
        default=None,
        metavar="PATH",
        help="vllm backend: the Python that has vLLM, to start it with (default: $TESSERA_VLLM_PYTHON, "
        "else this one)",
    )
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="vllm backend: one more argument for the started `vllm serve` (repeat; e.g. "
        "--vllm-arg=--tensor-parallel-size --vllm-arg=2)",
    )
    add_device_arguments(
        p, vision=True
    )  # --device: the language server; --vision-device: the vision workers


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    # imports stay in functions here: `tessera serve --help` builds its parser without them
    from tessera.serve.language_server import ServeOptions
    from tessera.serve.launch import ServeSetupError, Topology, serve
    from tessera.serve.vision import VisionLimits

    devices = devices_from_args(args)
    topology = Topology(
        args.mode,
        args.vision_workers,
        args.vision_server,
        args.worker_threads,
        args.max_batch_tiles,
        args.max_wait_ms,
        args.heartbeat_timeout,
        vision_dtype=args.vision_dtype,
        device=str(devices.device),
        dtype=str(devices.dtype).removeprefix("torch.") if devices.dtype else None,
        vision_device=str(devices.vision_device),
        language_backend=args.language_backend,
    )
    if args.mode == "coupled" and args.vision_device:
        print(
            "error: --vision-device needs --mode decoupled (coupled vision runs on --device)",
            file=sys.stderr,
        )
        return 2
    try:
        topology.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key", file=sys.stderr)
    options = ServeOptions(
        model_name=args.model_name or Path(args.checkpoint).resolve().name,
        max_batch=args.max_batch,
        max_len=args.max_len,
        max_waiting=args.max_waiting,
        max_vision_inflight=args.max_vision_inflight,
        max_images=args.max_images,
        max_body_bytes=args.max_body_bytes,
        allow_remote_images=args.allow_remote_images,
        default_routing=args.routing,
        compile=args.compile,
    )
    limits = VisionLimits(
        max_pixels=args.max_pixels, max_tiles_per_request=args.max_tiles_per_request
    )
    if args.language_backend != "vllm":
        if args.vllm_url or args.vllm_python or args.vllm_arg:
            print(
                "error: --vllm-url / --vllm-python / --vllm-arg need --language-backend vllm",
                file=sys.stderr,
            )
            return 2
        try:
            return serve(
                args.checkpoint,
                topology,
                options,
                args.host,
                args.port,
                args.api_key,
                args.threads,
                limits,
            )
        except ServeSetupError as e:  # e.g. --routing question without a question-aware router
            print(f"error: {e}", file=sys.stderr)
            return 2
    from tessera.serve.vllm_backend import VLLMOptions, VLLMUnavailable, find_python

    vllm = VLLMOptions(
        url=args.vllm_url,
        python=args.vllm_python,
        extra_args=list(args.vllm_arg),
        dtype=topology.dtype or "auto",
    )
    try:
        if vllm.url is None:
            find_python(vllm.python)  # a missing vLLM is a one-line error, before the model loads
        return serve(
            args.checkpoint,
            topology,
            options,
            args.host,
            args.port,
            args.api_key,
            args.threads,
            limits,
            vllm=vllm,
        )
    except (VLLMUnavailable, ServeSetupError) as e:  # vLLM missing / unreachable, or a bad setup
        print(f"error: {e}", file=sys.stderr)
        return 2
