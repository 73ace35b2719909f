"""OpenAI API conformance through the official `openai` client against a coupled server on 127.0.0.1:
text, image, streaming, usage, n, thinking, cache hits, metrics, and batching equivalence over HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import httpx
import openai
import pytest

from tessera.bench.loadgen import data_url, image_for_tiles, image_message, make_image
from tessera.engine import SamplingParams, TokenEvent, generate
from tessera.serve.detok import TextAssembler
from tessera.serve.language_server import EventPump, ServeOptions
from tessera.serve.launch import LocalServer, Topology, build_server

MODEL = "tiny-test"


@pytest.fixture(scope="module")
def model(lively):
    return lively


@pytest.fixture(scope="module")
def server(model):
    srv = build_server(
        "in-memory", Topology("coupled"), ServeOptions(model_name=MODEL, max_batch=8), model=model
    )
    with LocalServer(srv) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60
    )


def reference(model, prompt_ids, n, features=None):
    """Greedy tokens from the batched generate of one prompt (no engine loop, no server)."""
    tok = model.tokenizer
    greedy = SamplingParams(max_tokens=n, stop_ids=frozenset([tok.im_end_id, tok.pad_id]))
    return generate(model, [list(prompt_ids)], features, greedy).tokens[0]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_text_completion_matches_model_generate(client, model):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count the red circles"}],
        max_tokens=12,
        temperature=0,
    )
    tok = model.tokenizer
    ids = tok.build_prompt("count the red circles")
    expected = reference(model, ids, 12)
    assert tok.decode(expected).strip()
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(expected)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    assert r.usage.total_tokens == len(ids) + len(expected)
    assert r.choices[0].finish_reason == (
        "stop" if expected[-1] in (tok.im_end_id, tok.pad_id) else "length"
    )


def test_image_completion_counts_visual_tokens(client, model):
    cfg = model.config
    url = data_url(image_for_tiles(4, cfg.tile_size, seed=1))  # 2×2 grid + thumbnail = 5 tiles
    r = client.chat.completions.create(
        model=MODEL,
        messages=image_message(url, "what colour is the square"),
        max_tokens=6,
        temperature=0,
    )
    details = r.usage.prompt_tokens_details
    assert details.image_tokens == 5 * cfg.tokens_per_tile
    tok = model.tokenizer
    assert r.usage.prompt_tokens == len(
        tok.build_prompt("what colour is the square", [5 * cfg.tokens_per_tile])
    )


def test_stream_concatenates_to_the_non_streamed_answer_with_usage(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "read the label"}],
        max_tokens=10,
        temperature=0,
    )
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [full.choices[0].finish_reason]
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_n_choices_are_seeded_and_distinct(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "say anything"}],
        max_tokens=8,
        n=3,
        temperature=1.5,
        seed=7,
    )
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [
        c.message.content for c in b.choices
    ]  # seeded
    assert len({c.message.content for c in a.choices}) > 1  # seed + i per choice
    assert a.usage.completion_tokens <= 3 * 8
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    for i in range(3):
        text = "".join(
            c.choices[0].delta.content or ""
            for c in streamed
            if c.choices and c.choices[0].index == i
        )
        assert text == a.choices[i].message.content


def test_thinking_mode_changes_the_prompt(client, model):
    msgs = [{"role": "user", "content": "total"}]
    off = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    on = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=4, temperature=0, extra_body={"thinking": True}
    )
    tok = model.tokenizer
    assert off.usage.prompt_tokens - on.usage.prompt_tokens == len(
        tok.encode("<think>\n</think>\n\n")
    )
    assert hasattr(
        on.choices[0].message, "reasoning_content"
    )  # thinking on: the reasoning field is present
    via_kwargs = client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=4,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    assert via_kwargs.usage.prompt_tokens == on.usage.prompt_tokens


def test_text_assembler_splits_reasoning_and_honours_stop_strings(model):
    tok = model.tokenizer
    ids = tok.encode("<think>\nadd 3 and 4\n</think>\n\nthe answer is 7 circles")
    asm = TextAssembler(tok, thinking=True)
    deltas = [asm.push(i) for i in ids] + [asm.finish()]
    assert "".join(d.reasoning for d in deltas).strip() == "add 3 and 4"
    assert "".join(d.content for d in deltas) == "the answer is 7 circles"
    asm = TextAssembler(tok, thinking=False, stop=["7 c"])
    out = ""
    for i in tok.encode("the answer is 7 circles"):
        d = asm.push(i)
        out += d.content
        if d.stopped:
            break
    assert out == "the answer is " and asm.stopped


def test_second_question_on_the_same_image_hits_the_cache(client, server):
    url = data_url(make_image(150, 150, seed=42))

    def hits():
        text = httpx.get(server.base_url + "/metrics").text
        return int(
            next(
                l.split()[-1]
                for l in text.splitlines()
                if l.startswith("tessera_vision_cache_hits_total")
            )
        )

    before = hits()
    a = client.chat.completions.create(
        model=MODEL, messages=image_message(url, "what colour"), max_tokens=5, temperature=0
    )
    assert hits() == before
    b = client.chat.completions.create(
        model=MODEL, messages=image_message(url, "what colour"), max_tokens=5, temperature=0
    )
    assert hits() == before + 1
    assert a.choices[0].message.content == b.choices[0].message.content
    client.chat.completions.create(
        model=MODEL, messages=image_message(url, "x"), max_tokens=1, extra_body={"max_tiles": 2}
    )
    assert hits() == before + 1  # other tiling settings are another cache entry


def test_concurrent_requests_equal_sequential_ones(client):
    prompts = [f"question number {i} about {'shapes ' * i}" for i in range(8)]

    def ask(p):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": p}],
            max_tokens=6 + len(p) % 5,
            temperature=0,
        )
        return r.choices[0].message.content

    sequential = [ask(p) for p in prompts]
    assert len(set(sequential)) == len(
        prompts
    )  # the model's answers differ, so a mix-up would show
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        concurrent_ = list(pool.map(ask, prompts))
    assert concurrent_ == sequential


def test_health_and_metrics(server):
    h = httpx.get(server.base_url + "/health").json()
    assert h["status"] == "ok" and h["vision"]["mode"] == "coupled"
    text = httpx.get(server.base_url + "/metrics").text
    for name in (
        "tessera_queue_depth",
        "tessera_running_batch",
        "tessera_generation_tokens_per_second",
        "tessera_visual_tokens_saved_total",
        "tessera_vision_cache_hits_total",
        "tessera_time_to_first_token_seconds_count",
    ):
        assert f"\n{name}" in "\n" + text


def test_closing_a_stream_frees_the_sequence(server):
    def running():
        text = httpx.get(server.base_url + "/metrics").text
        return int(
            next(l.split()[-1] for l in text.splitlines() if l.startswith("tessera_running_batch"))
        )

    body = {
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = (
            r.iter_lines()
        )  # kept referenced: dropping a half-read iterator makes httpx close the connection
        for _ in range(6):
            next(lines)
        assert running() == 1
        r.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 0


def test_multi_turn_conversation_renders_in_the_template(model):
    from tessera.serve.prompt import Conversation, render_prompt

    tok = model.tokenizer
    single = Conversation(None, [("user", "what colour", [0])], [None])
    assert render_prompt(tok, single, [16], thinking=False) == tok.build_prompt("what colour", [16])
    conv = Conversation(
        "be brief",
        [
            ("user", "first", [0]),
            ("assistant", "<think>\nhm\n</think>\n\nred", []),
            ("user", "and this one", [1]),
        ],
        [None, None],
    )
    text = tok.decode(render_prompt(tok, conv, [4, 16], thinking=True), skip_special_tokens=False)
    assert text.startswith(
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nImage-1: <img>"
    )
    assert "<|im_start|>assistant\nred<|im_end|>\n" in text  # earlier reasoning is not replayed
    assert (
        "Image-2: <img>"
        + "<IMG_CONTEXT>" * 16
        + "</img>\nand this one<|im_end|>\n<|im_start|>assistant\n"
        in text
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_remote_image_urls_work_when_enabled(client, server):
    """A loopback HTTP server stands in for the web; the feature is off unless the server enables it."""
    import http.server

    png = make_image(120, 90, seed=11)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
    options = server.language_server.options
    try:
        with pytest.raises(openai.BadRequestError, match="remote image URLs are disabled"):
            client.chat.completions.create(
                model=MODEL, messages=image_message(url, "what"), max_tokens=2
            )
        options.allow_remote_images = True
        by_url = client.chat.completions.create(
            model=MODEL, messages=image_message(url, "what"), max_tokens=4, temperature=0
        )
        inline = client.chat.completions.create(
            model=MODEL, messages=image_message(data_url(png), "what"), max_tokens=4, temperature=0
        )
        assert by_url.choices[0].message.content == inline.choices[0].message.content
    finally:
        options.allow_remote_images = False
        httpd.shutdown()


def test_stop_strings_cut_the_answer(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "tell me about shapes"}],
        max_tokens=24,
        temperature=0,
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop.strip()) == 3, full
    cut = client.chat.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(**kwargs, stop=stop, stream=True))
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == full[: full.index(stop)]
    )


def test_event_pump_delivers_a_burst_in_order_with_one_wake_up():
    async def run():
        loop = asyncio.get_running_loop()
        pump, queues = EventPump(loop), [asyncio.Queue(), asyncio.Queue()]
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(callback, *args):
            nonlocal wakeups
            wakeups += callback == pump._drain
            return real(callback, *args)

        loop.call_soon_threadsafe = counting
        burst = [(queues[i % 2], TokenEvent(f"r{i % 2}", i)) for i in range(8)]
        # one decode step's events, pushed from another thread while the loop is busy (here: joining it)
        engine = threading.Thread(target=lambda: [pump.push(q, ev) for q, ev in burst])
        engine.start()
        engine.join()
        got = [[(await q.get()).token_id for _ in range(4)] for q in queues]
        assert got == [[0, 2, 4, 6], [1, 3, 5, 7]] and wakeups == 1
        pump.push(queues[0], TokenEvent("r0", 8))  # the next burst wakes the loop again
        assert (await queues[0].get()).token_id == 8 and wakeups == 2

    asyncio.run(run())
