"""The language server: OpenAI request → images to the vision side → prompt → engine → token stream.

It runs on the API's asyncio loop and never computes on tensors itself: vision work happens in the vision
backend (on the engine thread between steps when coupled; in other processes when decoupled), generation on
the engine's thread. While a request's features are awaited, the engine keeps decoding everyone else.
Question routing (`routing: "question"`): the question's embedding (the last user message's text parts, mean
of the LLM's token embeddings) is computed here, on a worker thread, and sent with the images; the vision
side (possibly a worker without language weights) never computes it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tessera.engine import Engine, EngineFull, GenerationRequest, SamplingParams, TokenEvent
from tessera.routing import RoutingPolicy, question_vectors
from tessera.serve.detok import Delta, TextAssembler
from tessera.serve.metrics import Metrics
from tessera.serve.prompt import Conversation, read_conversation, render_prompt
from tessera.serve.protocol import EncodedImage
from tessera.serve.schema import APIError, ChatCompletionRequest
from tessera.serve.vision import (
    MAX_BATCH_TILES,
    PreparedJob,
    VisionEncoder,
    VisionInputError,
    VisionUnavailable,
)

log = logging.getLogger(__name__)

OFF_LOOP_CHARS = 4096  # a request with more text than this is read and tokenised on a worker thread
NORMALISATION_MARGIN = 4  # slack on the longest token's characters (a normaliser may compose some)


def longest_token_chars(tokenizer) -> int | None:
    """The most text characters one token can stand for (its vocabulary string: a byte-level token's
    characters are bytes), or None when the tokenizer does not expose its vocabulary."""
    inner = getattr(tokenizer, "tokenizer", None)
    try:
        vocab = inner.get_vocab(with_added_tokens=True)
    except Exception:
        return None
    return max((len(t) for t in vocab), default=None)


class EventPump:
    """Hands token events from the engine thread to the requests' asyncio queues with one loop wake-up per burst.

    A decode step emits one event per running sequence; waking the loop for each (`call_soon_threadsafe` writes
    to its self-pipe) made the engine thread wait for the GIL after every write: 14 % of its samples under the
    9-tile serving load (py-spy, docs/BENCHMARKS.md "Serving"). Here the first event of a burst schedules one
    drain and the rest only append.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: collections.deque[tuple[asyncio.Queue, TokenEvent]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def push(self, queue: asyncio.Queue, event: TokenEvent) -> None:
        """Called on the engine thread."""
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """Runs on the loop: deliver everything pushed so far, in order."""
        with self._lock:
            items, self._pending = self._pending, collections.deque()
            self._scheduled = False
        for queue, event in items:
            queue.put_nowait(event)


def _detok_failed(e: Exception) -> str:
    return f"detokenisation failed: {type(e).__name__}: {e}"


def _text_chars(req: ChatCompletionRequest, text_only: bool = False) -> int:
    """Characters of the request's content: text and image URLs, or text only."""
    total = 0
    for m in req.messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content is not None:
            for p in m.content:
                if p.type == "text":
                    total += len(p.text)
                elif not text_only:
                    total += len(p.image_url.url)
    return total


def check_question_routing(model, mode: str = "question") -> None:
    """Question routing needs the question-aware router and, here, the LLM's token embeddings (to embed the
    question): an APIError 400 on `routing` naming what is missing."""
    if not (model.config.flash.enabled and model.config.flash.question_router):
        raise APIError(
            400,
            f"routing {mode!r} needs a model with a question-aware router (tessera train "
            "question_router); this one has none: use routing 'router' or 'full'",
            param="routing",
        )
    if model.language_model.embed_tokens.weight.is_meta:
        raise APIError(
            400,
            f"routing {mode!r} needs the LLM's token embeddings to embed the question, and this "
            "server holds none (load the model with tessera.serve.vision.vision_only(..., "
            "keep_embeddings=True)); use routing 'router'",
            param="routing",
        )


def embed_question(model, text: str) -> torch.Tensor:
    """The question's embedding [Dl] float32 (tessera.routing.question_vectors: mean token embedding) of the
    last user message's text, what question routing sends the vision side with the images."""
    with torch.inference_mode():
        return question_vectors(model, [text])[0].float().contiguous()  # [1, Dl] → [Dl]


class VisionBackend(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def encode(
        self,
        images: list[bytes],
        routing: RoutingPolicy,
        max_tiles: int | None,
        question: torch.Tensor | None = None,  # [Dl] float32, for question routing
    ) -> list[EncodedImage]: ...
    def status(self) -> dict: ...


@dataclass
class ServeOptions:
    model_name: str = "tessera"
    max_batch: int = 16
    max_len: int | None = None  # context per sequence; None → min(model's max positions, 4096)
    max_waiting: int = 64  # engine queue bound (beyond → 429)
    max_vision_inflight: int = 32  # requests waiting for features (beyond → 429)
    max_images: int = 8
    max_image_bytes: int = 20 * 2**20
    max_body_bytes: int = 32 * 2**20  # a body: one image at max_image_bytes as base64, plus text
    allow_remote_images: bool = False
    remote_fetch_timeout: float = 10.0
    default_routing: str = "full"
    default_max_tokens: int = 512
    vision_timeout: float = 120.0
    compile: bool = (
        False  # decode steps through torch.compile, graphs built at start (Engine.warmup)
    )


class CoupledVision:
    """Vision inside the language process: the sequential baseline. Images are decoded and tiled on a
    worker thread; the ViT, router and projectors run on the engine thread between steps, so they pause
    everyone's decoding. Requests that arrive while one batch waits or runs are encoded together, one ViT
    call per batch of up to `max_batch_tiles` tiles (as a vision server batches them): one call per image
    made the coupled server 39 % vision time under 16 in-flight 1-tile requests (py-spy,
    docs/log/2026-12-03-export.md)."""

    def __init__(self, encoder: VisionEncoder, max_batch_tiles: int = MAX_BATCH_TILES):
        self.encoder = encoder
        self.max_batch_tiles = max_batch_tiles
        self.engine: Engine | None = None  # set by the LanguageServer
        self._pending: collections.deque[tuple[PreparedJob, concurrent.futures.Future]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        self._scheduled = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def _submit(self, fn) -> None:
        """Run fn where the vision compute belongs: the engine thread, between steps."""
        self.engine.call_in_loop(fn)

    async def encode(
        self,
        images: list[bytes],
        routing: RoutingPolicy,
        max_tiles: int | None,
        question: torch.Tensor | None = None,
    ) -> list[EncodedImage]:
        job = await asyncio.to_thread(
            self.encoder.prepare, images, routing, max_tiles, question
        )  # decode + tile (or find the ViT tokens)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending.append((job, fut))
            schedule, self._scheduled = not self._scheduled, True
        if schedule:
            self._submit(self._run_pending)
        return await asyncio.wrap_future(fut)

    def _run_pending(self) -> None:
        """One ViT batch of the waiting jobs (up to max_batch_tiles tiles; the rest in the next call)."""
        with self._lock:
            batch, tiles = [], 0
            while self._pending and (
                not batch or tiles + self._pending[0][0].num_tiles <= self.max_batch_tiles
            ):
                batch.append(self._pending.popleft())
                tiles += batch[-1][0].num_tiles
            more = bool(self._pending)
            self._scheduled = more
        if more:
            self._submit(self._run_pending)
        try:
            results = self.encoder.run([job for job, _ in batch])
        except (
            Exception
        ) as e:  # the whole batch failed (e.g. a routing setup error): every request hears it
            results = [e] * len(batch)
        for (_, fut), result in zip(batch, results):
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def status(self) -> dict:
        c = self.encoder.cache
        return {
            "mode": "coupled",
            "workers_alive": 1,
            "workers_total": 1,
            "cache_hits": c.hits,
            "cache_entries": len(c),
            "token_cache_hits": self.encoder.tokens.hits,
            "vit_tiles": self.encoder.vit_tiles,
        }


@dataclass
class Prepared:
    """A request ready for the engine."""

    request_id: str
    prompt_ids: list[int]
    features: torch.Tensor | None
    images: list[EncodedImage]
    thinking: bool
    max_tokens: int
    arrival: float

    @property
    def visual_tokens(self) -> int:
        return sum(im.meta.rows for im in self.images)

    @property
    def visual_tokens_saved(self) -> int:
        return sum(im.meta.full_tokens - im.meta.rows for im in self.images)


@dataclass
class ChoiceEvent:
    index: int
    delta: Delta
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Generation:
    """The n sequences of one request, merged into one event stream."""

    server: LanguageServer
    prepared: Prepared
    ids: list[str]
    queue: asyncio.Queue
    assemblers: list[TextAssembler]
    completion_tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        open_ = set(range(len(self.ids)))
        index = {rid: i for i, rid in enumerate(self.ids)}
        try:
            while open_:
                ev: TokenEvent = await self.queue.get()
                i = index[ev.request_id]
                if i not in open_:
                    continue
                asm = self.assemblers[i]
                delta = Delta()
                if ev.token_id is not None:
                    self.completion_tokens[i] += 1
                    if self.first_token_at is None:
                        self.first_token_at = time.monotonic()
                        self.server.metrics.observe_ttft(
                            self.first_token_at - self.prepared.arrival
                        )
                    if not (ev.finished and ev.finish_reason == "stop"):
                        try:
                            delta = asm.push(ev.token_id)
                        except Exception as e:  # this request's detokenisation: fail it alone
                            log.exception("detokenising %s failed", ev.request_id)
                            yield ChoiceEvent(i, Delta(), "error", _detok_failed(e))
                            return
                reason = ev.finish_reason if ev.finished else None
                if (
                    delta.stopped
                ):  # a stop string: this choice ends here, whatever the engine does next
                    if not ev.finished:
                        self.server.engine.abort(ev.request_id)
                    reason = "stop"
                if reason is not None:
                    try:
                        tail = asm.finish()
                    except Exception as e:
                        log.exception("detokenising %s failed", ev.request_id)
                        yield ChoiceEvent(i, Delta(), "error", _detok_failed(e))
                        return
                    delta = Delta(
                        delta.content + tail.content, delta.reasoning + tail.reasoning, True
                    )
                    open_.discard(i)
                yield ChoiceEvent(i, delta, reason, ev.error)
        finally:
            for i in open_:
                self.server.engine.abort(self.ids[i])


class LanguageServer:
    def __init__(self, model, vision: VisionBackend | None, options: ServeOptions | None = None):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(
                "the model has no tokenizer; load it with tessera.load(checkpoint_dir)"
            )
        self.options = opts = options or ServeOptions()
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        lm_cfg = model.config.language
        self.max_len = opts.max_len or min(lm_cfg.max_position_embeddings, 4096)
        self.engine = Engine(
            model.language_model,
            max_batch=opts.max_batch,
            max_len=self.max_len,
            max_waiting=opts.max_waiting,
            embed_fn=model.embed,
            compile=opts.compile,
        )
        self.vision = vision
        if isinstance(vision, CoupledVision):
            vision.engine = self.engine
        self.metrics = Metrics()
        self.vision_inflight = 0
        self._pump: EventPump | None = None  # bound to the serving loop on first use
        self.stop_ids = frozenset({self.tokenizer.im_end_id, self.tokenizer.pad_id})
        longest = longest_token_chars(self.tokenizer)
        # text longer than this cannot fit the context whatever it says: refused before tokenising
        self.max_prompt_chars = (
            None if longest is None else self.max_len * longest * NORMALISATION_MARGIN
        )

    async def start(self) -> None:
        if self.options.compile:
            await asyncio.to_thread(
                self.engine.warmup
            )  # compile before the first request, not during it
        self.engine.start()
        if self.vision is not None:
            await self.vision.start()

    async def stop(self) -> None:
        if self.vision is not None:
            await self.vision.stop()
        self.engine.stop()

    def alive(self) -> bool:
        """Whether generation can run (the engine's thread is up)."""
        return self.engine._thread is not None and self.engine._thread.is_alive()

    # ---- request → prepared -------------------------------------------------------------------------------

    async def prepare(self, req: ChatCompletionRequest) -> Prepared:
        opts = self.options
        arrival = time.monotonic()
        # long text (and base64 images) is read and tokenised on a worker thread: the loop serves on
        chars = _text_chars(req, text_only=True)
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise APIError(
                400,
                f"this model's context is {self.max_len} tokens; the messages' "
                f"{chars} characters need more",
                param="messages",
                code="context_length_exceeded",
            )
        off_loop = _text_chars(req) > OFF_LOOP_CHARS
        read = (
            read_conversation,
            req,
            opts.max_images,
            opts.max_image_bytes,
            opts.allow_remote_images,
        )
        conv = await asyncio.to_thread(*read) if off_loop else read[0](*read[1:])
        images = await self._encode_images(conv, req) if conv.images else []
        thinking = req.thinking_enabled
        render = (render_prompt, self.tokenizer, conv, [im.meta.rows for im in images], thinking)
        try:
            prompt = await asyncio.to_thread(*render) if off_loop else render[0](*render[1:])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        room = self.max_len - len(prompt)
        limit = req.token_limit
        if room < 1 or (limit is not None and limit > room):
            asked = f" + max_tokens ({limit})" if limit is not None else ""
            raise APIError(
                400,
                f"this model's context is {self.max_len} tokens; the prompt has {len(prompt)}{asked}",
                param="messages",
                code="context_length_exceeded",
            )
        features = torch.cat([im.features for im in images]) if images else None  # [ΣT, D]
        return Prepared(
            uuid.uuid4().hex[:16],
            prompt,
            features,
            images,
            thinking,
            limit or min(opts.default_max_tokens, room),
            arrival,
        )

    async def _encode_images(
        self, conv: Conversation, req: ChatCompletionRequest
    ) -> list[EncodedImage]:
        if self.vision is None:
            raise APIError(
                400, "this server has no vision backend; send text only", param="messages"
            )
        opts = self.options
        if self.vision_inflight >= opts.max_vision_inflight:
            self.metrics.rejected += 1
            raise APIError(
                429,
                f"{self.vision_inflight} image requests are already being encoded; retry later",
                code="rate_limit_exceeded",
            )
        blobs = [
            ref.data if ref.data is not None else await self._fetch(ref.url, ref.param)
            for ref in conv.images
        ]
        try:
            routing = RoutingPolicy(
                req.routing or opts.default_routing, budget=req.visual_token_budget
            )
        except ValueError as e:
            raise APIError(400, str(e), param="routing") from None
        question = None
        if routing.needs_question:
            check_question_routing(self.model, routing.mode)
            question = await asyncio.to_thread(embed_question, self.model, conv.turns[-1][1])
        self.vision_inflight += 1
        try:
            images = await asyncio.wait_for(
                self.vision.encode(blobs, routing, req.max_tiles, question), opts.vision_timeout
            )
        except VisionInputError as e:
            raise APIError(e.status, str(e), param=e.param, code="invalid_image") from None
        except VisionUnavailable as e:
            raise APIError(503, f"vision is unavailable: {e}", code="vision_unavailable") from None
        except asyncio.TimeoutError:
            raise APIError(
                503,
                f"vision did not answer within {opts.vision_timeout:.0f} s",
                code="vision_timeout",
            ) from None
        finally:
            self.vision_inflight -= 1
        self.metrics.record_images(images)
        return images

    async def _fetch(self, url: str, param: str) -> bytes:
        import httpx

        limit = self.options.max_image_bytes
        try:
            async with httpx.AsyncClient(
                timeout=self.options.remote_fetch_timeout, follow_redirects=True
            ) as client:
                async with client.stream("GET", url) as r:
                    r.raise_for_status()
                    data = bytearray()
                    async for chunk in r.aiter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise APIError(
                                413, f"image at {url} is larger than {limit} bytes", param=param
                            )
                    return bytes(data)
        except httpx.HTTPError as e:
            raise APIError(
                400, f"could not fetch {url}: {e}", param=param, code="image_fetch_failed"
            ) from None

    # ---- prepared → tokens --------------------------------------------------------------------------------

    def generate(self, prepared: Prepared, req: ChatCompletionRequest) -> Generation:
        loop = asyncio.get_running_loop()
        if self._pump is None or self._pump.loop is not loop:
            self._pump = EventPump(loop)
        pump, queue = self._pump, asyncio.Queue()
        on_event = lambda ev: pump.push(queue, ev)  # noqa: E731  (engine thread → loop)
        n = req.n
        ids = [f"{prepared.request_id}-{i}" for i in range(n)]
        temperature = 1.0 if req.temperature is None else req.temperature
        submitted = []
        try:
            for i, rid in enumerate(ids):
                seed = None if req.seed is None else (req.seed + i) % 2**64  # choice i: next seed
                params = SamplingParams(
                    max_tokens=prepared.max_tokens,
                    temperature=temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    seed=seed,
                    stop_ids=frozenset() if req.ignore_eos else self.stop_ids,
                )
                self.engine.submit(
                    GenerationRequest(
                        rid,
                        prepared.prompt_ids,
                        params,
                        on_event,
                        prepared.features,
                        prepared.arrival,
                    )
                )
                submitted.append(rid)
        except EngineFull as e:
            for rid in submitted:
                self.engine.abort(rid)
            self.metrics.rejected += 1
            raise APIError(
                429, f"the server is at capacity ({e}); retry later", code="rate_limit_exceeded"
            ) from None
        except ValueError as e:
            for rid in submitted:
                self.engine.abort(rid)
            raise APIError(
                400, str(e), param="max_tokens", code="context_length_exceeded"
            ) from None
        self.metrics.requests += 1
        self.metrics.prompt_tokens += len(prepared.prompt_ids)
        assemblers = [TextAssembler(self.tokenizer, prepared.thinking, req.stop) for _ in ids]
        return Generation(self, prepared, ids, queue, assemblers, [0] * n)

    def status(self) -> dict:
        s = self.engine.snapshot()
        v = (
            self.vision.status()
            if self.vision is not None
            else {"mode": "none", "workers_alive": 0, "workers_total": 0}
        )
        return {"engine": s, "vision": v, "vision_inflight": self.vision_inflight}
