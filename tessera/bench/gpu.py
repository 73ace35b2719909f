"""`tessera bench gpu`: a GPU check ready to run. Where CUDA exists it runs, on the GPU, with the tiny and the
1B shapes (random weights; the 1B checkpoint in bf16):

  chat      a question about an image through the Pipeline (ViT + projector + LLM on the GPU)
  eval      a few held-out world questions (batched greedy decoding)
  train     a few SFT optimiser steps (bf16 autocast on CUDA); tiny shape only
  engine    continuous batching at batch 1 and 8: generated tokens/s, greedy ids equal to model.generate
  serve     decoupled (DvD) serving: one vision worker on --vision-device, the language server on --device,
            one image request over HTTP

and prints one line per check: pass/fail, seconds and the speed. Budget: under 5 minutes on one GPU.
Without CUDA it prints why it skips and exits 0; `--allow-cpu` runs the same checks on the CPU (that is how the
script itself is tested on machines without a GPU).
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import tessera
from tessera.device import add_device_arguments, resolve_device
from tessera.engine import Engine, GenerationRequest, SamplingParams, generate
from tessera.evaluate import evaluate
from tessera.model.init import init_checkpoint
from tessera.serve.language_server import ServeOptions
from tessera.serve.launch import LocalServer, Topology, build_server
from tessera.train import build_stage
from tessera.train.trainer import TrainConfig, Trainer

USES_DEVICE = True
log = logging.getLogger(__name__)

SHAPES = {"tiny": "tiny", "1b": "internvl3_5-1b"}


@dataclass
class Check:
    shape: str
    name: str
    ok: bool
    seconds: float
    detail: str


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shapes", default="tiny,1b", help=f"model shapes, comma-separated: {', '.join(SHAPES)}"
    )
    p.add_argument(
        "--checks", default="chat,eval,train,engine,serve", help="which checks, comma-separated"
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        default=32,
        help="tokens generated per sequence in the engine check",
    )
    p.add_argument(
        "--allow-cpu", action="store_true", help="without CUDA, run the checks on the CPU instead"
    )
    p.add_argument("--out", help="folder for the random checkpoints (default: a temporary folder)")
    add_device_arguments(p, vision=True)


def _png(seed: int = 0, size: tuple[int, int] = (448, 448)) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_chat(ckpt: Path, device: torch.device, image: Path) -> str:
    model = tessera.load(ckpt, device=device)
    pipe = tessera.Pipeline(model)
    start = time.perf_counter()
    answer = pipe.chat(str(image), "What is in the picture?", max_new_tokens=8)
    _sync(device)
    if not isinstance(answer.text, str) or answer.visual_tokens <= 0:
        raise AssertionError(f"no answer about the image: {answer!r}")
    return f"{answer.visual_tokens} visual tokens, answered in {time.perf_counter() - start:.2f} s"


def check_eval(ckpt: Path, device: torch.device) -> str:
    result = evaluate(
        tessera.load(ckpt, device=device), n=8, batch_size=8, thinking="off", keep_records=False
    )
    return f"{result.n} questions, {result.samples_per_second:.1f} questions/s, accuracy {result.overall:.2f}"


def check_train(ckpt: Path, device: torch.device, out: Path) -> str:
    model = tessera.load(ckpt, device=device)
    stage = build_stage("sft", model, {"rows": 2, "row_tokens": 256})
    config = TrainConfig.from_dict(
        {"steps": 3, "warmup_steps": 1, "progress": False, "save_every": 0}
    )
    result = Trainer(model, stage, config, out).fit(resume=False)
    losses = [r["loss"] for r in result.history]
    if len(losses) != 3 or not all(torch.isfinite(torch.tensor(losses))):
        raise AssertionError(f"losses {losses}")
    on = {p.device.type for p in model.parameters()}
    if on != {device.type}:
        raise AssertionError(f"parameters ended on {on}, not {device.type}")
    sec = sum(r["sec"] for r in result.history) / len(losses)
    return f"3 SFT steps, {sec:.2f} s/step, loss {losses[0]:.3f} → {losses[-1]:.3f}"


def check_engine(ckpt: Path, device: torch.device, new_tokens: int) -> str:
    model = tessera.load(ckpt, device=device)
    vocab = model.tokenizer.vocab_size
    g = torch.Generator().manual_seed(0)
    parts = []
    for batch in (1, 8):
        prompts = torch.randint(0, vocab, (batch, 24), generator=g)
        engine = Engine(model.language_model, max_batch=batch, max_len=24 + new_tokens + 1)
        out: dict[str, list[int]] = {str(i): [] for i in range(batch)}
        for i in range(batch):
            engine.submit(
                GenerationRequest(
                    str(i),
                    prompts[i].tolist(),
                    SamplingParams(max_tokens=new_tokens),
                    lambda ev: ev.token_id is not None and out[ev.request_id].append(ev.token_id),
                )
            )
        _sync(device)
        start = time.perf_counter()
        while engine.has_work():
            engine.step()
        _sync(device)
        seconds = time.perf_counter() - start
        alone = generate(model, [prompts[0].tolist()], None, SamplingParams(max_tokens=new_tokens))
        same = out["0"] == alone.answers()[0]
        if batch == 1 and not same:
            raise AssertionError(
                "batch 1: the engine's greedy ids differ from tessera.engine.generate"
            )
        # batched bf16 kernels may round differently from one sequence's, so batch 8 only reports it
        parts.append(
            f"batch {batch}: {batch * new_tokens / seconds:.0f} tok/s, greedy ids "
            f"{'equal' if same else 'differ'}"
        )
    return ", ".join(parts)


def check_serve(ckpt: Path, device: torch.device, vision_device: torch.device, image: bytes) -> str:
    import httpx

    topology = Topology(
        "decoupled", vision_workers=1, device=str(device), vision_device=str(vision_device)
    )
    server = build_server(
        str(ckpt), topology, ServeOptions(model_name="bench", max_batch=4, max_len=2048)
    )
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {
        "model": "bench",
        "max_tokens": 8,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    }
    with LocalServer(server) as s, httpx.Client(base_url=s.base_url, timeout=240) as http:
        deadline = time.monotonic() + 180
        while http.get("/health").json().get("vision", {}).get("workers_alive", 0) < 1:
            if time.monotonic() > deadline:
                raise AssertionError("the vision worker did not come up within 180 s")
            time.sleep(0.2)
        start = time.perf_counter()
        r = http.post("/v1/chat/completions", json=body)
        seconds = time.perf_counter() - start
    if r.status_code != 200:
        raise AssertionError(f"HTTP {r.status_code}: {r.text[:300]}")
    images = r.json()["usage"].get("prompt_tokens_details", {}).get("image_tokens")
    return f"vision on {vision_device}, language on {device}: {images} image tokens, request {seconds:.2f} s"


def _checkpoint(shape: str, folder: Path) -> Path:
    path = folder / shape
    if not (path / "model.safetensors").is_file():
        dtype = torch.bfloat16 if shape != "tiny" else torch.float32
        init_checkpoint(SHAPES[shape], path, seed=0, dtype=dtype)
    return path


def run_checks(
    args: argparse.Namespace, device: torch.device, vision_device: torch.device, folder: Path
) -> list[Check]:
    image_bytes = _png()
    image = folder / "image.png"
    image.write_bytes(image_bytes)
    wanted = [c.strip() for c in args.checks.split(",") if c.strip()]
    results: list[Check] = []
    for shape in (s.strip() for s in args.shapes.split(",") if s.strip()):
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
        start = time.perf_counter()
        ckpt = _checkpoint(shape, folder)
        results.append(
            Check(shape, "init", True, time.perf_counter() - start, f"random checkpoint in {ckpt}")
        )
        runs = {
            "chat": lambda: check_chat(ckpt, device, image),
            "eval": lambda: check_eval(ckpt, device),
            "train": lambda: check_train(ckpt, device, folder / f"train-{shape}"),
            "engine": lambda: check_engine(ckpt, device, args.new_tokens),
            "serve": lambda: check_serve(ckpt, device, vision_device, image_bytes),
        }
        for name in wanted:
            if name not in runs:
                raise SystemExit(f"unknown check {name!r}; choose from {', '.join(runs)}")
            if name == "train" and shape != "tiny":
                continue  # a 1B full fine-tune's Adam state is not a five-minute check
            start = time.perf_counter()
            try:
                detail, ok = runs[name](), True
            except Exception as e:  # a failed check is reported and the others still run
                log.debug("check %s/%s failed", shape, name, exc_info=True)
                detail, ok = f"{type(e).__name__}: {e}".splitlines()[0][:300], False
                traceback.print_exc(file=sys.stderr)
            results.append(Check(shape, name, ok, time.perf_counter() - start, detail))
            print(_line(results[-1]), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def _line(c: Check) -> str:
    return f"{'PASS' if c.ok else 'FAIL'}  {c.shape:<5} {c.name:<7} {c.seconds:7.1f} s  {c.detail}"


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            f"tessera bench gpu: skipped, torch sees no CUDA GPU here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); run it on a machine with one, or pass --allow-cpu to run the checks on "
            "the CPU"
        )
        return 0
    default = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_device(default if args.device == "auto" else args.device)
    vision_device = resolve_device(args.vision_device) if args.vision_device else device
    print(
        f"tessera bench gpu on {device} (vision {vision_device})"
        + (f": {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        flush=True,
    )
    start = time.perf_counter()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        results = run_checks(args, device, vision_device, Path(args.out))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = run_checks(args, device, vision_device, Path(tmp))
    failed = [c for c in results if not c.ok]
    print(
        f"{len(results) - len(failed)}/{len(results)} passed in {time.perf_counter() - start:.0f} s"
        + (f"; failed: {', '.join(f'{c.shape}/{c.name}' for c in failed)}" if failed else "")
    )
    return 1 if failed else 0
