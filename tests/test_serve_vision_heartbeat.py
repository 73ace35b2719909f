"""Heartbeats for vision workers: a worker answers pings while it computes a batch, and a local
worker that is stopped (SIGSTOP) is reported unhealthy, its requests get a prompt 503 (long before
the vision timeout), and it is replaced, with a real `tessera vision-server` child process."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import httpx
import pytest
import zmq

from tessera.bench.loadgen import data_url, image_message, make_image
from tessera.model.checkpoint import save_checkpoint
from tessera.routing import RoutingPolicy
from tessera.serve import protocol as P
from tessera.serve.language_server import ServeOptions
from tessera.serve.launch import LocalServer, Topology, build_server
from tessera.serve.vision import VisionEncoder
from tessera.serve.vision_server import VisionServer

VISION_TIMEOUT = 120.0  # the server's default: a hung worker's requests must fail well before it


@pytest.fixture(scope="module")
def model(tiny):
    return tiny


def test_a_worker_answers_pings_while_it_computes_a_batch(model):
    encoder = VisionEncoder(model)
    release, started = threading.Event(), threading.Event()
    run = encoder.run

    def slow_run(jobs):  # a batch that takes as long as the test wants
        started.set()
        assert release.wait(30)
        return run(jobs)

    encoder.run = slow_run
    server = VisionServer(encoder, "tcp://127.0.0.1:*", max_wait_ms=1.0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"announce": False}, daemon=True)
    thread.start()
    while server.endpoint is None:
        time.sleep(0.01)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        sock.send_multipart(P.encode_request("job", [make_image(60, 60)], RoutingPolicy()))
        assert started.wait(30)
        sock.send_multipart(P.pack("ping", {"id": "ping"}))
        assert sock.poll(10_000), "no pong while the batch computes"
        assert P.unpack(sock.recv_multipart()).kind == "pong"  # before the batch's reply
        release.set()
        assert sock.poll(30_000)
        reply = P.unpack(sock.recv_multipart())
        assert reply.kind == "features" and reply.header["id"] == "job"
    finally:
        release.set()
        server.stop()
        thread.join(5)
        sock.close(0)
        ctx.term()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-ckpt-heartbeat")
    save_checkpoint(model, path)
    return str(path)


def ask_image(base_url, seed):
    body = {
        "messages": image_message(data_url(make_image(200, 150, seed)), "what"),
        "max_tokens": 3,
    }
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=VISION_TIMEOUT + 30)


def test_a_stopped_local_worker_is_unhealthy_gets_prompt_503s_and_is_replaced(model, checkpoint):
    topology = Topology("decoupled", vision_workers=1, heartbeat_timeout=3.0)
    options = ServeOptions(model_name="tiny", vision_timeout=VISION_TIMEOUT)
    srv = build_server(checkpoint, topology, options, model=model)
    stopped = None
    with LocalServer(srv) as s:
        try:
            assert ask_image(s.base_url, 1).status_code == 200
            stopped = httpx.get(s.base_url + "/health").json()["vision"]["workers"][0]["pid"]
            os.kill(stopped, signal.SIGSTOP)
            t = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(ask_image, s.base_url, 2)  # sent to the stopped worker
                text = httpx.post(
                    s.base_url + "/v1/chat/completions",
                    timeout=60,
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                )
                r = pending.result()
            waited = time.monotonic() - t
            assert text.status_code == 200  # text never waits on vision
            assert r.status_code == 503 and r.json()["error"]["code"] == "vision_unavailable", (
                r.text
            )
            assert "heartbeat" in r.json()["error"]["message"]
            assert waited < VISION_TIMEOUT / 4, (
                waited
            )  # the heartbeat, not the vision timeout, ended it
            health = httpx.get(s.base_url + "/health").json()
            assert health["status"] == "degraded" and health["vision"]["workers_alive"] == 0
            deadline = time.monotonic() + 90
            while httpx.get(s.base_url + "/health").json()["vision"]["workers_alive"] < 1:
                assert time.monotonic() < deadline, "the stopped worker was not replaced"
                time.sleep(0.1)
            vision = httpx.get(s.base_url + "/health").json()["vision"]
            assert vision["restarts"] == 1 and vision["workers"][0]["pid"] != stopped
            with pytest.raises(ProcessLookupError):
                os.kill(stopped, 0)  # the hung process was killed (and reaped), not left behind
            assert ask_image(s.base_url, 3).status_code == 200
        finally:
            if stopped is not None:
                try:
                    os.kill(stopped, signal.SIGKILL)
                except ProcessLookupError:
                    pass
