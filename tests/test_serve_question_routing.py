"""Serving with the question-aware router: the vision side caches each image's ViT tokens, so a second question
about an image runs only the router and the projectors; the question's embedding is computed on the language
side and travels with the DvD request; models without the router, and the vLLM backend, refuse clearly."""

from __future__ import annotations

import argparse
import asyncio
import copy
import threading
import time

import httpx
import pytest
import torch

from tessera.bench.loadgen import data_url, image_for_tiles, image_message
from tessera.bench.question_cache import cached_question_cost
from tessera.commands import serve as serve_command
from tessera.image import ImageProcessor
from tessera.model.checkpoint import save_checkpoint
from tessera.routing import RoutingPolicy, encode_routed
from tessera.serve import protocol as P
from tessera.serve.language_server import (
    CoupledVision,
    LanguageServer,
    ServeOptions,
    check_question_routing,
    embed_question,
)
from tessera.serve.launch import LocalServer, ServeSetupError, check_default_routing
from tessera.serve.schema import APIError
from tessera.serve.vision import VisionEncoder, VisionInputError, vision_only
from tessera.serve.vision_client import RemoteVision
from tessera.serve.vision_server import VisionServer

QUESTIONS = [
    "what colour is the square?",
    "what is the label of the red diamond?",
    "how many circles?",
    "hi",
]


@pytest.fixture(scope="module")
def qmodel(tiny):
    """The tiny Flash model with a question router whose conditioning is moved off its zero start, so
    different questions give different decisions."""
    model = copy.deepcopy(tiny)
    qr = model.add_question_router()
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in (qr.film, qr.query_proj):
            torch.nn.init.normal_(layer.weight, std=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def image(qmodel):
    return image_for_tiles(6, qmodel.config.tile_size, seed=0)


def in_process(model, image: bytes, question: str):
    cfg = model.config
    batch = ImageProcessor(cfg.tile_size, cfg.min_tiles, cfg.max_tiles, cfg.use_thumbnail)([image])
    return encode_routed(
        model, batch.pixel_values, batch.tiles_per_image, "question", questions=[question]
    )


class ViTCalls:
    """Counts forward calls of a model's vision tower (a forward hook: no private state)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.vision_model.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_second_question_skips_the_vit_and_matches_in_process(qmodel, image):
    encoder = VisionEncoder(qmodel)
    policy = RoutingPolicy("question")
    with ViTCalls(qmodel) as vit:
        first = encoder.encode([image], policy, None, embed_question(qmodel, QUESTIONS[0]))
        assert vit.calls == 1 and encoder.vit_tiles == 7
        second = encoder.encode([image], policy, None, embed_question(qmodel, QUESTIONS[1]))
        assert vit.calls == 1 and encoder.vit_tiles == 7  # decoding, tiling and the ViT skipped
    assert (
        encoder.tokens.hits == 1 and len(encoder.cache) == 0
    )  # question routing: no feature cache
    for got, q in ((first, QUESTIONS[0]), (second, QUESTIONS[1])):
        want, decision = in_process(qmodel, image, q)
        assert got[0].meta.tokens_per_tile == decision.tokens_per_tile
        assert not got[0].meta.cache_hit
        torch.testing.assert_close(got[0].features, want, rtol=0, atol=0)
    # the other modes keep their feature cache, and reuse the cached ViT tokens too
    with ViTCalls(qmodel) as vit:
        routed = encoder.encode([image], RoutingPolicy("router"))
        again = encoder.encode([image], RoutingPolicy("router"))
    assert vit.calls == 0 and not routed[0].meta.cache_hit and again[0].meta.cache_hit
    assert torch.equal(
        routed[0].features,
        VisionEncoder(qmodel).encode([image], RoutingPolicy("router"))[0].features,
    )


def test_different_questions_route_the_same_image_differently(qmodel, image):
    encoder = VisionEncoder(qmodel)
    decisions = set()
    for q in QUESTIONS:
        got = encoder.encode([image], RoutingPolicy("question"), None, embed_question(qmodel, q))
        want, decision = in_process(qmodel, image, q)
        assert got[0].meta.tokens_per_tile == decision.tokens_per_tile
        torch.testing.assert_close(got[0].features, want, rtol=0, atol=0)
        decisions.add(tuple(decision.compress.tolist()))
    assert len(decisions) > 1  # the question changed which tiles keep 1/4
    assert encoder.vit_tiles == 7  # one ViT pass for all four questions


def test_question_needs_its_embedding_of_the_right_size(qmodel, tiny, image):
    encoder = VisionEncoder(qmodel)
    dim = qmodel.config.language.hidden_size
    with pytest.raises(VisionInputError, match="needs the question's embedding") as e:
        encoder.prepare([image], RoutingPolicy("question"))
    assert e.value.param == "routing"
    with pytest.raises(VisionInputError, match=f"must be {dim} finite numbers"):
        encoder.prepare([image], RoutingPolicy("question"), question=torch.zeros(dim + 1))
    with pytest.raises(VisionInputError, match="finite"):
        encoder.prepare(
            [image], RoutingPolicy("question"), question=torch.full((dim,), float("nan"))
        )
    with pytest.raises(VisionInputError, match="question-aware router") as e:  # tiny has none
        VisionEncoder(tiny).prepare([image], RoutingPolicy("question"), question=torch.zeros(dim))
    assert e.value.param == "routing"


def test_wire_carries_the_question_embedding(qmodel):
    dim = qmodel.config.language.hidden_size
    q = embed_question(qmodel, QUESTIONS[1])
    assert q.shape == (dim,) and q.dtype == torch.float32
    frames = P.encode_request("r1", [b"png"], RoutingPolicy("question"), 4, q)
    images, routing, max_tiles, back = P.parse_encode_request(P.unpack(frames), dim)
    assert images == [b"png"] and routing.mode == "question" and max_tiles == 4
    assert torch.equal(back, q)  # float32 both ways: exact
    with pytest.raises(P.ProtocolError, match=f"language hidden size is {dim + 8}"):
        P.parse_encode_request(P.unpack(frames), dim + 8)
    short = P.pack(
        "encode",
        {"id": "r2", "routing": {"mode": "question"}, "question_dim": dim},
        [b"png", b"\0" * (4 * dim - 4)],
    )
    with pytest.raises(P.ProtocolError, match=f"expected question_dim {dim} × 4"):
        P.parse_encode_request(P.unpack(short), dim)
    missing = P.encode_request("r3", [b"png"], RoutingPolicy("question"))
    with pytest.raises(P.ProtocolError, match="needs the question's embedding"):
        P.parse_encode_request(P.unpack(missing), dim)
    with pytest.raises(P.ProtocolError, match="one vector"):
        P.question_to_bytes(torch.zeros(2, dim))


def test_no_question_router_or_vllm_backend_refuse_clearly(qmodel, tiny):
    with pytest.raises(APIError, match="question-aware router") as e:
        check_question_routing(tiny)
    assert e.value.status == 400 and e.value.param == "routing"
    lean = vision_only(copy.deepcopy(qmodel), "cpu", None)  # a vision worker: no LLM weights at all
    with pytest.raises(APIError, match="token embeddings") as e:
        check_question_routing(lean)
    assert e.value.status == 400 and e.value.param == "routing"
    with pytest.raises(ServeSetupError, match="--routing question needs a model"):
        check_default_routing(tiny, "question")
    check_default_routing(qmodel, "question")
    check_default_routing(None, "router")


def test_vllm_language_side_keeps_what_question_routing_needs(qmodel):
    """A server whose LLM runs in vLLM holds the vision side and the token embeddings: it embeds the
    question exactly as the full model does, and no other language weight occupies memory."""
    lean = vision_only(copy.deepcopy(qmodel), "cpu", None, keep_embeddings=True)
    check_question_routing(lean)
    question = "What is the label of the red diamond?"
    assert torch.equal(embed_question(lean, question), embed_question(qmodel, question))
    held = [n for n, p in lean.language_model.named_parameters() if not p.is_meta]
    assert held == ["model.embed_tokens.weight"]


def ask(http, image: bytes, question: str, routing: str | None = "question"):
    body = {"messages": image_message(data_url(image), question), "max_tokens": 2}
    if routing is not None:
        body["routing"] = routing
    return http.post("/v1/chat/completions", json=body)


def image_tokens(r) -> int:
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["image_tokens"]


def test_api_question_routing_coupled_and_400_without_router(qmodel, tiny, image):
    server = LanguageServer(
        qmodel, CoupledVision(VisionEncoder(qmodel)), ServeOptions(default_routing="question")
    )
    with LocalServer(server) as s, httpx.Client(base_url=s.base_url, timeout=60) as http:
        for q in QUESTIONS[:3]:
            want = in_process(qmodel, image, q)[1].visual_tokens
            assert image_tokens(ask(http, image, q, routing=None)) == want  # the server's default
        vision = http.get("/health").json()["vision"]
        assert vision["vit_tiles"] == 7 and vision["token_cache_hits"] == 2
    plain = LanguageServer(tiny, CoupledVision(VisionEncoder(tiny)), ServeOptions())
    with LocalServer(plain) as s, httpx.Client(base_url=s.base_url, timeout=60) as http:
        r = ask(http, image, QUESTIONS[0])
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "routing" and "question-aware router" in err["message"]
        assert image_tokens(ask(http, image, QUESTIONS[0], routing="router")) > 0  # still serving


class ThreadedVisionServer:
    """A DvD vision server on a thread of this process, its model without language weights."""

    def __init__(self, model):
        lean = vision_only(copy.deepcopy(model), "cpu", None)
        self.server = VisionServer(VisionEncoder(lean), "tcp://127.0.0.1:*", max_wait_ms=5.0)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"announce": False}, daemon=True
        )

    def __enter__(self) -> VisionServer:
        self.thread.start()
        while self.server.endpoint is None:
            time.sleep(0.01)
        return self.server

    def __exit__(self, *exc):
        self.server.stop()
        self.thread.join(5)


def test_decoupled_question_routing_end_to_end(qmodel, image):
    with ThreadedVisionServer(qmodel) as vision_server:

        async def direct():
            pool = RemoteVision([vision_server.endpoint])
            await pool.start()
            try:
                q = embed_question(qmodel, QUESTIONS[1])
                got = await pool.encode([image], RoutingPolicy("question"), None, q)
                with pytest.raises(VisionInputError, match="language hidden size") as bad:
                    await pool.encode([image], RoutingPolicy("question"), None, q[:-1])
                return got, bad.value
            finally:
                await pool.stop()

        (got,), bad = asyncio.run(direct())
        want, decision = in_process(qmodel, image, QUESTIONS[1])
        assert got.meta.tokens_per_tile == decision.tokens_per_tile and bad.status == 400
        torch.testing.assert_close(got.features, want.to(torch.bfloat16), rtol=0, atol=0)

        server = LanguageServer(qmodel, RemoteVision([vision_server.endpoint]), ServeOptions())
        with LocalServer(server) as s, httpx.Client(base_url=s.base_url, timeout=60) as http:
            for q in (QUESTIONS[0], QUESTIONS[2]):
                want = in_process(qmodel, image, q)[1].visual_tokens
                assert image_tokens(ask(http, image, q)) == want
        stats = vision_server.encoder
        assert stats.vit_tiles == 7 and stats.tokens.hits == 2  # one ViT pass, three questions


def test_cached_question_cost_measures_both_paths(qmodel, image):
    out = cached_question_cost(qmodel, [image], QUESTIONS[:2], rounds=1)
    assert out["images"] == 1 and out["questions"] == 2 and out["tiles"] == 7
    assert out["vit_ms"] > 0 and out["cached_question_ms"] > 0
    assert out["ratio"] == pytest.approx(out["cached_question_ms"] / out["vit_ms"])


def serve_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    return serve_command.run(parser.parse_args(list(argv)))


def test_serve_cli_refuses_question_default_it_cannot_serve(tiny, tmp_path, capsys):
    save_checkpoint(tiny, tmp_path / "plain")  # a Flash model without a question router
    assert serve_cli(str(tmp_path / "plain"), "--routing", "question", "--port", "0") == 2
    assert (
        "--routing question needs a model with a question-aware router" in capsys.readouterr().err
    )
