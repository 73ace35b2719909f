"""`tessera bench vllm_serve`: `tessera serve` vs `vllm serve` of the checkpoint's hf export, side
by side.

Three servers on 127.0.0.1, alive for the whole run: `tessera serve CKPT` (its engine; coupled
vision), `vllm serve DIR` of `tessera convert CKPT DIR --to hf` (vLLM's own preprocessing, ViT and
LLM), and `tessera serve CKPT --language-backend vllm --vllm-url` on that same vLLM (Tessera's
vision, vLLM's LLM fed `image_embeds`). Each gets the same `--requests` image requests (one image
each, its own pixels, so no feature cache hits; exactly `--max-tokens` output tokens, `ignore_eos`)
with `--concurrency` in flight (closed loop, tessera.bench.loadgen), in rounds that alternate
between the servers. Reported: requests/s (median over rounds), p50/p99 latency, and each against
`vllm serve`. Everything runs in float32, on this machine's cores. Needs a Python with vLLM
(`--vllm-python` or $TESSERA_VLLM_PYTHON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tessera.bench.loadgen import LoadResult, data_url, image_for_tiles, image_message, run_load
from tessera.bench.serve import free_port, serve_process, wait_ready
from tessera.model.checkpoint import load_config
from tessera.serve.vllm_backend import VLLMOptions, VLLMProcess, export_for_vllm

SERVERS = (
    "tessera serve",
    "vllm serve",
    "tessera+vllm backend",
    "tessera serve unbatched",
    "tessera serve decoupled",
    "tessera serve compiled",
)
# "unbatched": coupled vision one image per ViT call (--max-batch-tiles 1), as before 2026-12-03;
# "decoupled": DvD with one local vision worker; "compiled": the engine's decode graphs compiled at start-up
DEFAULT = SERVERS[:3]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", default="checkpoints/tiny", help="the model (default: checkpoints/tiny)"
    )
    p.add_argument("--requests", type=int, default=64, help="requests per server per round")
    p.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds (req/s is their median)"
    )
    p.add_argument("--concurrency", type=int, default=16, help="requests kept in flight")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--tiles",
        type=int,
        default=1,
        help="tiles per image (1, 2, 4, 6, 9, 12; + thumbnail when > 1)",
    )
    p.add_argument(
        "--vllm-python",
        default=os.environ.get("TESSERA_VLLM_PYTHON"),
        help="a Python with vLLM (default: $TESSERA_VLLM_PYTHON)",
    )
    p.add_argument(
        "--servers", default=",".join(DEFAULT), help="which servers to measure (comma-separated)"
    )
    p.add_argument("--json", action="store_true")


def bodies(tile_size: int, tiles: int, n: int, max_tokens: int, seed0: int) -> list[dict]:
    return [
        {
            "model": "bench",
            "messages": image_message(
                data_url(image_for_tiles(tiles, tile_size, seed0 + i)), "describe the image"
            ),
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        for i in range(n)
    ]


def start_tessera(checkpoint: str, port: int, extra: list[str]) -> subprocess.Popen:
    cores = os.cpu_count() or 1
    args = ["--dtype", "float32", "--threads", str(cores), *extra]
    return serve_process(checkpoint, port, args, cores)


def p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99)) if xs else float("nan")


def run(args: argparse.Namespace) -> int:
    if not args.vllm_python:
        print(
            "error: needs a Python with vLLM: --vllm-python PATH or $TESSERA_VLLM_PYTHON",
            file=sys.stderr,
        )
        return 2
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SERVERS]
    if unknown:
        print(
            f"error: unknown server(s) {unknown}; choose from {', '.join(SERVERS)}", file=sys.stderr
        )
        return 2
    config, _ = load_config(args.checkpoint)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    procs: list[subprocess.Popen] = []
    vllm = None
    with tempfile.TemporaryDirectory(prefix="tessera-bench-vllm-") as tmp:
        try:
            folder = export_for_vllm(args.checkpoint, Path(tmp) / "hf")
            vllm = VLLMProcess(
                folder,
                "bench",
                2048,
                max(args.concurrency, 16),
                1,
                VLLMOptions(python=args.vllm_python, dtype="float32"),
            )
            vllm.start()
            bases = {"vllm serve": vllm.url}
            extra = {
                "tessera serve": [],
                "tessera serve unbatched": ["--max-batch-tiles", "1"],
                "tessera serve decoupled": [
                    "--mode",
                    "decoupled",
                    "--vision-workers",
                    "1",
                    "--threads",
                    "1",
                ],
                "tessera serve compiled": ["--compile"],
                "tessera+vllm backend": ["--language-backend", "vllm", "--vllm-url", vllm.url],
            }
            for name in extra:
                if name in wanted:
                    port = free_port()
                    procs.append(start_tessera(args.checkpoint, port, extra[name]))
                    bases[name] = f"http://127.0.0.1:{port}"
                    wait_ready(procs[-1], bases[name], timeout=300)
            results = measure({n: bases[n] for n in wanted}, config.tile_size, args)
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)
            if vllm is not None:
                vllm.stop()
    report(results, args, config)
    return 0


def measure(bases: dict[str, str], tile_size: int, args) -> dict[str, dict]:
    names = list(bases)
    rates = {n: [] for n in names}
    pooled = {n: LoadResult() for n in names}
    for n in names:  # warm-up
        asyncio.run(
            run_load(
                bases[n],
                bodies(tile_size, args.tiles, args.concurrency, args.max_tokens, 90_000),
                args.concurrency,
            )
        )
    for r in range(args.rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            # the same requests for every server (their own images, not cached: each server sees
            # each once)
            res = asyncio.run(
                run_load(
                    bases[n],
                    bodies(
                        tile_size, args.tiles, args.requests, args.max_tokens, r * args.requests
                    ),
                    args.concurrency,
                )
            )
            if res.errors:
                raise RuntimeError(f"{n}: {len(res.errors)} failed requests, e.g. {res.errors[0]}")
            rates[n].append(len(res.latencies) / res.wall)
            pooled[n].latencies += res.latencies
    return {
        n: {
            "req_per_s": round(statistics.median(rates[n]), 2),
            "rounds": [round(x, 2) for x in rates[n]],
            "latency_p50_ms": round(float(np.percentile(pooled[n].latencies, 50)) * 1000, 1),
            "latency_p99_ms": round(p99(pooled[n].latencies) * 1000, 1),
        }
        for n in names
    }


def report(results: dict[str, dict], args, config) -> None:
    if args.json:
        print(json.dumps(results, indent=2))
        return
    ref = results.get("vllm serve", {}).get("req_per_s")
    print(
        f"{args.requests} image requests ({args.tiles} tile(s) of {config.tile_size} px, "
        f"{args.max_tokens} tokens out) at {args.concurrency} in flight, {args.rounds} rounds, "
        f"{os.cpu_count()} cores, float32"
    )
    print(f"{'server':<22} {'req/s':>7} {'vs vllm':>8} {'p50 ms':>8} {'p99 ms':>8}  rounds")
    for name, r in results.items():
        vs = f"{r['req_per_s'] / ref:.2f}x" if ref else "-"
        p50, p99_ = r["latency_p50_ms"], r["latency_p99_ms"]
        print(f"{name:<22} {r['req_per_s']:>7.2f} {vs:>8} {p50:>8.1f} {p99_:>8.1f}  {r['rounds']}")
