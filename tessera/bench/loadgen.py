"""Request material and a load generator for serving tests and benchmarks.

Images are procedural (seeded noise over coloured blocks) so that every request can carry a distinct image
(no accidental cache hits) and the tiling grid is chosen exactly: an image of (cols·S) × (rows·S) pixels
tiles into a cols × rows grid (+ a thumbnail when cols·rows > 1).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

GRIDS = {1: (1, 1), 2: (2, 1), 4: (2, 2), 6: (3, 2), 9: (3, 3), 12: (4, 3)}


def make_image(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.NEAREST)
    noise = rng.integers(0, 24, size=(height, width, 3), dtype=np.uint8)
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def image_for_tiles(tiles: int, tile_size: int, seed: int = 0) -> bytes:
    """An image whose grid has exactly `tiles` tiles (see GRIDS)."""
    if tiles not in GRIDS:
        raise ValueError(f"no grid for {tiles} tiles; choose from {sorted(GRIDS)}")
    cols, rows = GRIDS[tiles]
    return make_image(cols * tile_size, rows * tile_size, seed)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        }
    ]


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, whole request
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0

    def summary(self) -> dict:
        def pct(xs, q):
            return float(np.percentile(xs, q)) if xs else float("nan")

        done = len(self.latencies)
        return {
            "requests": done,
            "errors": len(self.errors),
            "wall_s": round(self.wall, 3),
            "req_per_s": round(done / self.wall, 3) if self.wall else 0.0,
            "tokens_per_s": round(self.tokens / self.wall, 1) if self.wall else 0.0,
            "ttft_p50_ms": round(pct(self.ttfts, 50) * 1000, 1),
            "ttft_p99_ms": round(pct(self.ttfts, 99) * 1000, 1),
            "latency_p50_ms": round(pct(self.latencies, 50) * 1000, 1),
            "latency_mean_ms": round(statistics.fmean(self.latencies) * 1000, 1)
            if self.latencies
            else float("nan"),
        }


async def _one(client, url: str, body: dict, headers: dict, result: LoadResult) -> None:
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                result.errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                # the first chunk that carries generated text (the role chunk is sent before generation starts)
                if first is None and any(
                    c.get("delta", {}).get("content") or c.get("delta", {}).get("reasoning_content")
                    for c in chunk.get("choices", [])
                ):
                    first = time.perf_counter()
    except Exception as e:  # a benchmark records failures instead of dying on them
        result.errors.append(f"{type(e).__name__}: {e}")
        return
    end = time.perf_counter()
    result.latencies.append(end - start)
    result.ttfts.append((first or end) - start)
    result.tokens += tokens


async def run_load(
    base_url: str,
    bodies: list[dict],
    concurrency: int,
    api_key: str | None = None,
    timeout: float = 300.0,
) -> LoadResult:
    """Send `bodies` (streamed, usage included) keeping `concurrency` requests in flight; closed loop."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = LoadResult()
    queue = list(reversed(bodies))
    url = base_url.rstrip("/") + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker():
            while queue:
                body = queue.pop()
                body = {**body, "stream": True, "stream_options": {"include_usage": True}}
                await _one(client, url, body, headers, result)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall = time.perf_counter() - start
    return result
