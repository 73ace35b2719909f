"""The language server's side of DvD: a pool of vision workers over ZeroMQ, load-balanced, supervised.

Workers are either remote (`--vision-server tcp://...`, started by someone else) or local (`--vision-workers
N`: child processes of this server, each a `tessera vision-server` bound to an ephemeral port). Each request
goes to the live worker with the fewest requests in flight. Failure handling:
- a local worker whose process exits is noticed within `poll_interval`: its in-flight requests fail at once
  with VisionUnavailable (HTTP 503), and a replacement is started (with backoff if it keeps dying);
- a local worker whose process lives but stops answering heartbeats for `heartbeat_timeout`
  (stopped, wedged) is treated the same way: marked down (its requests get a 503 then, not at the
  vision timeout), killed, and replaced. Workers answer pings while they compute a batch, so a long
  batch is not mistaken for a hang;
- a remote worker that stops answering heartbeats for `heartbeat_timeout` is marked down the same way and
  comes back by itself when it answers again;
- sends never block: DEALER sockets use ZMQ_IMMEDIATE and non-blocking sends, so a request to a worker that
  just vanished fails instead of waiting in a queue.
Text-only requests never touch this pool, so they keep working while vision is down.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

import torch
import zmq
import zmq.asyncio

from tessera.routing import RoutingPolicy
from tessera.serve import protocol as P
from tessera.serve.vision import MAX_BATCH_TILES, MAX_WAIT_MS, VisionInputError, VisionUnavailable


@dataclass
class LocalWorkerSpec:
    checkpoint: str
    threads: int = 1
    max_batch_tiles: int = MAX_BATCH_TILES
    max_wait_ms: float = MAX_WAIT_MS
    cache_entries: int = 256
    dtype: str = "float32"
    startup_timeout: float = 120.0
    device: str = "cpu"  # the workers' torch device (serve --vision-device)


@dataclass
class _Worker:
    name: str
    endpoint: str | None = None
    sock: zmq.asyncio.Socket | None = None
    proc: asyncio.subprocess.Process | None = None
    outstanding: dict[str, asyncio.Future] = field(default_factory=dict)
    alive: bool = False
    last_seen: float = 0.0
    last_pong: float = 0.0
    restarts: int = 0
    stats: dict = field(default_factory=dict)
    recv_task: asyncio.Task | None = None
    restarting: bool = False

    @property
    def local(self) -> bool:
        return self.proc is not None or self.restarting


class RemoteVision:
    """A VisionBackend backed by vision server processes."""

    def __init__(
        self,
        endpoints: list[str] | None = None,
        local: LocalWorkerSpec | None = None,
        num_local: int = 0,
        heartbeat: float = 1.0,
        heartbeat_timeout: float = 10.0,
        poll_interval: float = 0.1,
    ):
        if not endpoints and not num_local:
            raise ValueError(
                "decoupled vision needs --vision-workers N and/or --vision-server tcp://..."
            )
        if num_local and local is None:
            raise ValueError("local vision workers need a LocalWorkerSpec (the checkpoint to load)")
        self.local_spec = local
        self.workers = [_Worker(f"remote-{i}", endpoint=e) for i, e in enumerate(endpoints or [])]
        self.workers += [_Worker(f"local-{i}") for i in range(num_local)]
        self.heartbeat, self.heartbeat_timeout, self.poll_interval = (
            heartbeat,
            heartbeat_timeout,
            poll_interval,
        )
        self.ctx: zmq.asyncio.Context | None = None
        self._monitor: asyncio.Task | None = None
        self._rr = itertools.count()
        self._closing = False
        self._background: set[asyncio.Task] = set()

    # ---- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        remote = [w for w in self.workers if w.endpoint is not None]
        for w in remote:
            self._connect(w)
        local = [w for w in self.workers if w.endpoint is None]
        await asyncio.gather(
            *(self._spawn(w) for w in local), *(self._handshake(w, 5.0) for w in remote)
        )
        self._monitor = asyncio.create_task(self._watch())

    async def _handshake(self, w: _Worker, timeout: float) -> bool:
        """Ping until the first pong: the connection is up and the worker's loop is answering."""
        deadline = time.monotonic() + timeout
        since = time.monotonic()
        while w.last_pong < since:
            if time.monotonic() > deadline or w.sock is None:
                return False
            try:
                await w.sock.send_multipart(P.pack("ping", {"id": "ping"}), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # not connected yet (ZMQ_IMMEDIATE)
            await asyncio.sleep(0.02)
        w.alive, w.last_seen = True, time.monotonic()
        return True

    async def stop(self) -> None:
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
        for t in list(self._background):
            t.cancel()
        for w in self.workers:
            self._mark_down(w, "the server is shutting down")
            if w.recv_task is not None:
                w.recv_task.cancel()
            if w.sock is not None:
                w.sock.close(0)
                w.sock = None
            if w.proc is not None and w.proc.returncode is None:
                w.proc.kill()
                await w.proc.wait()
        if self.ctx is not None:
            self.ctx.term()

    async def _spawn(self, w: _Worker) -> None:
        spec = self.local_spec
        cmd = [
            sys.executable,
            "-m",
            "tessera.cli",
            "vision-server",
            spec.checkpoint,
            "--bind",
            "tcp://127.0.0.1:*",
            "--threads",
            str(spec.threads),
            "--max-batch-tiles",
            str(spec.max_batch_tiles),
            "--max-wait-ms",
            str(spec.max_wait_ms),
            "--cache-entries",
            str(spec.cache_entries),
            "--dtype",
            spec.dtype,
            "--exit-with-parent",
            "--device",
            spec.device,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads)}
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, env=env)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), spec.startup_timeout)
        except asyncio.TimeoutError:
            proc.kill()
            raise RuntimeError(
                f"vision worker {w.name} did not start within {spec.startup_timeout:.0f} s"
            ) from None
        except asyncio.CancelledError:  # shutting down while it starts: do not leave it behind
            proc.kill()
            await proc.wait()
            raise
        text = line.decode().strip()
        if not text.startswith("READY "):
            await proc.wait()
            raise RuntimeError(
                f"vision worker {w.name} failed to start (exit {proc.returncode}); see its stderr above"
            )
        w.proc, w.endpoint = proc, text.split(" ", 1)[1]
        self._connect(w)
        if not await self._handshake(w, spec.startup_timeout):
            proc.kill()
            raise RuntimeError(f"vision worker {w.name} at {w.endpoint} does not answer pings")

    def _connect(self, w: _Worker) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(w.endpoint)
        w.sock = sock
        w.recv_task = asyncio.create_task(self._receive(w, sock))

    async def _receive(self, w: _Worker, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            try:
                msg = P.unpack(frames)
            except P.ProtocolError:
                continue
            w.last_seen = time.monotonic()
            if msg.kind == "pong":
                w.stats = msg.header.get("stats", {})
                w.last_pong = w.last_seen
                if not w.alive and w.sock is sock and not w.local:
                    w.alive = True  # a remote worker came back (or answered for the first time)
                continue
            fut = w.outstanding.pop(str(msg.header.get("id")), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _mark_down(self, w: _Worker, why: str) -> None:
        w.alive = False
        for fut in w.outstanding.values():
            if not fut.done():
                fut.set_exception(VisionUnavailable(f"vision worker {w.name} failed: {why}"))
        w.outstanding.clear()
        if w.local and w.sock is not None:
            if w.recv_task is not None:
                w.recv_task.cancel()
            w.sock.close(0)
            w.sock = None

    async def _watch(self) -> None:
        next_ping = 0.0
        while not self._closing:
            now = time.monotonic()
            for w in self.workers:
                if w.proc is not None and w.proc.returncode is not None and not w.restarting:
                    self._mark_down(w, f"process exited with code {w.proc.returncode}")
                    w.restarting = True
                    task = asyncio.create_task(self._restart(w))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
                elif (
                    w.endpoint is not None
                    and not w.restarting
                    and w.alive
                    and now - w.last_seen > self.heartbeat_timeout
                ):
                    self._mark_down(w, f"no heartbeat for {now - w.last_seen:.1f} s")
                    if w.proc is not None and w.proc.returncode is None:
                        w.proc.kill()  # a hung local worker: its exit is seen next poll; replaced
            if now >= next_ping:
                next_ping = now + self.heartbeat
                for w in self.workers:
                    if w.sock is not None:
                        try:
                            await w.sock.send_multipart(
                                P.pack("ping", {"id": "ping"}), flags=zmq.NOBLOCK
                            )
                        except zmq.ZMQError:
                            pass
            await asyncio.sleep(self.poll_interval)

    async def _restart(self, w: _Worker) -> None:
        delay = min(0.5 * 2 ** min(w.restarts, 5), 10.0)
        w.restarts += 1
        w.proc = None
        while not self._closing:
            try:
                await self._spawn(w)
                break
            except (RuntimeError, OSError) as e:
                print(
                    f"tessera: restarting {w.name} failed ({e}); retrying in {delay:.1f} s",
                    file=sys.stderr,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        w.restarting = False

    # ---- requests -----------------------------------------------------------------------------------------

    async def encode(
        self,
        images: list[bytes],
        routing: RoutingPolicy,
        max_tiles: int | None,
        question: torch.Tensor | None = None,
    ) -> list[P.EncodedImage]:
        """question: the question's embedding [Dl] for question routing (sent with the images)."""
        alive = [w for w in self.workers if w.alive and w.sock is not None]
        if not alive:
            down = ", ".join(
                f"{w.name} ({'restarting' if w.restarting else 'down'})" for w in self.workers
            )
            raise VisionUnavailable(f"no vision worker is up: {down}")
        fewest = min(len(w.outstanding) for w in alive)
        ties = [w for w in alive if len(w.outstanding) == fewest]
        w = ties[next(self._rr) % len(ties)]
        rid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        w.outstanding[rid] = fut
        try:
            await w.sock.send_multipart(
                P.encode_request(rid, images, routing, max_tiles, question),
                flags=zmq.NOBLOCK,
                copy=False,
            )
        except zmq.ZMQError as e:
            w.outstanding.pop(rid, None)
            raise VisionUnavailable(f"vision worker {w.name} is not reachable ({e})") from None
        try:
            msg = await fut
        finally:
            w.outstanding.pop(rid, None)
        if msg.kind == "error":
            status = int(msg.header.get("status", 500))
            if 400 <= status < 500:
                raise VisionInputError(
                    msg.header.get("message", "bad image"), status, msg.header.get("param")
                )
            raise VisionUnavailable(msg.header.get("message", "vision failed"))
        try:
            return P.parse_features(msg)
        except P.ProtocolError as e:
            raise VisionUnavailable(f"malformed reply from {w.name}: {e}") from None

    def status(self) -> dict:
        return {
            "mode": "decoupled",
            "workers_alive": sum(w.alive for w in self.workers),
            "workers_total": len(self.workers),
            "restarts": sum(w.restarts for w in self.workers),
            "cache_hits": sum(int(w.stats.get("cache_hits", 0)) for w in self.workers),
            "token_cache_hits": sum(int(w.stats.get("token_cache_hits", 0)) for w in self.workers),
            "workers": [
                {
                    "name": w.name,
                    "endpoint": w.endpoint,
                    "alive": w.alive,
                    "in_flight": len(w.outstanding),
                    "pid": w.proc.pid if w.proc is not None else None,
                }
                for w in self.workers
            ],
        }
