"""vLLM as the language server: Tessera keeps the vision side, vLLM runs the LLM
(`--language-backend vllm`).

Tessera still decodes, tiles, encodes, routes and projects every image (coupled on a worker thread,
or on local or remote vision servers, with the feature cache), renders the prompt with its own
template to count and check it, and serves the same OpenAI API. The LLM runs in a vLLM server (`vllm
serve` of the checkpoint's hf export, with `--enable-mm-embeds`): each choice goes to its
/v1/chat/completions with the images replaced by their post-projector features as `image_embeds`
parts (a .npy payload; vLLM sizes each `<IMG_CONTEXT>` run from the embedding's rows, so routed
images with fewer tokens per tile pass through). The export's chat template renders exactly
Tessera's prompt; vLLM returns the prompt's token ids in its first chunk and they are checked
against Tessera's. Generated token ids come back (`return_token_ids`) and go through Tessera's
detokeniser, so reasoning split, stop strings and usage are the same as with Tessera's engine.

vLLM is never imported here: the server is either one already running (`--vllm-url`, e.g. multi-node
with tensor or pipeline parallelism) or one this module starts with an interpreter that has vLLM
(`--vllm-python`, $TESSERA_VLLM_PYTHON, or this one when `pip install 'tessera[vllm]'` put vLLM in
it).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import importlib.util
import io
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from tessera.engine import EngineStats
from tessera.model.checkpoint import convert
from tessera.serve.detok import Delta, TextAssembler
from tessera.serve.language_server import (
    NORMALISATION_MARGIN,
    ChoiceEvent,
    CoupledVision,
    LanguageServer,
    Prepared,
    ServeOptions,
    VisionBackend,
    _detok_failed,
    longest_token_chars,
)
from tessera.serve.metrics import Metrics
from tessera.serve.schema import APIError, ChatCompletionRequest, ImagePart, TextPart
from tessera.serve.vision import MAX_BATCH_TILES

log = logging.getLogger(__name__)

VLLM_PYTHON_ENV = "TESSERA_VLLM_PYTHON"
INSTALL_HINT = (
    "--language-backend vllm needs vLLM: `pip install 'tessera[vllm]'`, or --vllm-python PATH "
    f"(or ${VLLM_PYTHON_ENV}) naming a Python that has it, or --vllm-url for a running `vllm serve "
    "DIR --enable-mm-embeds` of `tessera convert CKPT DIR --to hf`"
)


class VLLMUnavailable(RuntimeError):
    """vLLM cannot be found, started or reached."""


# ---- the vLLM process
# ---------------------------------------------------------------------------------


@dataclass
class VLLMOptions:
    url: str | None = None  # a running server's base URL (http://host:port); None: start one
    python: str | None = (
        None  # the interpreter to start it with (None: $TESSERA_VLLM_PYTHON, else this one)
    )
    extra_args: list[str] = field(
        default_factory=list
    )  # passed to `vllm serve` (e.g. --tensor-parallel-size 2)
    dtype: str = "auto"
    startup_timeout: float = 600.0
    export_dir: str | None = (
        None  # where the hf export for a started server goes (None: a temporary folder)
    )


def find_python(python: str | None) -> str:
    """An interpreter that can import vllm, or VLLMUnavailable with the install hint."""
    python = python or os.environ.get(VLLM_PYTHON_ENV)
    if python is None:
        if importlib.util.find_spec("vllm") is None:
            raise VLLMUnavailable(INSTALL_HINT)
        return sys.executable
    if not Path(python).is_file():
        raise VLLMUnavailable(f"{python}: no such interpreter. {INSTALL_HINT}")
    probe = subprocess.run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.stdout.strip() != "True":
        raise VLLMUnavailable(f"{python} cannot import vllm. {INSTALL_HINT}")
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_for_vllm(checkpoint: str | Path, dst: str | Path) -> Path:
    """The checkpoint as the hf folder vLLM loads (router and mlp2 left out: Tessera keeps them)."""
    return convert(checkpoint, dst, to="hf", drop_flash=True)


class VLLMProcess:
    """`vllm serve DIR --enable-mm-embeds` as a child process on 127.0.0.1, stopped with the
    server."""

    def __init__(
        self,
        folder: Path,
        model_name: str,
        max_len: int,
        max_seqs: int,
        max_images: int,
        options: VLLMOptions,
    ):
        self.python = find_python(options.python)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(folder),
            "--served-model-name",
            model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enable-mm-embeds",
            "--max-model-len",
            str(max_len),
            "--max-num-seqs",
            str(max_seqs),
            "--limit-mm-per-prompt",
            json.dumps({"image": max_images, "video": 0}),
            "--chat-template-content-format",
            "openai",
            "--dtype",
            options.dtype,
            "--uvicorn-log-level",
            "warning",
            *options.extra_args,
        ]
        self.timeout = options.startup_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log.info("starting vLLM: %s", shlex.join(self.command))
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VLLMUnavailable(
                    f"vLLM exited with status {self.proc.returncode} while starting "
                    f"(command: {shlex.join(self.command)})"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise VLLMUnavailable(f"vLLM did not answer /health within {self.timeout:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---- vision off the event loop
# ------------------------------------------------------------------------


class ThreadVision(CoupledVision):
    """Coupled vision without Tessera's engine: its batches run on one worker thread of this
    process."""

    def __init__(self, encoder, max_batch_tiles: int = MAX_BATCH_TILES):
        super().__init__(encoder, max_batch_tiles)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tessera-vision")

    def _submit(self, fn) -> None:
        self._worker.submit(fn)

    async def stop(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=False)

    def status(self) -> dict:
        return {**super().status(), "mode": "local"}


# ---- requests → vLLM
# ----------------------------------------------------------------------------------


def embeds_payload(features: torch.Tensor) -> str:
    """[rows, D] → base64 .npy (float32; vLLM reads .npy without unpickling, and casts it to its
    own dtype)."""
    buf = io.BytesIO()
    np.save(buf, features.detach().to("cpu", torch.float32).numpy(), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def vllm_messages(req: ChatCompletionRequest, prepared: Prepared) -> list[dict]:
    """The request's messages with each image (in conversation order) as its features."""
    out, k = [], 0
    for m in req.messages:
        if m.content is None or isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content or ""})
            continue
        parts = []
        for p in m.content:
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
            else:
                assert isinstance(p, ImagePart)
                parts.append(
                    {
                        "type": "image_embeds",
                        "image_embeds": embeds_payload(prepared.images[k].features),
                    }
                )
                k += 1
        out.append({"role": m.role, "content": parts})
    if k != len(prepared.images):
        raise APIError(500, f"{k} image parts for {len(prepared.images)} encoded images")
    return out


@dataclass
class VLLMGeneration:
    """The n choices of one request, each a streamed vLLM request, merged into one event stream."""

    server: VLLMLanguageServer
    prepared: Prepared
    ids: list[str]
    bodies: list[dict]
    assemblers: list[TextAssembler]
    completion_tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None

    async def _choice(self, i: int, queue: asyncio.Queue) -> None:
        try:
            async for chunk in self.server.stream(self.bodies[i]):
                await queue.put((i, chunk, None))
        except Exception as e:  # noqa: BLE001 (a failed choice is reported, the others go on)
            await queue.put((i, None, e))
            return
        await queue.put((i, None, None))

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._choice(i, queue)) for i in range(len(self.ids))]
        open_ = set(range(len(self.ids)))
        stop_ids = self.server.stop_ids
        self.server.running += 1
        try:
            while open_:
                i, chunk, error = await queue.get()
                if i not in open_:
                    continue
                if error is not None or chunk is None:
                    open_.discard(i)
                    why = (
                        f"{type(error).__name__}: {error}"
                        if error
                        else "vLLM ended the stream early"
                    )
                    yield ChoiceEvent(
                        i, Delta(), "error", f"the vLLM language server failed: {why}"
                    )
                    continue
                self.server.check_prompt(chunk, self.prepared)
                stopping = "stop_token_ids" in self.bodies[i]
                for c in chunk.get("choices", []):
                    asm, delta = self.assemblers[i], Delta()
                    reason = c.get("finish_reason")
                    try:
                        for t in c.get("token_ids") or []:
                            self.completion_tokens[i] += 1
                            if self.first_token_at is None:
                                self.first_token_at = time.monotonic()
                                self.server.metrics.observe_ttft(
                                    self.first_token_at - self.prepared.arrival
                                )
                            if t in stop_ids and stopping:  # vLLM stopped on it: not text
                                continue
                            d = asm.push(t)
                            delta = Delta(
                                delta.content + d.content, delta.reasoning + d.reasoning, d.stopped
                            )
                            if d.stopped:
                                break
                        if delta.stopped:
                            reason = "stop"
                            tasks[i].cancel()
                        if reason is not None:
                            tail = asm.finish()
                            delta = Delta(
                                delta.content + tail.content, delta.reasoning + tail.reasoning, True
                            )
                            open_.discard(i)
                    except Exception as e:  # this choice's detokenisation: fail it alone
                        log.exception("detokenising %s failed", self.ids[i])
                        open_.discard(i)
                        yield ChoiceEvent(i, Delta(), "error", _detok_failed(e))
                        break
                    yield ChoiceEvent(i, delta, reason)
                    if reason is not None:
                        break
        finally:
            for t in tasks:
                t.cancel()
            self.server.running -= 1


class VLLMLanguageServer(LanguageServer):
    """LanguageServer's request handling and vision, with generation sent to vLLM instead of
    Tessera's engine."""

    def __init__(
        self,
        model,
        vision: VisionBackend | None,
        options: ServeOptions | None,
        checkpoint: str,
        vllm: VLLMOptions | None = None,
    ):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(
                "the model has no tokenizer; load it with tessera.load(checkpoint_dir)"
            )
        self.options = opts = options or ServeOptions()
        self.model, self.tokenizer = model.eval(), model.tokenizer
        self.max_len = opts.max_len or min(model.config.language.max_position_embeddings, 4096)
        self.vision = vision
        self.metrics = Metrics()
        self.vision_inflight = 0
        self.stop_ids = frozenset({self.tokenizer.im_end_id, self.tokenizer.pad_id})
        longest = longest_token_chars(self.tokenizer)
        self.max_prompt_chars = (
            None if longest is None else self.max_len * longest * NORMALISATION_MARGIN
        )
        self.vllm_options = vllm = vllm or VLLMOptions()
        self.checkpoint = checkpoint
        self.process: VLLMProcess | None = None
        self.url = vllm.url.rstrip("/") if vllm.url else None
        self.client: httpx.AsyncClient | None = None
        self.running = 0
        self.generated = 0
        self.prompt_mismatches = 0
        self._tmp: tempfile.TemporaryDirectory | None = None

    def launch(self) -> None:
        """Export the checkpoint and start vLLM (or check the given URL): before the API opens its
        port."""
        if self.url is None:
            folder = self.vllm_options.export_dir
            if folder is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="tessera-vllm-")
                folder = self._tmp.name
            export_for_vllm(self.checkpoint, folder)
            self.process = VLLMProcess(
                Path(folder),
                self.options.model_name,
                self.max_len,
                self.options.max_batch,
                self.options.max_images,
                self.vllm_options,
            )
            self.process.start()
            self.url = self.process.url
        try:
            r = httpx.get(self.url + "/v1/models", timeout=10.0)
            r.raise_for_status()
            self.served = r.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise VLLMUnavailable(f"no vLLM server at {self.url} ({e})") from None

    async def start(self) -> None:
        if self.process is None and not hasattr(self, "served"):
            await asyncio.to_thread(self.launch)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(None, connect=10.0), limits=limits
        )
        if self.vision is not None:
            await self.vision.start()

    async def stop(self) -> None:
        if self.vision is not None:
            await self.vision.stop()
        if self.client is not None:
            await self.client.aclose()
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)
        if self._tmp is not None:
            self._tmp.cleanup()

    def alive(self) -> bool:
        return self.client is not None and (self.process is None or self.process.alive())

    # ---- generation
    # ---------------------------------------------------------------------------------

    def generate(self, prepared: Prepared, req: ChatCompletionRequest) -> VLLMGeneration:
        messages = vllm_messages(req, prepared)
        temperature = 1.0 if req.temperature is None else req.temperature
        ids, bodies = [f"{prepared.request_id}-{i}" for i in range(req.n)], []
        for i in range(req.n):
            body = {
                "model": self.served,
                "messages": messages,
                "stream": True,
                "return_token_ids": True,
                "max_tokens": prepared.max_tokens,
                "temperature": temperature,
                "top_p": 1.0 if req.top_p is None else req.top_p,
                "chat_template_kwargs": {"enable_thinking": prepared.thinking},
                "add_generation_prompt": True,
                "skip_special_tokens": False,
            }
            if req.seed is not None:
                body["seed"] = (
                    req.seed + i
                ) % 2**63  # choice i: next seed, as Tessera's engine does
            if req.ignore_eos:
                body["ignore_eos"] = True
            else:
                body["stop_token_ids"] = sorted(self.stop_ids)
            bodies.append(body)
        self.metrics.requests += 1
        self.metrics.prompt_tokens += len(prepared.prompt_ids)
        assemblers = [TextAssembler(self.tokenizer, prepared.thinking, req.stop) for _ in ids]
        return VLLMGeneration(self, prepared, ids, bodies, assemblers, [0] * req.n)

    async def stream(self, body: dict) -> AsyncIterator[dict]:
        """One vLLM chat completion's chunks."""
        async with self.client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": uuid.uuid4().hex}
        ) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                raise VLLMUnavailable(f"vLLM answered {r.status_code}: {text[:500]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise VLLMUnavailable(f"vLLM: {chunk['error']}")
                self.generated += sum(
                    len(c.get("token_ids") or []) for c in chunk.get("choices", [])
                )
                yield chunk

    def check_prompt(self, chunk: dict, prepared: Prepared) -> None:
        """vLLM's prompt (its first chunk) must be Tessera's, token for token; a difference is
        logged."""
        ids = chunk.get("prompt_token_ids")
        if ids is None or ids == prepared.prompt_ids:
            return
        self.prompt_mismatches += 1
        at = next(
            (j for j, (a, b) in enumerate(zip(ids, prepared.prompt_ids)) if a != b),
            min(len(ids), len(prepared.prompt_ids)),
        )
        log.warning(
            "vLLM's prompt differs from Tessera's at token %d (%d vs %d tokens): is the served "
            "folder this checkpoint's hf export?",
            at,
            len(ids),
            len(prepared.prompt_ids),
        )

    def status(self) -> dict:
        e = EngineStats(waiting=0, running=self.running, generated_tokens=self.generated)
        v = (
            self.vision.status()
            if self.vision is not None
            else {"mode": "none", "workers_alive": 0, "workers_total": 0}
        )
        return {
            "engine": e,
            "vision": v,
            "vision_inflight": self.vision_inflight,
            "language": {
                "backend": "vllm",
                "url": self.url,
                "prompt_mismatches": self.prompt_mismatches,
            },
        }


def build_vllm_server(
    checkpoint: str, model, vision: VisionBackend | None, options: ServeOptions, vllm: VLLMOptions
) -> VLLMLanguageServer:
    """The server with vLLM started (or reached) already, so a bad setup fails before the port
    opens."""
    server = VLLMLanguageServer(model, vision, options, checkpoint, vllm)
    server.launch()
    return server
