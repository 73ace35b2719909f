"""A hostile client: out-of-range seeds, deeply nested and oversized bodies, wrong media types and
methods, loosely typed fields, huge stop strings, and what /health tells a caller without the API
key. Each answer is a 4xx with an OpenAI-style body, and the same keep-alive connection keeps
serving afterwards."""

from __future__ import annotations

import concurrent.futures
import random
import threading

import httpx
import pytest

import tessera.serve.language_server as ls_mod
from tessera.cli import build_parser
from tessera.serve.api import MAX_JSON_DEPTH, json_depth
from tessera.serve.detok import StopMatcher, TextAssembler
from tessera.serve.language_server import OFF_LOOP_CHARS, ServeOptions
from tessera.serve.launch import LocalServer, Topology, build_server
from tessera.serve.schema import MAX_STOP_CHARS, MAX_STOPS

KEY = "hostile-test-key"
BODY_LIMIT = 1 << 20
URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def model(lively):
    return lively


@pytest.fixture(scope="module")
def server(model):
    options = ServeOptions(
        model_name="hostile", max_batch=8, max_len=512, max_body_bytes=BODY_LIMIT
    )
    srv = build_server("in-memory", Topology("coupled"), options, model=model)
    with LocalServer(srv, api_key=KEY) as s:
        yield s


@pytest.fixture
def http(server):
    """One client, one pooled connection: every request after a refusal reuses it."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        limits=limits,
    ) as c:
        yield c


def user(content="hi", **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


def local_port(r: httpx.Response) -> int:
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


def assert_error(r, status, param=None, type_="invalid_request_error"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == type_
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_same_connection_serves(http, first: httpx.Response):
    assert first.headers.get("connection", "").lower() != "close"
    ok = http.post(URL, json=user())
    assert ok.status_code == 200, ok.text
    assert local_port(ok) == local_port(
        first
    )  # the pooled connection was kept, not reset and replaced


# ---- defect 1: seeds -----------------------------------------------------------------------------


def test_seeds_beyond_64_bits_are_a_400_and_fail_no_neighbour(server, http):
    for seed in (2**64, -(2**63) - 1, 10**30):
        assert_error(http.post(URL, json=user(seed=seed, temperature=1.0)), 400, param="seed")
    bad = {**user(seed=2**64, temperature=1.0), "max_tokens": 8}
    good = {**user("count the circles", temperature=1.0, seed=4), "max_tokens": 8}
    alone = http.post(URL, json=good).json()["choices"][0]["message"]["content"]

    def send(body):
        return httpx.post(
            server.base_url + URL, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, [bad, good] * 6))
    for body, r in zip([bad, good] * 6, results):
        if body is bad:
            assert_error(r, 400, param="seed")
        else:
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == alone
    streamed = http.post(URL, json={**bad, "stream": True})
    assert_error(
        streamed, 400, param="seed"
    )  # refused before the stream opens, not as an error event


def test_the_extreme_64_bit_seeds_work_with_n_choices(http):
    for seed in (2**64 - 1, -(2**63)):
        r = http.post(URL, json=user(seed=seed, temperature=1.0, n=2))
        assert (
            r.status_code == 200 and len(r.json()["choices"]) == 2
        )  # choice 1 wraps to the next seed


# ---- defect 2: nesting and size ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"[" * (1 << 19) + b"]" * (1 << 19),
        b'{"a":' * 150_000 + b"1" + b"}" * 150_000,
        b'{"messages": ' + b"[" * (MAX_JSON_DEPTH + 5) + b"]" * (MAX_JSON_DEPTH + 5) + b"}",
    ],
    ids=["1MB-arrays", "150k-objects", "just-past-the-limit"],
)
def test_deeply_nested_json_is_a_400_and_the_connection_survives(http, body):
    r = http.post(URL, content=body, headers={"Content-Type": "application/json"})
    assert assert_error(r, 400)["code"] == "invalid_json"
    assert_same_connection_serves(http, r)


def test_json_depth_counts_iteratively():
    assert (
        json_depth(1, 10) == 0
        and json_depth([], 10) == 1
        and json_depth({"a": [{"b": 1}]}, 10) == 3
    )
    deep: list = []
    for _ in range(100_000):  # far beyond the recursion limit
        deep = [deep]
    assert json_depth(deep, 40) == 41  # stops counting past the limit


def test_a_body_over_the_size_limit_is_a_413(http, server):
    big = user("circle " * (BODY_LIMIT // 7 + 10))
    r = http.post(URL, json=big)
    assert_error(r, 413)
    assert (
        r.headers["connection"] == "close"
    )  # its body is left unread, so the connection ends, announced

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(BODY_LIMIT // 65536 + 2):
            yield b" " * 65536

    r = httpx.post(
        server.base_url + URL,
        content=chunks(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert_error(r, 413)
    assert http.post(URL, json=user()).status_code == 200


# ---- defect 3: stop strings ----------------------------------------------------------------------


def test_stop_strings_are_bounded_in_count_and_length(http):
    assert_error(http.post(URL, json=user(stop=["x" * 250_000] * 4)), 400, param="stop")
    assert_error(http.post(URL, json=user(stop=["x" * (MAX_STOP_CHARS + 1)])), 400, param="stop")
    assert_error(
        http.post(URL, json=user(stop=[str(i) for i in range(MAX_STOPS + 1)])), 400, param="stop"
    )
    r = http.post(URL, json={**user(stop=["x" * MAX_STOP_CHARS] * MAX_STOPS), "max_tokens": 8})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def naive_hold(buf: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)


def test_stop_matcher_agrees_with_the_naive_search():
    rng = random.Random(0)
    for _ in range(300):
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 6)))
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 30)))
        m = StopMatcher(stop)
        for j, ch in enumerate(text):
            hit = m.feed(ch)
            seen = text[: j + 1]
            assert hit == seen.endswith(stop)
            if not hit:
                assert m.state == naive_hold(seen, [stop]) or (
                    m.state == 0 and naive_hold(seen, [stop]) == 0
                )


def test_assembler_cuts_and_holds_back_as_the_naive_search_does(model):
    tok = model.tokenizer
    rng = random.Random(1)
    words = ["ab", "ba", "aab", " ", "b", "a", "circle"]
    for _ in range(60):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        stops = [
            "".join(rng.choice("ab ") for _ in range(rng.randint(1, 5)))
            for _ in range(rng.randint(1, 4))
        ]
        asm = TextAssembler(tok, thinking=False, stop=stops)
        out, stopped = "", False
        for t in tok.encode(text):
            d = asm.push(t)
            out += d.content
            if d.stopped:
                stopped = True
                break
            assert len(asm._pending) == naive_hold(
                out + asm._pending, stops
            )  # held back exactly what may grow
        if not stopped:
            out += asm.finish().content
        decoded = tok.decode(tok.encode(text))
        cut = min((decoded.find(s) + len(s) for s in stops if s in decoded), default=None)
        if cut is None:
            assert not stopped and out == decoded
        else:  # the first stop string to complete ends the answer, cut before it
            first = min(
                (s for s in stops if decoded.find(s) >= 0 and decoded.find(s) + len(s) == cut),
                key=len,
                default=None,
            )
            assert stopped and out == decoded[: cut - len(first)]


def test_long_stop_strings_cost_linear_work(model):
    stop = "a" * MAX_STOP_CHARS
    asm = TextAssembler(model.tokenizer, thinking=False, stop=[stop] * MAX_STOPS)
    fed = 0
    for _ in range(
        50
    ):  # a run of "a"s that keeps growing into the stop: the worst case for hold-back
        d = asm._take_content("a" * 10)
        fed += 10
        assert not d.stopped and len(asm._pending) == min(fed, MAX_STOP_CHARS - 1)
    matcher = asm._matchers[0]
    assert len(matcher.fail) == MAX_STOP_CHARS  # the only per-stop state: one table, built once


# ---- strict types, media types, methods, param paths ---------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 3.0),
        ("max_tokens", "5"),
        ("max_tokens", True),
        ("stream", "yes"),
        ("n", 1.0),
        ("seed", "7"),
        ("temperature", "0.5"),
        ("temperature", True),
        ("ignore_eos", 1),
    ],
)
def test_types_are_as_strict_as_openai(http, field, value):
    assert_error(http.post(URL, json={**user(), field: value}), 400, param=field)


def test_numbers_that_are_numbers_still_pass(http):
    assert http.post(URL, json=user(temperature=1, top_p=1, max_tokens=2)).status_code == 200


def test_a_text_plain_body_is_a_415(http):
    r = http.post(
        URL,
        content=b'{"messages": [{"role": "user", "content": "hi"}]}',
        headers={"Content-Type": "text/plain"},
    )
    assert assert_error(r, 415)["code"] == "unsupported_media_type"
    assert_same_connection_serves(http, r)


def test_get_on_the_post_route_is_a_typed_405(http):
    r = http.get(URL)
    assert assert_error(r, 405)["code"] == "method_not_allowed"
    assert "POST" in r.headers.get("allow", "")


def test_an_unknown_content_part_is_reported_at_its_type(http):
    parts = [{"type": "text", "text": "hi"}, {"type": "video_url", "video_url": {"url": "x"}}]
    err = assert_error(http.post(URL, json=user(parts)), 400, param="messages.0.content.1.type")
    assert "video_url" in err["message"]
    assert_error(
        http.post(URL, json=user([{"text": "no type"}])), 400, param="messages.0.content.0.type"
    )
    bad_url = [{"type": "image_url", "image_url": {"url": 3}}]
    assert_error(
        http.post(URL, json=user(bad_url)), 400, param="messages.0.content.0.image_url.url"
    )


# ---- long prompts are tokenised off the loop -----------------------------------------------------


def test_a_long_prompt_is_read_and_tokenised_off_the_event_loop(http, monkeypatch):
    threads = []
    render = ls_mod.render_prompt

    def spy(*args):
        threads.append(threading.current_thread().name)
        return render(*args)

    monkeypatch.setattr(ls_mod, "render_prompt", spy)
    assert http.post(URL, json=user("hi")).status_code == 200
    long_ = http.post(URL, json=user("c" * (OFF_LOOP_CHARS + 1)))
    assert long_.status_code in (200, 400)  # fits or not: either way tokenised elsewhere
    assert threads[0] == "tessera-api" and threads[1] != "tessera-api"


# ---- /health and the key -------------------------------------------------------------------------


def test_health_shows_only_a_status_without_the_key(server, http):
    anon = httpx.get(server.base_url + "/health")
    assert anon.status_code == 200 and anon.json() == {"status": "ok"}
    full = http.get("/health").json()
    assert full["status"] == "ok" and "vision" in full and "engine" in full


def test_the_api_key_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TESSERA_API_KEY", "from-env")
    args = build_parser("serve").parse_args(["serve", "ckpt"])
    assert args.api_key == "from-env"
    args = build_parser("serve").parse_args(["serve", "ckpt", "--api-key", "flag"])
    assert args.api_key == "flag"


def test_text_that_cannot_fit_is_refused_before_tokenisation(server, http, monkeypatch):
    limit = server.language_server.max_prompt_chars
    assert limit is not None and limit < BODY_LIMIT // 2
    calls = []
    render = ls_mod.render_prompt
    monkeypatch.setattr(ls_mod, "render_prompt", lambda *a: calls.append(1) or render(*a))
    err = assert_error(http.post(URL, json=user("c" * (limit + 1))), 400, param="messages")
    assert err["code"] == "context_length_exceeded" and not calls  # refused without tokenising it
    err = assert_error(http.post(URL, json=user("circle " * (limit // 7))), 400, param="messages")
    assert (
        err["code"] == "context_length_exceeded" and calls
    )  # within the bound: tokenised, then refused


def test_an_unexpected_error_is_a_500_body_and_the_connection_survives(server, http, monkeypatch):
    async def broken(req):
        raise RuntimeError("injected unexpected failure")

    monkeypatch.setattr(server.language_server, "prepare", broken)
    r = http.post(URL, json=user())
    err = assert_error(r, 500, type_="server_error")
    assert "injected unexpected failure" in err["message"]
    monkeypatch.undo()
    assert_same_connection_serves(http, r)
