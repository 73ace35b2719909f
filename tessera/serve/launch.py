"""Put a serving topology together and run it.

- coupled: the vision encoder lives in the language process and runs on the engine thread between steps,
  so a request's vision work pauses everyone's decoding (the baseline DvD is measured against);
- decoupled: vision runs in other processes — local children (`vision_workers=N`) and/or remote servers
  (`vision_servers=[tcp://...]`), load-balanced — while the engine keeps decoding.
`LocalServer` runs the HTTP API on a background thread bound to 127.0.0.1 and an ephemeral port, for tests
and benchmarks; `serve` runs it in the foreground for the `tessera serve` command.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import torch
import uvicorn

import tessera
from tessera.routing import RoutingPolicy
from tessera.serve.api import build_app
from tessera.serve.language_server import CoupledVision, LanguageServer, ServeOptions
from tessera.serve.vision import (
    MAX_BATCH_TILES,
    MAX_WAIT_MS,
    VisionEncoder,
    VisionLimits,
    vision_only,
)
from tessera.serve.vision_client import LocalWorkerSpec, RemoteVision
from tessera.serve.vllm_backend import ThreadVision, VLLMOptions, build_vllm_server


class ServeSetupError(ValueError):
    """A serving setup that cannot work (said before the port opens)."""


def check_default_routing(model, routing: str) -> None:
    """`--routing question` needs a question-aware router."""
    if not RoutingPolicy(routing).needs_question:
        return
    flash = model.config.flash
    if not (flash.enabled and flash.question_router):
        raise ServeSetupError(
            f"--routing {routing} needs a model with a question-aware router (tessera train "
            "question_router); this checkpoint has none: use --routing router or full"
        )


@dataclass
class Topology:
    mode: str = "coupled"  # coupled | decoupled
    vision_workers: int = 0  # local vision processes (decoupled)
    vision_servers: list[str] = field(default_factory=list)  # remote vision servers (decoupled)
    worker_threads: int = 1  # torch threads per local vision worker
    max_batch_tiles: int = MAX_BATCH_TILES
    max_wait_ms: float = MAX_WAIT_MS
    heartbeat_timeout: float = 10.0  # a vision worker silent this long is down (503; restart)
    vision_dtype: str = (
        "float32"  # float32 | bfloat16: precision of the vision side, in either topology
    )
    device: str = "cpu"  # the language server's torch device (and the vision side's when coupled)
    dtype: str | None = None  # the language model's weights (None: as stored)
    vision_device: str = "cpu"  # decoupled: the local vision workers' device
    language_backend: str = "tessera"  # tessera (its engine) | vllm (a vLLM server runs the LLM)

    def validate(self) -> None:
        if self.mode not in ("coupled", "decoupled"):
            raise ValueError(f"mode must be coupled or decoupled, got {self.mode!r}")
        if self.mode == "coupled" and (self.vision_workers or self.vision_servers):
            raise ValueError("--vision-workers / --vision-server need --mode decoupled")
        if self.mode == "decoupled" and not (self.vision_workers or self.vision_servers):
            raise ValueError(
                "--mode decoupled needs --vision-workers N (local) and/or --vision-server tcp://HOST:PORT"
            )
        if self.language_backend not in ("tessera", "vllm"):
            raise ValueError(
                f"language backend must be tessera or vllm, got {self.language_backend!r}"
            )
        if self.vision_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"vision dtype must be float32 or bfloat16, got {self.vision_dtype!r}")
        for e in self.vision_servers:
            if not e.startswith(("tcp://", "ipc://")):
                raise ValueError(f"vision server address {e!r} must look like tcp://HOST:PORT")


def build_server(
    checkpoint: str,
    topology: Topology,
    options: ServeOptions | None = None,
    limits: VisionLimits | None = None,
    model=None,
    vllm=None,
) -> LanguageServer:
    """A LanguageServer for the topology. `model` (already loaded from `checkpoint`) skips loading it again.
    With `topology.language_backend == "vllm"`, a vLLM server runs the LLM (`vllm`: its VLLMOptions) and
    coupled vision runs on a worker thread of this process."""
    topology.validate()
    vllm_backend = topology.language_backend == "vllm"
    options = options or ServeOptions()
    dtype = getattr(torch, topology.dtype) if topology.dtype else None
    # with vLLM running the LLM, the token embeddings still stay here: question routing embeds questions
    if model is None and vllm_backend:
        model = vision_only(tessera.load(checkpoint), topology.device, dtype, keep_embeddings=True)
    elif model is None:
        model = tessera.load(checkpoint, device=topology.device, dtype=dtype)
    check_default_routing(model, options.default_routing)
    limits = limits or VisionLimits()
    if topology.mode == "coupled":
        encoder = VisionEncoder(model, limits, dtype=getattr(torch, topology.vision_dtype))
        if vllm_backend:
            vision = ThreadVision(encoder, topology.max_batch_tiles)
        else:
            vision = CoupledVision(encoder, topology.max_batch_tiles)
    else:
        spec = LocalWorkerSpec(
            str(checkpoint),
            topology.worker_threads,
            topology.max_batch_tiles,
            topology.max_wait_ms,
            limits.cache_entries,
            topology.vision_dtype,
            device=str(topology.vision_device),
        )
        vision = RemoteVision(
            topology.vision_servers,
            spec,
            topology.vision_workers,
            heartbeat=min(1.0, topology.heartbeat_timeout / 4),
            heartbeat_timeout=topology.heartbeat_timeout,
        )
    if vllm_backend:
        return build_vllm_server(checkpoint, model, vision, options, vllm or VLLMOptions())
    return LanguageServer(model, vision, options)


class LocalServer:
    """The API on a background thread, bound to 127.0.0.1 on an ephemeral port. Use as a context manager."""

    def __init__(self, server: LanguageServer, api_key: str | None = None, host: str = "127.0.0.1"):
        self.language_server = server
        self.app = build_app(server, api_key)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            loop="asyncio",
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.uvicorn.run,
            kwargs={"sockets": [self.sock]},
            daemon=True,
            name="tessera-api",
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 180.0) -> LocalServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self.thread.is_alive():
                raise RuntimeError("the API server exited during startup (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API server did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(
    checkpoint: str,
    topology: Topology,
    options: ServeOptions,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    threads: int | None = None,
    limits: VisionLimits | None = None,
    vllm=None,
) -> int:
    """Run the API in the foreground until interrupted."""
    if threads:
        torch.set_num_threads(threads)
    elif topology.mode == "decoupled" and topology.vision_workers:
        torch.set_num_threads(1)  # the cores belong to the vision workers and the engine, one each
    server = build_server(checkpoint, topology, options, limits, vllm=vllm)
    app = build_app(server, api_key)
    backend = f", language on vLLM at {server.url}" if topology.language_backend == "vllm" else ""
    print(
        f"tessera: serving {options.model_name} ({topology.mode}{backend}) on http://{host}:{port}/v1",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="info", loop="asyncio")
    return 0
