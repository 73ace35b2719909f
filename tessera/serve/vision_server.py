"""A DvD vision server: a ZeroMQ ROUTER that turns image bytes into bf16 features for language servers.

One thread, one socket, a small batching loop:
- each arriving `encode` request is decoded and tiled at once (or answered from the feature cache; images
  whose ViT tokens are cached are not decoded again: a question-routed request about a known image runs only
  the question-aware router and the projectors);
- its tiles join a pending batch, which runs through ViT → router → projector when it holds
  `max_batch_tiles` tiles or its oldest request has waited `max_wait_ms`;
- replies go back per request, with per-tile token counts in the header and bf16 features as blobs.
Bad input is answered with an error reply (status 400/413) and the server keeps serving; `ping` is answered
with `pong` and the server's counters (the language side uses it as a heartbeat). A batch runs on a
compute thread while this loop keeps answering pings (and collecting the next batch), so a long ViT
batch is not mistaken for a hung server; a process that is stopped or wedged answers nothing and is.

On start it prints `READY <endpoint>` on stdout (with the real port when bound to port 0), which is how a
language server that spawned it learns where to connect.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from dataclasses import dataclass, field

import zmq

import tessera
from tessera.serve import protocol as P
from tessera.serve.vision import (
    MAX_BATCH_TILES,
    MAX_WAIT_MS,
    PreparedJob,
    VisionEncoder,
    VisionInputError,
    VisionLimits,
    vision_only,
)


@dataclass
class VisionServerStats:
    requests: int = 0
    errors: int = 0
    batches: int = 0
    tiles: int = 0
    cache_hits: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # tiles per batch, last 100

    def as_dict(self) -> dict:
        recent = self.batch_sizes[-100:]
        return {
            "requests": self.requests,
            "errors": self.errors,
            "batches": self.batches,
            "tiles": self.tiles,
            "cache_hits": self.cache_hits,
            "mean_batch_tiles": sum(recent) / len(recent) if recent else 0.0,
        }


class VisionServer:
    def __init__(
        self,
        encoder: VisionEncoder,
        bind: str,
        max_batch_tiles: int = MAX_BATCH_TILES,
        max_wait_ms: float = MAX_WAIT_MS,
        exit_with_parent: bool = False,
    ):
        self.encoder = encoder
        self.bind = bind
        self.max_batch_tiles = max_batch_tiles
        self.max_wait = max_wait_ms / 1000.0
        self.stats = VisionServerStats()
        self.endpoint: str | None = None
        self._parent = os.getppid() if exit_with_parent else None
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    def serve_forever(self, announce: bool = True) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.bind)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if announce:
            print(f"READY {self.endpoint}", flush=True)
        pending: list[tuple[bytes, str, PreparedJob]] = []
        oldest = 0.0
        compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tessera-vit")
        running: tuple[concurrent.futures.Future, list] | None = None  # the batch being computed
        try:
            while not self._stop:
                if self._parent is not None and os.getppid() != self._parent:
                    return  # the language server that started us is gone
                if running is not None and running[0].done():
                    self._reply(sock, running[1], running[0])
                    running = None
                timeout = max(0.0, oldest + self.max_wait - time.monotonic()) if pending else 0.2
                if running is not None:
                    timeout = min(timeout, 0.005)  # look for the batch's end often
                if sock.poll(int(timeout * 1000)):
                    while sock.poll(0):  # take everything that has arrived, up to the batch bound
                        ident, *frames = sock.recv_multipart()
                        job = self._handle(sock, ident, frames)
                        if job is not None:
                            if not pending:
                                oldest = time.monotonic()
                            pending.append((ident, *job))
                        if sum(j.num_tiles for _, _, j in pending) >= self.max_batch_tiles:
                            break
                full = sum(j.num_tiles for _, _, j in pending) >= self.max_batch_tiles
                due = full or time.monotonic() - oldest >= self.max_wait
                if running is None and pending and due:
                    running = (compute.submit(self._compute, pending), pending)
                    pending = []
        finally:
            compute.shutdown(wait=False, cancel_futures=True)
            sock.close(0)

    def _handle(self, sock, ident: bytes, frames: list[bytes]) -> tuple[str, PreparedJob] | None:
        """Answer pings, cache hits and bad requests at once; return (id, job) for work that needs the ViT."""
        try:
            msg = P.unpack(frames)
        except P.ProtocolError as e:
            self.stats.errors += 1
            sock.send_multipart([ident, *P.error_reply("?", 400, f"protocol error: {e}")])
            return None
        rid = str(msg.header["id"])
        if msg.kind == "ping":
            stats = {
                **self.stats.as_dict(),
                "token_cache_hits": self.encoder.tokens.hits,
                "vit_tiles": self.encoder.vit_tiles,
            }
            sock.send_multipart([ident, *P.pack("pong", {"id": rid, "stats": stats})])
            return None
        if msg.kind != "encode":
            sock.send_multipart(
                [ident, *P.error_reply(rid, 400, f"unknown message kind {msg.kind!r}")]
            )
            return None
        self.stats.requests += 1
        try:
            dim = self.encoder.config.language.hidden_size
            images, routing, max_tiles, question = P.parse_encode_request(msg, dim)
            job = self.encoder.prepare(images, routing, max_tiles, question)
        except VisionInputError as e:
            self.stats.errors += 1
            sock.send_multipart([ident, *P.error_reply(rid, e.status, str(e), e.param)])
            return None
        except P.ProtocolError as e:
            self.stats.errors += 1
            sock.send_multipart([ident, *P.error_reply(rid, 400, str(e))])
            return None
        if job.cached is not None:
            self.stats.cache_hits += len(job.cached)
            sock.send_multipart([ident, *P.features_reply(rid, job.cached)])
            return None
        return rid, job

    def _compute(self, pending: list[tuple[bytes, str, PreparedJob]]) -> list:
        """On the compute thread: encode one batch (no socket here; replies go from the loop)."""
        tiles = sum(j.num_tiles for _, _, j in pending)
        self.stats.batches += 1
        self.stats.tiles += tiles
        self.stats.batch_sizes = self.stats.batch_sizes[-99:] + [tiles]
        try:
            return self.encoder.run([j for _, _, j in pending])
        except Exception as e:  # a model failure fails this batch, not the server
            return [e] * len(pending)

    def _reply(
        self, sock, pending: list[tuple[bytes, str, PreparedJob]], fut: concurrent.futures.Future
    ) -> None:
        try:
            results = fut.result()
        except Exception as e:
            results = [e] * len(pending)
        for (ident, rid, _), res in zip(pending, results):
            if isinstance(res, VisionInputError):
                reply = P.error_reply(rid, res.status, str(res), res.param)
            elif isinstance(res, Exception):
                reply = P.error_reply(rid, 500, f"vision failed: {type(res).__name__}: {res}")
            else:
                reply = P.features_reply(rid, res)
            sock.send_multipart([ident, *reply])


def run_vision_server(
    checkpoint: str,
    bind: str,
    threads: int = 1,
    max_batch_tiles: int = MAX_BATCH_TILES,
    max_wait_ms: float = MAX_WAIT_MS,
    cache_entries: int = 256,
    max_pixels: int | None = None,
    exit_with_parent: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
) -> int:
    import torch

    torch.set_num_threads(threads)
    model = vision_only(tessera.load(checkpoint), device, None)  # no language model here
    limits = VisionLimits(
        cache_entries=cache_entries, **({"max_pixels": max_pixels} if max_pixels else {})
    )
    encoder = VisionEncoder(model, limits, dtype=getattr(torch, dtype))
    server = VisionServer(encoder, bind, max_batch_tiles, max_wait_ms, exit_with_parent)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    print("vision server stopped", file=sys.stderr)
    return 0
