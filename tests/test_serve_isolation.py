"""Per-request isolation at every batched step: a request that fails on purpose during preparation
(admission), the batched prefill, sampling (at prefill and at a decode step), event delivery or
detokenisation leaves every other request of its batch exactly as it would have been alone."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

import tessera.engine.engine as engine_mod
from tessera.engine import Engine, GenerationRequest, SamplingParams
from tessera.serve.detok import TextAssembler
from tessera.serve.language_server import ServeOptions
from tessera.serve.launch import LocalServer, Topology, build_server

MAX_TOKENS = 6
SENTINEL = (
    12345.0  # written into the first embedding value of the prompt that makes the prefill fail
)


@pytest.fixture(scope="module")
def model(lively):
    return lively


@pytest.fixture(scope="module")
def prompts(model):
    tok = model.tokenizer
    return [tok.encode(f"question {i}: {'how many circles ' * (i + 1)}") for i in range(4)]


def good_params(i: int) -> SamplingParams:
    """Two greedy and two seeded sampled requests: a mix-up or a shifted generator would show."""
    if i % 2 == 0:
        return SamplingParams(max_tokens=MAX_TOKENS)
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=100 + i)


def make_engine(model, embed_fn=None) -> Engine:
    return Engine(model.language_model, max_batch=8, max_len=128, embed_fn=embed_fn or model.embed)


def run(engine: Engine, requests: list[tuple[str, list[int], SamplingParams]], on_event=None):
    """Submit everything, then step until each request has finished.

    Returns {id: (tokens, finish_reason)} and the recording callback."""
    tokens: dict[str, list[int]] = {rid: [] for rid, _, _ in requests}
    reasons: dict[str, str] = {}

    def record(ev):
        if ev.token_id is not None:
            tokens[ev.request_id].append(ev.token_id)
        if ev.finished:
            reasons[ev.request_id] = ev.finish_reason

    for rid, ids, params in requests:
        engine.submit(GenerationRequest(rid, ids, params, on_event or record))
    for _ in range(100):
        if len(reasons) == len(requests) and not engine.has_work():
            break
        engine.step()
    return {rid: (tokens[rid], reasons.get(rid)) for rid, _, _ in requests}, record


@pytest.fixture(scope="module")
def alone(model, prompts):
    """Each good request run by itself."""
    out = {}
    for i, ids in enumerate(prompts):
        got, _ = run(make_engine(model), [(f"good-{i}", ids, good_params(i))])
        out[f"good-{i}"] = got[f"good-{i}"]
        assert got[f"good-{i}"][1] in ("length", "stop") and got[f"good-{i}"][0]
    return out


def with_bad(prompts, bad_params=None, bad_ids=None):
    """The good requests with a bad one in the middle of the batch."""
    reqs = [(f"good-{i}", ids, good_params(i)) for i, ids in enumerate(prompts)]
    reqs.insert(
        2, ("bad", bad_ids or prompts[0], bad_params or SamplingParams(max_tokens=MAX_TOKENS))
    )
    return reqs


def assert_isolated(got, alone, bad_reason="error"):
    for rid, expected in alone.items():
        assert got[rid] == expected, rid
    assert got["bad"][1] == bad_reason


def test_a_seed_beyond_64_bits_fails_only_its_own_request_at_admission(model, prompts, alone):
    # defect 1: the generator was made inside the batched prefill, so its overflow failed the batch
    engine = make_engine(model)
    got, _ = run(
        engine,
        with_bad(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=2**64)),
    )
    assert_isolated(got, alone)
    assert got["bad"][0] == []


def test_a_failing_preparation_fails_only_its_request(model, prompts, alone):
    bad_ids = prompts[1] + [7]  # identified by its length

    def embed(ids, features):
        if ids.shape[1] == len(bad_ids):
            raise RuntimeError("injected preparation failure")
        return model.embed(ids, features)

    got, _ = run(make_engine(model, embed), with_bad(prompts, bad_ids=bad_ids))
    assert_isolated(got, alone)


def test_a_failing_batched_prefill_is_retried_per_request(model, prompts, alone, monkeypatch):
    bad_ids = prompts[1] + [7]

    def embed(ids, features):
        e = model.embed(ids, features)
        if ids.shape[1] == len(bad_ids):
            e = e.clone()
            e[0, 0, 0] = (
                SENTINEL  # this request's data makes the forward raise, in any batch it is in
            )
        return e

    engine = make_engine(model, embed)
    hidden = engine.llm.hidden
    calls = []

    def failing_hidden(inputs_embeds, *args, **kwargs):
        calls.append(inputs_embeds.shape[0])
        if bool((inputs_embeds[:, 0, 0] == SENTINEL).any()):
            raise RuntimeError("injected prefill failure")
        return hidden(inputs_embeds, *args, **kwargs)

    monkeypatch.setattr(engine.llm, "hidden", failing_hidden)
    got, _ = run(engine, with_bad(prompts, bad_ids=bad_ids))
    assert (
        calls[0] == 5
    )  # the five were admitted together, so the failure did happen in their batch
    assert_isolated(got, alone)


@pytest.mark.parametrize("fail_at", [1, 3], ids=["at-prefill", "at-decode"])
def test_a_failing_sampling_call_fails_only_its_row(model, prompts, alone, monkeypatch, fail_at):
    bad = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, seed=3)
    seen = {"calls": 0}
    real = engine_mod.sample_tokens

    def sample(logits, params, generators):
        if any(p is bad for p in params):
            seen["calls"] += 1
            if seen["calls"] >= fail_at:
                raise RuntimeError("injected sampling failure")
        return real(logits, params, generators)

    monkeypatch.setattr(engine_mod, "sample_tokens", sample)
    got, _ = run(make_engine(model), with_bad(prompts, bad))
    assert_isolated(got, alone)
    assert len(got["bad"][0]) == fail_at - 1  # the tokens it had before its failure


def test_a_failing_event_callback_ends_only_its_request(model, prompts, alone):
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}

    def deliver(ev):
        if ev.request_id == "bad" and len(tokens.get("bad", [])) == 2:
            raise RuntimeError("injected delivery failure")
        if ev.token_id is not None:
            tokens.setdefault(ev.request_id, []).append(ev.token_id)
        if ev.finished:
            reasons[ev.request_id] = ev.finish_reason

    engine = make_engine(model)
    run(engine, with_bad(prompts), on_event=deliver)
    for rid, (expected, reason) in alone.items():
        assert (tokens[rid], reasons[rid]) == (expected, reason), rid
    assert len(tokens["bad"]) == 2 and "bad" not in reasons
    assert not engine.running and not engine.has_work()  # its sequence was ended, its slot freed


# ---- detokenisation, through the server ----------------------------------------------------------


@pytest.fixture(scope="module")
def server(model):
    srv = build_server(
        "in-memory", Topology("coupled"), ServeOptions(model_name="iso", max_batch=8), model=model
    )
    with LocalServer(srv) as s:
        yield s


def ask(base_url, content, **extra):
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=60)


def test_a_failing_detokenisation_fails_only_its_request(server, monkeypatch):
    questions = [f"question {i} about {'shapes ' * i}" for i in range(6)]
    sequential = [
        ask(server.base_url, q).json()["choices"][0]["message"]["content"] for q in questions
    ]
    push = TextAssembler.push

    def failing_push(self, token):
        if "FAIL-HERE" in self.stop:
            raise RuntimeError("injected detokenisation failure")
        return push(self, token)

    monkeypatch.setattr(TextAssembler, "push", failing_push)
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        bad = pool.submit(ask, server.base_url, "a question that fails", stop=["FAIL-HERE"])
        good = list(pool.map(lambda q: ask(server.base_url, q), questions))
        bad_stream = ask(server.base_url, "another that fails", stop=["FAIL-HERE"], stream=True)
    r = bad.result()
    assert r.status_code == 500 and "detokenisation failed" in r.json()["error"]["message"]
    assert bad_stream.status_code == 200 and "detokenisation failed" in bad_stream.text
    assert bad_stream.text.rstrip().endswith("data: [DONE]")
    assert [g.json()["choices"][0]["message"]["content"] for g in good] == sequential
    deadline = time.monotonic() + 10
    while server.language_server.engine.snapshot().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (
        server.language_server.engine.snapshot().running == 0
    )  # the failed requests' sequences were freed
