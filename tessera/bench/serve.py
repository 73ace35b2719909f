"""`tessera bench serve`: coupled vs decoupled (DvD) vs decoupled + router, side by side on this machine.

One real `tessera serve` process per topology runs on 127.0.0.1 for the whole benchmark. For each image size
(1, 4 and 9 tiles, plus the thumbnail when there is more than one) a closed-loop client keeps `--concurrency`
streamed requests in flight, each with its own image (no cache hits) and exactly `--max-tokens` output tokens
(`ignore_eos`), in rounds that alternate between the topologies so that load from elsewhere on the machine
hits them alike. Reported per cell: requests/s (median over rounds), p50/p99 time to first token, output
tokens/s. Topologies (same cores for all):
- coupled:          one process, vision on the engine thread between steps, torch threads = all cores;
- decoupled:        the language process (1 thread) + `--vision-workers` local vision servers (1 thread each);
- decoupled+router: the same, with Flash routing (the ViR decides which tiles go to 1/16).
`--docs FILE` rewrites the file's "## Serving" section with the table and writes a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tessera
from tessera.bench.docs import machine, replace_section
from tessera.bench.loadgen import LoadResult, data_url, image_for_tiles, image_message, run_load
from tessera.config import ModelConfig
from tessera.engine import Engine, GenerationRequest, SamplingParams
from tessera.model.checkpoint import save_checkpoint
from tessera.model.init import init_lively_model
from tessera.routing import RoutingPolicy
from tessera.serve.vision import VisionEncoder

TOPOLOGIES = ("coupled", "decoupled", "decoupled+router")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model to serve (default: a fresh random tiny checkpoint)")
    p.add_argument(
        "--tiles",
        default="1,4,9",
        help="grid sizes to test (comma-separated; a thumbnail is added when > 1)",
    )
    p.add_argument("--topologies", default=",".join(TOPOLOGIES))
    p.add_argument(
        "--requests",
        type=int,
        default=96,
        help="measured requests per cell (split over the rounds)",
    )
    p.add_argument(
        "--rounds", type=int, default=4, help="alternating rounds per cell (req/s is their median)"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="requests kept in flight (closed loop); at 8 decoupled left half a core idle, so capacity was not measured",
    )
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--vision-workers", type=int, default=1)
    p.add_argument(
        "--vision-dtype",
        choices=["float32", "bfloat16"],
        default="bfloat16",
        help="precision of the vision side, the same for every topology (the LLM stays float32)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--docs", help="markdown file whose '## Serving' section is replaced (a PNG goes beside it)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(checkpoint: str, port: int, args: list[str], threads: int) -> subprocess.Popen:
    """`tessera serve CHECKPOINT` on 127.0.0.1:port as a benchmark runs it (queues deep enough for the
    load, model name `bench`), with `args` added and OMP_NUM_THREADS=threads."""
    cmd = [sys.executable, "-m", "tessera.cli", "serve", checkpoint, "--port", str(port)]
    cmd += ["--model-name", "bench", "--max-waiting", "256", "--max-vision-inflight", "256", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def start_server(
    checkpoint: str, topology: str, workers: int, port: int, vision_dtype: str
) -> subprocess.Popen:
    cores = os.cpu_count() or 1
    args = ["--vision-dtype", vision_dtype]
    if topology == "coupled":
        return serve_process(
            checkpoint, port, [*args, "--mode", "coupled", "--threads", str(cores)], cores
        )
    args += ["--mode", "decoupled", "--vision-workers", str(workers)]
    return serve_process(checkpoint, port, [*args, "--threads", "1", "--worker-threads", "1"], 1)


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}"
            )
        try:
            h = httpx.get(base + "/health", timeout=2).json()
            if h.get("status") == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {base} not ready within {timeout:.0f} s")


def bodies(
    tile_size: int, tiles: int, n: int, max_tokens: int, routing: str, seed0: int
) -> list[dict]:
    return [
        {
            "messages": image_message(
                data_url(image_for_tiles(tiles, tile_size, seed0 + i)), "describe the image"
            ),
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "routing": routing,
        }
        for i in range(n)
    ]


class Server:
    """One `tessera serve` process of a topology, alive for the whole benchmark (idle servers cost no CPU)."""

    def __init__(self, checkpoint: str, topology: str, workers: int, vision_dtype: str):
        self.topology = topology
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = start_server(checkpoint, topology, workers, self.port, vision_dtype)
        self.routing = "router" if topology.endswith("router") else "full"

    def metric(self, name: str) -> float:
        import httpx

        return _metric(httpx.get(self.base + "/metrics").text, name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(servers: list[Server], tile_size: int, tiles: int, args) -> dict[str, dict]:
    """Rounds alternate between the topologies (order rotated each round), so load from elsewhere on the machine
    hits them alike; req/s is the median over rounds, TTFT percentiles pool every measured request."""
    per_round = max(1, args.requests // args.rounds)
    rates: dict[str, list[float]] = {s.topology: [] for s in servers}
    pooled = {s.topology: LoadResult() for s in servers}
    before = {
        s.topology: (
            s.metric("tessera_visual_tokens_total"),
            s.metric("tessera_visual_tokens_saved_total"),
        )
        for s in servers
    }
    for s in servers:  # warm-up at this image size
        asyncio.run(
            run_load(
                s.base,
                bodies(tile_size, tiles, args.concurrency, args.max_tokens, s.routing, 90_000),
                args.concurrency,
            )
        )
    seed = 0
    cpu = {
        s.topology: 0.0 for s in servers
    }  # CPU seconds of the server's process tree and of this client
    for r in range(args.rounds):
        for s in servers[r % len(servers) :] + servers[: r % len(servers)]:
            load = bodies(tile_size, tiles, per_round, args.max_tokens, s.routing, seed)
            seed += per_round  # every request its own image: no cache hits
            server_before, client_before = tree_cpu_seconds(s.proc.pid), time.process_time()
            res = asyncio.run(run_load(s.base, load, args.concurrency))
            cpu[s.topology] += (
                tree_cpu_seconds(s.proc.pid) - server_before + time.process_time() - client_before
            )
            if res.errors:
                raise RuntimeError(
                    f"{s.topology} at {tiles} tiles: {len(res.errors)} errors, e.g. {res.errors[0]}"
                )
            rates[s.topology].append(len(res.latencies) / res.wall)
            p = pooled[s.topology]
            p.latencies += res.latencies
            p.ttfts += res.ttfts
            p.tokens += res.tokens
            p.wall += res.wall
    out = {}
    for s in servers:
        summary = pooled[s.topology].summary()
        summary["req_per_s"] = round(statistics.median(rates[s.topology]), 3)
        summary["req_per_s_rounds"] = [round(x, 2) for x in rates[s.topology]]
        visual = s.metric("tessera_visual_tokens_total") - before[s.topology][0]
        saved = s.metric("tessera_visual_tokens_saved_total") - before[s.topology][1]
        n = args.concurrency + per_round * args.rounds
        summary["visual_tokens_per_request"] = round(visual / n, 1)
        summary["visual_tokens_saved_pct"] = (
            round(100 * saved / (saved + visual), 1) if saved + visual else 0.0
        )
        summary["cpu_ms_per_request"] = round(
            1000 * cpu[s.topology] / max(1, len(pooled[s.topology].latencies)), 1
        )
        out[s.topology] = summary
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process and its live descendants (a server and its vision workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def component_costs(checkpoint: str, tiles_list: list[int], args) -> dict[str, dict]:
    """Per-request CPU cost of each stage on one thread, measured in this process (servers not yet started):
    vision = decode + tile + ViT + router + projector; LLM = prefill + decode at `--concurrency` in flight,
    with every tile at 1/4 and with the router's choices. On two cores the pipeline bound is
    coupled ≈ V + L, decoupled ≈ max(V, L), which gives the best speed-up decoupling can buy here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tessera.load(checkpoint)
        encoder = VisionEncoder(model, dtype=getattr(torch, args.vision_dtype))
        encoder.cache.capacity = 0
        engine = Engine(model.language_model, max_batch=16, max_len=2048, embed_fn=model.embed)
        out = {}
        for tiles in tiles_list:
            images = [image_for_tiles(tiles, model.config.tile_size, 50_000 + i) for i in range(8)]
            row = {}
            for routing in ("full", "router") if model.config.flash.enabled else ("full",):
                encoder.encode([images[0]], RoutingPolicy(routing))  # warm-up
                start = time.perf_counter()
                encoded = [encoder.encode([im], RoutingPolicy(routing))[0] for im in images]
                row[f"vision_ms_{routing}"] = (time.perf_counter() - start) / len(images) * 1000
                row[f"llm_ms_{routing}"] = _llm_ms(engine, model, encoded, args)
            out[str(tiles)] = {k: round(v, 1) for k, v in row.items()}
        return out
    finally:
        torch.set_num_threads(threads)


def _llm_ms(engine, model, encoded, args) -> float:
    n = 4 * len(encoded)
    done: list[str] = []
    submitted = 0
    start = time.perf_counter()
    while len(done) < n:
        while submitted < n and submitted - len(done) < args.concurrency:
            im = encoded[submitted % len(encoded)]
            ids = model.tokenizer.build_prompt("describe the image", [im.meta.rows])
            engine.submit(
                GenerationRequest(
                    str(submitted),
                    ids,
                    SamplingParams(max_tokens=args.max_tokens),
                    lambda ev: ev.finished and done.append(ev.request_id),
                    im.features,
                )
            )
            submitted += 1
        engine.step()
    return (time.perf_counter() - start) / n * 1000


def fresh_checkpoint(out: Path) -> str:
    """A random tiny Flash checkpoint whose language weights make real text (see bench/engine.py): with the
    default init every answer repeats one token that decodes to nothing, and no chunk would carry text to time."""
    model = init_lively_model("tiny")
    model.config.max_tiles = (
        12  # a tiling limit, not a weight: lets the 9-tile cell tile as 3×3 (+ thumbnail)
    )
    save_checkpoint(model, out)
    return str(out)


def markdown(results: dict, settings: dict, costs: dict) -> str:
    lines = [
        "`tessera bench serve` (tessera/bench/serve.py): one real `tessera serve` process per topology on 127.0.0.1, "
        f"all started up front (idle ones use no CPU); a client drives each with {settings['concurrency']} streamed requests in flight (closed loop): {settings['requests']} "
        f"measured requests per cell after a warm-up, in {settings['rounds']} rounds that alternate between the "
        "topologies (req/s = median over rounds), each with its own image (no cache hits) and exactly "
        f"{settings['max_tokens']} output tokens. Coupled uses all {settings['cores']} cores in one process; decoupled "
        f"gives the language process 1 thread and {settings['vision_workers']} local vision worker(s) 1 thread each. "
        f"Every topology runs its vision side (ViT, router, projectors) in {settings['vision_dtype']} and the LLM in "
        "float32.",
        "",
        f"Model: {settings['model']}. Machine: {settings['machine']}; 1-minute load average "
        f"{settings['load_average']} the run (other jobs share these cores).",
        "",
        "| tiles (+thumb) | topology | req/s | × coupled | TTFT p50 ms | TTFT p99 ms | tokens/s | visual tok/req | saved |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tiles, row in results.items():
        base = row.get("coupled", {}).get("req_per_s")
        shown = f"{tiles} (+1)" if int(tiles) > 1 else str(tiles)
        for topo, r in row.items():
            x = f"{r['req_per_s'] / base:.2f}" if base else "–"
            lines.append(
                f"| {shown} | {topo} | {r['req_per_s']:.2f} | {x} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} "
                f"| {r['tokens_per_s']:.0f} | {r['visual_tokens_per_request']:.0f} | {r['visual_tokens_saved_pct']:.0f} % |"
            )
    lines += [
        "",
        *targets(results),
        "",
        *machine_bound(results, settings["cores"]),
        "",
        *cost_table(costs),
    ]
    return "\n".join(lines)


def machine_bound(results: dict, cores: int) -> list[str]:
    """What the machine allows: CPU spent per request by everything (servers, vision workers, the client) in the
    same run; `cores` cores can finish at most cores / (CPU per request) requests a second, however they are split."""
    lines = [
        f"What the machine allows — CPU per request of the whole run (server process, its vision workers and "
        f"the load-generating client, user + system time over the measured rounds). {cores} cores finish at most "
        f"{cores} s of CPU a second, so a topology's rate is capped at {cores} × 1000 / (CPU ms per request) "
        "whatever the scheduling; cores used = CPU ms per request × req/s / 1000.",
        "",
        "| tiles (+thumb) | topology | CPU ms / request | cores used | req/s | cap req/s | cap × coupled |",
        "|---|---|---|---|---|---|---|",
    ]
    for tiles, row in results.items():
        base = row.get("coupled", {}).get("req_per_s")
        shown = f"{tiles} (+1)" if int(tiles) > 1 else str(tiles)
        for topo, r in row.items():
            ms = r.get("cpu_ms_per_request")
            if not ms:
                continue
            cap = cores * 1000 / ms
            x = f"{cap / base:.2f}" if base else "–"
            lines.append(
                f"| {shown} | {topo} | {ms:.1f} | {ms * r['req_per_s'] / 1000:.2f} | {r['req_per_s']:.2f} "
                f"| {cap:.1f} | {x} |"
            )
    return lines


def cost_table(costs: dict) -> list[str]:
    lines = [
        "Where the time goes — per-request CPU cost of each stage on one thread, measured in the benchmark "
        "process before the servers start (V = vision: decode, tile, ViT, router, projector; L = LLM: prefill and "
        "decode, same concurrency and output length). Decoupled, one core each, a request costs about max(V, L); coupled "
        "costs V/s_V + L/s_L, where s ≤ 2 is what the second thread buys each stage. So (V + L) / max(V, L) bounds "
        "what decoupling can gain on two cores (reached only if coupled's second thread bought nothing), and the "
        "router can only help once L is the larger term (it shortens the prompt, not the ViT):",
        "",
        "| tiles (+thumb) | V ms | L ms (1/4 tiles) | L ms (router) | bound decoupled × | bound decoupled+router × |",
        "|---|---|---|---|---|---|",
    ]
    for tiles, c in costs.items():
        v, lf = c["vision_ms_full"], c["llm_ms_full"]
        vr, lr = c.get("vision_ms_router", v), c.get("llm_ms_router", lf)
        shown = f"{tiles} (+1)" if int(tiles) > 1 else tiles
        lines.append(
            f"| {shown} | {v:.1f} | {lf:.1f} | {lr:.1f} | {(v + lf) / max(v, lf):.2f} | {(v + lf) / max(vr, lr):.2f} |"
        )
    return lines


def targets(results: dict) -> list[str]:
    """The issue's targets at the largest image size, met or not, with the measured ratios."""
    big = max(results, key=int)
    row = results[big]
    base = row.get("coupled", {}).get("req_per_s")
    out = []
    for topo, goal in (("decoupled", 1.3), ("decoupled+router", 2.0)):
        if base and topo in row:
            x = row[topo]["req_per_s"] / base
            out.append(
                f"- target {topo} ≥ {goal}× coupled req/s at {big} tiles: measured {x:.2f}× → "
                f"{'met' if x >= goal else '**not met**'}"
            )
    return out


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = list(results)
    topos = [t for t in TOPOLOGIES if any(t in results[k] for k in tiles)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    width = 0.8 / len(topos)
    for i, topo in enumerate(topos):
        xs = [j + i * width for j in range(len(tiles))]
        ax1.bar(
            xs, [results[k].get(topo, {}).get("req_per_s", 0) for k in tiles], width, label=topo
        )
        ax2.bar(
            xs, [results[k].get(topo, {}).get("ttft_p50_ms", 0) for k in tiles], width, label=topo
        )
    for ax, title in ((ax1, "throughput (req/s)"), (ax2, "TTFT p50 (ms)")):
        ax.set_xticks([j + width * (len(topos) - 1) / 2 for j in range(len(tiles))])
        ax.set_xticklabels([f"{k} tile" + ("s" if k != "1" else "") for k in tiles])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    tmp = None
    checkpoint = args.checkpoint
    if checkpoint is None:
        tmp = Path(tempfile.mkdtemp(prefix="tessera-bench-serve-"))
        checkpoint = fresh_checkpoint(tmp / "tiny")
    cfg = ModelConfig.load(Path(checkpoint) / "config.json")
    topologies = [t for t in args.topologies.split(",") if t]
    if "decoupled+router" in topologies and not cfg.flash.enabled:
        print(
            "note: the model has no router (not Flash); skipping decoupled+router", file=sys.stderr
        )
        topologies.remove("decoupled+router")
    load_before = os.getloadavg()[0]
    results: dict[str, dict] = {}
    wanted = [int(t) for t in args.tiles.split(",")]
    if any(t > cfg.max_tiles for t in wanted):
        raise SystemExit(
            f"{checkpoint} tiles at most {cfg.max_tiles} per image; drop the larger sizes from --tiles"
        )
    costs = component_costs(checkpoint, wanted, args)
    print(f"per-request costs on one thread: {costs}", file=sys.stderr)
    servers: list[Server] = []
    try:
        for topo in topologies:
            servers.append(Server(checkpoint, topo, args.vision_workers, args.vision_dtype))
        for s in servers:
            wait_ready(s.proc, s.base)
        for tiles in wanted:
            results[str(tiles)] = measure(servers, cfg.tile_size, tiles, args)
            for topo, r in results[str(tiles)].items():
                print(f"{tiles} tiles {topo}: {r}", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    settings = {
        "load_average": f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        "requests": args.requests,
        "rounds": args.rounds,
        "vision_dtype": args.vision_dtype,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "vision_workers": args.vision_workers,
        "cores": os.cpu_count(),
        "machine": machine(),
        "model": args.checkpoint
        or "fresh random `tiny` preset (Flash, 112 px tiles, 16/4 tokens per tile, max_tiles 12; "
        "language weights at std 0.1 so that answers are text)",
    }
    text = markdown(results, settings, costs)
    if args.docs:
        docs = Path(args.docs)
        png = docs.parent / "serving.png"
        plot(results, png)
        replace_section(
            docs, "## Serving", text + f"\n\n![serving throughput and TTFT]({png.name})"
        )
    print(
        json.dumps({"settings": settings, "costs": costs, "results": results}, indent=2)
        if args.json
        else text
    )
    return 0
