"""Continuous batching over prompt embeddings.

The engine owns the language model's decode loop and nothing else: requests arrive as prompt token ids plus
optional image features (already computed elsewhere — the engine never sees pixels), and leave as a stream of
token events. One iteration (`step`):
1. run the jobs queued with `call_in_loop` (coupled serving runs its vision work here, between steps),
2. admit waiting requests into free cache slots and prefill them together (right-padded, ragged lengths
   masked), sampling each one's first token,
3. decode every running sequence in one batched forward of one token each.
So a request that arrives while others decode joins the batch at the next iteration.

Threading: `start()` runs the loop on a background thread; `submit`, `abort` and `call_in_loop` may be called
from any thread; event callbacks run on the loop thread and must be quick (hand off, don't work).

Isolation: one request's failure never fails the others of its batch. Its preparation
(embedding, generator) is done per request; a batched prefill that raises is retried one request at
a time; a batched sampling call that raises is redone row by row; an event callback that raises ends
only its own sequence.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tessera.engine.decode import DecodeStep, prefill
from tessera.engine.kv_cache import CacheGeometry, SlotKVCache
from tessera.engine.sampling import SamplingParams, sample_tokens

log = logging.getLogger(__name__)


class EngineFull(RuntimeError):
    """The waiting queue is at its bound; the caller should shed load (HTTP 429)."""


@dataclass
class TokenEvent:
    """One generated token of one request, or the end of it. `token_id` is None when a request ends without a
    token (abort or error). `finish_reason` ∈ {"stop", "length", "abort", "error"} when `finished`."""

    request_id: str
    token_id: int | None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[TokenEvent], None]
    image_features: torch.Tensor | None = (
        None  # [ΣT, D], rows for the prompt's <IMG_CONTEXT> positions in order
    )
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class _Sequence:
    req: GenerationRequest
    slot: int
    length: int  # tokens already in the cache
    pending: int  # sampled token not yet in the cache
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished_requests: int = 0
    steps: int = 0
    tokens_per_second: float = (
        0.0  # generated tokens over the last `window` seconds, at snapshot time
    )


class Engine:
    """Continuous-batching generation for a decoder honouring the cache protocol of docs/CONTRACTS.md.

    llm: has `hidden(inputs_embeds [B,T,D], position_ids [B,T], cache=, attn_mask=) -> [B,T,D]` and
    `lm_head` (hidden → logits). embed_fn(input_ids [1,T], image_features | None) -> [1,T,D] builds prompt
    embeddings (defaults to the llm's token embedding, text only); token_embed(ids [B,1]) -> [B,1,D] embeds
    generated tokens (defaults to `llm.model.embed_tokens`). compile=True runs decode steps through
    torch.compile (see tessera/engine/decode.py: weights are frozen into the graph, the first step of each batch
    bucket compiles, `warmup()` does that up front).
    """

    def __init__(
        self,
        llm: torch.nn.Module,
        *,
        max_batch: int = 16,
        max_len: int = 2048,
        max_waiting: int = 256,
        prefill_token_budget: int = 4096,
        embed_fn: Callable | None = None,
        token_embed: Callable | None = None,
        tokens_per_second_window: float = 5.0,
        compile: bool = False,
    ):
        for attr in ("hidden", "lm_head"):
            if not hasattr(llm, attr):
                raise TypeError(
                    f"the engine needs llm.{attr} (see docs/CONTRACTS.md); {type(llm).__name__} lacks it"
                )
        cfg = llm.config
        self.llm = llm.eval()
        self.max_batch, self.max_len, self.max_waiting = max_batch, max_len, max_waiting
        self.prefill_token_budget = prefill_token_budget
        self.token_embed = token_embed or llm.model.embed_tokens
        self.embed_fn = embed_fn or self._text_embed
        param = next(llm.parameters())
        self.device, self.dtype = param.device, param.dtype
        windows = (
            llm.windows() if hasattr(llm, "windows") else {}
        )  # sliding layers store only their window
        geometry = CacheGeometry(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, max_batch, max_len, windows
        )
        self.cache = SlotKVCache(geometry, dtype=self.dtype, device=self.device)
        self.decoder = DecodeStep(
            llm, self.token_embed, self.cache, self.dtype, self.device, compile=compile
        )
        self.running: list[_Sequence] = []  # running[i].slot == i
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.stats = EngineStats()
        self._window = tokens_per_second_window
        self._recent: collections.deque[tuple[float, int]] = (
            collections.deque()
        )  # (time, tokens) per step
        self._lock = threading.Lock()
        self._inbox: collections.deque[tuple[str, object]] = (
            collections.deque()
        )  # ("abort"|"job", payload)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False

    # ---- thread-safe API ---------------------------------------------------------------------------------

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request. Raises ValueError if it can never fit, EngineFull if the queue is at its bound."""
        n = len(req.prompt_ids)
        if n == 0:
            raise ValueError("empty prompt")
        if n + req.params.max_tokens > self.max_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({req.params.max_tokens}) exceeds the context of "
                f"{self.max_len} tokens"
            )
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise EngineFull(
                    f"{len(self.waiting)} requests already waiting (bound {self.max_waiting})"
                )
            self.waiting.append(req)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def call_in_loop(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn on the loop thread before the next step (the coupled topology's vision work)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._inbox.append(("job", (fn, fut)))
        self._wake.set()
        return fut

    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="tessera-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def warmup(self) -> None:
        """Compile the decode graphs now rather than on first use (no-op unless compile=True): after
        construction, before `start()` and before any request runs (it writes into free cache slots)."""
        if self.running or self._thread is not None:
            raise RuntimeError(
                "call warmup() before start() and before any request runs: it writes into cache slots"
            )
        with torch.inference_mode():
            self.decoder.warmup()

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._inbox)

    # ---- the loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop:
                if not self.has_work():
                    self._wake.wait(0.25)
                    self._wake.clear()
                    continue
                self.step()

    @torch.inference_mode()
    def step(self) -> int:
        """One iteration: jobs, admissions + prefill, one decode step. Returns the number of tokens produced."""
        self._drain_inbox()
        produced = self._admit()
        if self.running:
            produced += self._decode()
        self.stats.steps += 1
        self._account(produced)
        return produced

    def _drain_inbox(self) -> None:
        while True:
            with self._lock:
                if not self._inbox:
                    return
                kind, payload = self._inbox.popleft()
            if kind == "abort":
                self._abort(payload)
            else:
                fn, fut = payload
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # the job's caller decides what a failure means
                        fut.set_exception(e)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            for req in list(self.waiting):
                if req.request_id == request_id:
                    self.waiting.remove(req)
                    self._notify(req, TokenEvent(request_id, None, True, "abort"))
        for seq in self.running:
            if seq.req.request_id == request_id and not seq.done:
                seq.done = True
                self._notify(seq.req, TokenEvent(request_id, None, True, "abort"))
        self._compact()

    # ---- prefill ------------------------------------------------------------------------------------------

    def _notify(self, req: GenerationRequest, event: TokenEvent) -> bool:
        """Deliver an event; a callback that raises fails its own request only (False: end it)."""
        try:
            req.on_event(event)
            return True
        except Exception:
            log.exception("the event callback of request %s failed; ending it", req.request_id)
            return False

    def _fail(self, req: GenerationRequest, why: str) -> None:
        self._notify(req, TokenEvent(req.request_id, None, True, "error", why))

    def _admit(self) -> int:
        batch: list[tuple[GenerationRequest, torch.Tensor, torch.Generator | None]] = []
        longest = 0
        while len(self.running) + len(batch) < self.max_batch:
            with self._lock:
                if not self.waiting:
                    break
                req = self.waiting[0]
                n = len(req.prompt_ids)
                if batch and max(longest, n) * (len(batch) + 1) > self.prefill_token_budget:
                    break
                self.waiting.popleft()
            try:
                ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)  # [1, T]
                embeds = self.embed_fn(ids, req.image_features)[0].to(self.dtype)  # [T, D]
                generator = req.params.make_generator()  # e.g. a seed beyond 64 bits: this one only
            except (
                Exception
            ) as e:  # e.g. feature rows ≠ <IMG_CONTEXT> count: fail this request only
                self._fail(req, f"{type(e).__name__}: {e}")
                continue
            batch.append((req, embeds, generator))
            longest = max(longest, n)
        if not batch:
            return 0
        try:
            return self._prefill(batch)
        except Exception as e:
            if len(batch) == 1:
                self._fail(batch[0][0], f"prefill failed: {type(e).__name__}: {e}")
                return 0
        produced = 0  # the batch failed: one at a time, so only the request at fault fails
        for item in batch:
            try:
                produced += self._prefill([item])
            except Exception as e:
                self._fail(item[0], f"prefill failed: {type(e).__name__}: {e}")
        return produced

    def _prefill(
        self, batch: list[tuple[GenerationRequest, torch.Tensor, torch.Generator | None]]
    ) -> int:
        lengths = torch.tensor([e.shape[0] for _, e, _ in batch], device=self.device)  # [k]
        first = len(self.running)
        logits = prefill(self.llm, self.cache, first, [e for _, e, _ in batch])  # [k, V]
        seqs = [
            _Sequence(req, first + i, int(lengths[i]), -1, gen)
            for i, (req, _, gen) in enumerate(batch)
        ]
        tokens = self._sample(logits, seqs)
        self.running.extend(seqs)
        self.stats.prompt_tokens += int(lengths.sum())
        for seq, tok in zip(seqs, tokens):
            self._emit(seq, tok)
        self._compact()
        return sum(not isinstance(t, Exception) for t in tokens)

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int | Exception]:
        """One token per sequence from logits [B, V]; if the batched call raises, row by row, so
        a failure is the failing row's only. The generators' states are restored first, so a seeded
        row draws what it would have drawn had the failure not happened."""
        states = [q.generator.get_state() if q.generator is not None else None for q in seqs]
        try:
            return sample_tokens(logits, [q.req.params for q in seqs], [q.generator for q in seqs])[
                0
            ]
        except Exception:
            out: list[int | Exception] = []
            for b, q in enumerate(seqs):
                if states[b] is not None:
                    q.generator.set_state(states[b])
                try:
                    out.append(
                        sample_tokens(logits[b : b + 1], [q.req.params], [q.generator])[0][0]
                    )
                except Exception as e:
                    out.append(e)
            return out

    # ---- decode -------------------------------------------------------------------------------------------

    def _decode(self) -> int:
        seqs = self.running
        try:
            logits = self.decoder([q.pending for q in seqs], [q.length for q in seqs])  # [B, V]
        except Exception as e:
            for q in seqs:
                q.done = True
                self._fail(q.req, f"decode failed: {type(e).__name__}: {e}")
            self._compact()
            return 0
        sampled = self._sample(logits, seqs)
        for q, tok in zip(seqs, sampled):
            q.length += 1
            self._emit(q, tok)
        self._compact()
        return sum(not isinstance(t, Exception) for t in sampled)

    def _emit(self, seq: _Sequence, token: int | Exception) -> None:
        """Record a sampled token, decide whether the sequence ends, and tell the request (a
        sampling failure ends this sequence with an error)."""
        if isinstance(token, Exception):
            seq.done = True
            self._fail(seq.req, f"sampling failed: {type(token).__name__}: {token}")
            return
        seq.output.append(token)
        seq.pending = token
        p = seq.req.params
        reason = None
        if token in p.stop_ids:
            reason = "stop"
        elif len(seq.output) >= p.max_tokens or seq.length + 1 >= self.max_len:
            reason = "length"
        if reason:
            seq.done = True
            self.stats.finished_requests += 1
        event = TokenEvent(seq.req.request_id, token, reason is not None, reason)
        if not self._notify(seq.req, event):
            seq.done = True

    def _compact(self) -> None:
        """Drop finished sequences and move the survivors beyond the prefix into the holes (one copy each)."""
        if all(not q.done for q in self.running):
            return
        keep = [q for q in self.running if not q.done]
        n = len(keep)
        occupied = {q.slot for q in keep}
        holes = [s for s in range(n) if s not in occupied]
        movers = [q for q in keep if q.slot >= n]
        for hole, q in zip(holes, movers):
            self.cache.move(q.slot, hole, q.length)
            q.slot = hole
        self.running = sorted(keep, key=lambda q: q.slot)

    def _account(self, produced: int) -> None:
        now = time.monotonic()
        self.stats.generated_tokens += produced
        self._recent.append((now, produced))
        while self._recent and self._recent[0][0] < now - self._window:
            self._recent.popleft()

    def snapshot(self) -> EngineStats:
        """Current counters; tokens/s counts the tokens generated during the last `window` seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if t >= now - self._window]
        tps = sum(n for _, n in recent) / self._window
        return dataclasses.replace(
            self.stats, waiting=len(self.waiting), running=len(self.running), tokens_per_second=tps
        )

    def _text_embed(self, ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        if image_features is not None:
            raise ValueError(
                "this engine has no embed_fn for image features (pass the model's embed)"
            )
        return self.token_embed(ids)
