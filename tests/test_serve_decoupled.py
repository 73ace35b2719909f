"""DvD: the feature wire format, a vision server batching and caching, the worker pool's failure handling,
and the decoupled API with a local worker that dies and is restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest
import torch

from tessera.bench.loadgen import data_url, image_for_tiles, image_message, make_image
from tessera.model.checkpoint import save_checkpoint
from tessera.routing import RoutingPolicy
from tessera.serve import protocol as P
from tessera.serve.language_server import CoupledVision, LanguageServer, ServeOptions
from tessera.serve.launch import LocalServer, Topology, build_server
from tessera.serve.vision import VisionEncoder, VisionInputError, VisionUnavailable
from tessera.serve.vision_client import RemoteVision
from tessera.serve.vision_server import VisionServer


@pytest.fixture(scope="module")
def model(tiny):
    return tiny


class ThreadedVisionServer:
    """A vision server on a thread of this process (same code as the `tessera vision-server` process)."""

    def __init__(self, model, bind="tcp://127.0.0.1:*", max_wait_ms=30.0):
        self.server = VisionServer(
            VisionEncoder(model), bind, max_batch_tiles=64, max_wait_ms=max_wait_ms
        )
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"announce": False}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        while self.server.endpoint is None:
            time.sleep(0.01)
        return self.server

    def __exit__(self, *exc):
        self.server.stop()
        self.thread.join(5)


def test_wire_format_round_trip_and_errors():
    feats = torch.randn(20, 8)
    meta = P.ImageMeta([16, 4], (1, 1), 32)
    msg = P.unpack(P.features_reply("r1", [P.EncodedImage(meta, feats)]))
    (back,) = P.parse_features(msg)
    assert back.meta.tokens_per_tile == [16, 4] and back.meta.compressed_tiles == 1
    assert back.features.dtype == torch.bfloat16 and torch.equal(
        back.features, feats.to(torch.bfloat16)
    )
    req = P.unpack(
        P.encode_request("r2", [b"png-bytes"], RoutingPolicy("router", budget=40), max_tiles=4)
    )
    images, routing, max_tiles, question = P.parse_encode_request(req)
    assert (
        images == [b"png-bytes"]
        and routing == RoutingPolicy("router", budget=40)
        and max_tiles == 4
        and question is None
    )
    with pytest.raises(P.ProtocolError, match="magic"):
        P.unpack([b"HTTP", b"encode", b"{}"])
    with pytest.raises(P.ProtocolError, match="expected rows"):
        P.bytes_to_features(b"\x00" * 10, rows=2, dim=8)
    with pytest.raises(P.ProtocolError, match="feature rows"):
        P.features_reply("r3", [P.EncodedImage(meta, torch.zeros(5, 8))])
    with pytest.raises(ValueError):
        RoutingPolicy("sideways")


def test_vision_server_batches_concurrent_requests_and_caches(model):
    tile = model.config.tile_size

    async def scenario(endpoint):
        pool = RemoteVision([endpoint])
        await pool.start()
        try:
            imgs = [[image_for_tiles(4, tile, seed=i)] for i in range(4)]
            first = await asyncio.gather(*(pool.encode(b, RoutingPolicy(), None) for b in imgs))
            again = await pool.encode(imgs[0], RoutingPolicy(), None)
            routed = await pool.encode(imgs[0], RoutingPolicy("compressed"), None)
            with pytest.raises(VisionInputError) as bad:
                await pool.encode([b"not an image"], RoutingPolicy(), None)
            return first, again, routed, bad.value
        finally:
            await pool.stop()

    with ThreadedVisionServer(model) as server:
        first, again, routed, bad = asyncio.run(scenario(server.endpoint))
        stats = server.stats
    assert all(r[0].meta.tokens_per_tile == [16] * 5 for r in first)
    assert stats.batches < 4  # the four concurrent requests shared ViT batches
    assert again[0].meta.cache_hit and torch.equal(again[0].features, first[0][0].features)
    assert (
        routed[0].meta.tokens_per_tile == [4] * 5 and not routed[0].meta.cache_hit
    )  # routing is part of the key
    assert bad.status == 400
    # the bf16 features equal the coupled encoder's, rounded
    direct = VisionEncoder(model).encode([image_for_tiles(4, tile, seed=0)], RoutingPolicy())
    assert torch.allclose(first[0][0].features.float(), direct[0].features, atol=0.02, rtol=0.02)


def test_remote_worker_without_heartbeat_is_marked_down_and_comes_back(model):
    async def scenario():
        with ThreadedVisionServer(model) as server:
            endpoint = server.endpoint
            pool = RemoteVision([endpoint], heartbeat=0.1, heartbeat_timeout=0.5)
            await pool.start()
            await pool.encode([make_image(50, 50)], RoutingPolicy(), None)
        try:
            deadline = time.monotonic() + 5
            while pool.status()["workers_alive"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert pool.status()["workers_alive"] == 0
            t = time.monotonic()
            with pytest.raises(VisionUnavailable):
                await pool.encode([make_image(50, 50)], RoutingPolicy(), None)
            assert time.monotonic() - t < 0.5  # refused at once, not after a timeout
            with ThreadedVisionServer(model, bind=endpoint):
                deadline = time.monotonic() + 5
                while not pool.status()["workers_alive"] and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert pool.status()["workers_alive"] == 1
                out = await pool.encode([make_image(50, 50, seed=1)], RoutingPolicy(), None)
                assert out[0].meta.rows == 16
        finally:
            await pool.stop()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-ckpt")
    save_checkpoint(model, path)
    return str(path)


def kill_worker(http) -> int:
    pid = http.get("/health").json()["vision"]["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)  # a few supervisor polls
    return pid


def ask_image(http, seed):
    body = {
        "messages": image_message(data_url(make_image(200, 150, seed)), "what"),
        "max_tokens": 3,
    }
    return http.post("/v1/chat/completions", json=body)


def decoupled(model, checkpoint):
    srv = build_server(
        checkpoint,
        Topology("decoupled", vision_workers=1),
        ServeOptions(model_name="tiny"),
        model=model,
    )
    return LocalServer(srv)


def test_dying_worker_gives_a_prompt_503_and_text_keeps_working(model, checkpoint):
    with decoupled(model, checkpoint) as s, httpx.Client(base_url=s.base_url, timeout=60) as http:
        r = ask_image(http, 1)
        assert (
            r.status_code == 200
            and r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 7 * 16
        )
        kill_worker(http)
        t = time.monotonic()
        r = ask_image(http, 2)
        assert r.status_code == 503 and r.json()["error"]["code"] == "vision_unavailable"
        assert time.monotonic() - t < 1.0
        text = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
        assert text.status_code == 200
        health = http.get("/health").json()
        assert (
            health["status"] == "degraded" and health["vision"]["restarts"] == 1
        )  # a replacement is starting


@pytest.mark.slow
def test_dead_worker_is_restarted_and_serves_again(model, checkpoint):
    with decoupled(model, checkpoint) as s, httpx.Client(base_url=s.base_url, timeout=60) as http:
        assert ask_image(http, 1).status_code == 200
        pid = kill_worker(http)
        deadline = time.monotonic() + 60
        while http.get("/health").json()["vision"]["workers_alive"] < 1:
            assert time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.1)
        health = http.get("/health").json()["vision"]
        assert health["restarts"] == 1 and health["workers"][0]["pid"] != pid
        assert ask_image(http, 3).status_code == 200


def test_feature_cache_is_lru_by_entries_and_bytes():
    from tessera.serve.vision import FeatureCache

    def entry(rows):
        return [
            P.EncodedImage(P.ImageMeta([rows], (1, 1), 16), torch.zeros(rows, 4))
        ]  # rows × 16 bytes

    cache = FeatureCache(capacity=2, max_bytes=1000)
    cache.put("a", entry(16))
    cache.put("b", entry(16))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", entry(16))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    cache.put("d", entry(50))  # 800 bytes: the other entries must go to stay under 1000
    assert cache.get("d") is not None and cache.bytes <= 1000 and len(cache) == 1
    cache.put("huge", entry(100))  # larger than the whole budget: not cached at all
    assert cache.get("huge") is None and cache.get("d") is not None
    assert P.ImageMeta([4, 4, 4], (1, 1), 48).compressed_tiles == 3  # all at 1/16 counts every tile


class SlowEncoder(VisionEncoder):
    """Vision that takes a second per batch: long enough to see whether decoding waits for it."""

    def run(self, jobs):
        time.sleep(1.0)
        return super().run(jobs)


def longest_gap_while_an_image_is_encoded(base_url: str) -> float:
    """Stream a long text answer; midway send an image request; return the longest pause between text chunks."""
    body = {
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    image = {
        "messages": image_message(data_url(make_image(150, 100, seed=4)), "what"),
        "max_tokens": 2,
    }
    stamps, started = [], threading.Event()
    image_thread = threading.Thread(
        target=lambda: (
            started.wait(10),
            httpx.post(base_url + "/v1/chat/completions", json=image, timeout=60),
        )
    )
    image_thread.start()
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.monotonic())
                if len(stamps) == 20:
                    started.set()
    image_thread.join(30)
    return max(b - a for a, b in zip(stamps[20:], stamps[21:]))


def test_decoding_continues_while_vision_works_only_when_decoupled(model):
    server = VisionServer(SlowEncoder(model), "tcp://127.0.0.1:*", max_wait_ms=1.0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"announce": False}, daemon=True)
    thread.start()
    while server.endpoint is None:
        time.sleep(0.01)
    try:
        decoupled_srv = LanguageServer(
            model, RemoteVision([server.endpoint]), ServeOptions(model_name="tiny")
        )
        with LocalServer(decoupled_srv) as s:
            decoupled_gap = longest_gap_while_an_image_is_encoded(s.base_url)
    finally:
        server.stop()
        thread.join(5)
    coupled_srv = LanguageServer(
        model, CoupledVision(SlowEncoder(model)), ServeOptions(model_name="tiny")
    )
    with LocalServer(coupled_srv) as s:
        coupled_gap = longest_gap_while_an_image_is_encoded(s.base_url)
    assert decoupled_gap < 0.5, (
        decoupled_gap
    )  # the engine kept decoding while the vision server worked
    assert coupled_gap >= 0.9, (
        coupled_gap
    )  # the baseline: vision on the engine thread stalls every stream


def test_bf16_vision_side_stays_close_and_leaves_the_llm_alone(model):
    import copy

    twin = copy.deepcopy(model)
    image = [image_for_tiles(4, model.config.tile_size, seed=8)]
    exact = VisionEncoder(model).encode(image, RoutingPolicy())[0]
    fast = VisionEncoder(twin, dtype=torch.bfloat16).encode(image, RoutingPolicy())[0]
    assert (
        fast.features.dtype == torch.bfloat16
        and twin.language_model.embed_tokens.weight.dtype == torch.float32
    )
    assert fast.meta.tokens_per_tile == exact.meta.tokens_per_tile
    rel = (fast.features.float() - exact.features).abs().max() / exact.features.abs().max()
    assert rel < 0.05
