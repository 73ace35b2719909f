"""Bad input, auth and overload: every case is a 4xx with an OpenAI-style error body, and the server keeps
serving afterwards."""

from __future__ import annotations

import base64
import concurrent.futures

import httpx
import openai
import pytest

from tessera.bench.loadgen import data_url, image_message, make_image
from tessera.serve.language_server import ServeOptions
from tessera.serve.launch import LocalServer, Topology, build_server
from tessera.serve.vision import VisionLimits

KEY = "sekrit-test-key"


@pytest.fixture(scope="module")
def server(tiny):
    options = ServeOptions(model_name="tiny", max_batch=1, max_waiting=1, max_len=256, max_images=2)
    limits = VisionLimits(max_pixels=300 * 300, max_tiles_per_request=8)
    srv = build_server("in-memory", Topology("coupled"), options, limits, model=tiny)
    with LocalServer(srv, api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as c:
        yield c


def post(http, body):
    return http.post("/v1/chat/completions", json=body)


def user(content):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


def image_body(url, **extra):
    return {"messages": image_message(url, "what is this"), "max_tokens": 2, **extra}


def assert_error(r, status, param=None, contains=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if contains is not None:
        assert contains in err["message"].lower()
    return err


def test_invalid_json(http):
    r = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert assert_error(r, 400)["type"] == "invalid_request_error"


def test_missing_and_invalid_fields(http):
    assert_error(post(http, {"model": "tiny"}), 400, param="messages", contains="missing")
    assert_error(post(http, {"messages": []}), 400, param="messages")
    assert_error(
        post(http, {"messages": [{"role": "wizard", "content": "x"}]}), 400, param="messages.0.role"
    )
    assert_error(post(http, {**user("x"), "temperature": 5}), 400, param="temperature")
    assert_error(post(http, {**user("x"), "n": 0}), 400, param="n")
    assert_error(post(http, [1, 2]), 400)
    assert_error(
        post(http, {"messages": [{"role": "assistant", "content": "hi"}]}),
        400,
        contains="last message",
    )
    assert_error(post(http, {**user("x"), "model": "gpt-9"}), 404, param="model")


def test_bad_base64_and_bad_urls(http):
    assert_error(
        post(http, image_body("data:image/png;base64,@@@not-base64@@@")), 400, contains="base64"
    )
    assert_error(post(http, image_body("data:image/png,rawbytes")), 400, contains="data:image")
    assert_error(
        post(http, image_body("data:text/plain;base64,aGVsbG8=")), 400, contains="media type"
    )
    assert_error(post(http, image_body("ftp://example.invalid/a.png")), 400)


def test_remote_urls_are_refused_by_default(http):
    err = assert_error(post(http, image_body("https://example.invalid/cat.png")), 400)
    assert err["code"] == "remote_images_disabled"


def test_not_an_image_and_truncated_image(http):
    junk = base64.b64encode(b"this is not an image at all" * 10).decode()
    assert_error(post(http, image_body(f"data:image/png;base64,{junk}")), 400, param="messages")
    png = make_image(120, 120, seed=3)
    assert_error(post(http, image_body(data_url(png[: len(png) // 2]))), 400)


def test_too_many_pixels_images_and_tiles(http):
    assert_error(post(http, image_body(data_url(make_image(400, 400)))), 400, contains="max_pixels")
    three = [
        {"type": "image_url", "image_url": {"url": data_url(make_image(50, 50, seed=i))}}
        for i in range(3)
    ]
    assert_error(post(http, user(three)), 400, contains="at most 2 images")
    wide = [
        {"type": "image_url", "image_url": {"url": data_url(make_image(560, 112, seed=i))}}
        for i in range(2)
    ]
    assert_error(
        post(http, user(wide)), 400, contains="tiles"
    )  # 2 × (5×1 grid + thumbnail) = 12 > 8 tiles
    assert_error(
        post(http, image_body(data_url(make_image(60, 60)), max_tiles=50)), 400, param="max_tiles"
    )


def test_routing_and_budget_errors(http):
    url = data_url(make_image(112, 112, seed=9))
    assert_error(post(http, image_body(url, routing="sideways")), 400, param="routing")
    assert_error(
        post(http, image_body(url, visual_token_budget=1)), 400, param="visual_token_budget"
    )


def test_prompt_beyond_context(http):
    err = assert_error(post(http, user("circle " * 400)), 400)
    assert err["code"] == "context_length_exceeded"
    err = assert_error(post(http, {**user("hi"), "max_tokens": 250}), 400)
    assert err["code"] == "context_length_exceeded"


def test_auth(server):
    body = user("hi")
    assert_error(httpx.post(server.base_url + "/v1/chat/completions", json=body), 401)
    assert_error(
        httpx.post(
            server.base_url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": "Bearer nope"},
        ),
        401,
    )
    assert httpx.get(server.base_url + "/health").status_code == 200  # health stays open for probes
    assert_error(httpx.get(server.base_url + "/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=server.base_url + "/v1", api_key="wrong", max_retries=0
        ).models.list()
    good = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
    assert good.chat.completions.create(
        model="tiny", messages=body["messages"], max_tokens=2
    ).choices


def test_overload_gets_429_then_recovers(http, server):
    # one running slot and one waiting place: of four long requests at once, at least one is refused
    body = {**user("count"), "max_tokens": 180, "temperature": 0}

    def send(_):
        return httpx.post(
            server.base_url + "/v1/chat/completions",
            json=body,
            timeout=120,
            headers={"Authorization": f"Bearer {KEY}"},
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, range(4)))
    codes = sorted(r.status_code for r in results)
    assert 429 in codes and 200 in codes, codes
    limited = next(r for r in results if r.status_code == 429)
    assert assert_error(limited, 429)["type"] == "rate_limit_error"
    assert post(http, user("still there?")).status_code == 200


def test_unknown_route_and_server_still_serves(http):
    assert_error(http.get("/v1/nothing"), 404)
    r = post(http, image_body(data_url(make_image(200, 100, seed=5))))
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    metrics = http.get("/metrics").text
    assert 'tessera_errors_total{status="400"}' in metrics
