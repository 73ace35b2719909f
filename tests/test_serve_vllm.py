"""`tessera serve --language-backend vllm`: Tessera's vision (coupled, or decoupled vision servers;
router and feature cache included) with vLLM running the LLM, behind the same OpenAI API, answers as
Tessera's own engine does. The slow tests need a Python with vLLM in $TESSERA_VLLM_PYTHON; the
default suite checks the clear error
when vLLM is missing."""

import base64
import importlib.util
import io
import os

import numpy as np
import pytest
from PIL import Image

from tessera.cli import main as cli
from tessera.serve.language_server import ServeOptions
from tessera.serve.launch import LocalServer, Topology, build_server
from tessera.serve.vllm_backend import VLLMOptions

PYTHON = os.environ.get("TESSERA_VLLM_PYTHON")
CKPT = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "tiny")
slow_vllm = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON, reason="set TESSERA_VLLM_PYTHON to a Python with vLLM"),
]


def test_missing_vllm_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("TESSERA_VLLM_PYTHON", raising=False)
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment (the default install has none)")
    assert cli(["serve", CKPT, "--language-backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "needs vLLM" in err and "tessera[vllm]" in err and "--vllm-url" in err
    assert (
        cli(["serve", CKPT, "--language-backend", "vllm", "--vllm-python", str(tmp_path / "nope")])
        == 2
    )
    assert (
        cli(["serve", CKPT, "--vllm-url", "http://127.0.0.1:1"]) == 2
    )  # needs --language-backend vllm


def picture(w: int, h: int, seed: int) -> str:
    img = Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def servers():
    """(Tessera's own server, the vllm-backend server that started vLLM, a decoupled one on the same
    vLLM)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    options = ServeOptions(model_name="tiny", max_batch=8, max_len=2048)
    plain = LocalServer(build_server(CKPT, Topology(dtype="float32"), options)).start()
    backed = LocalServer(
        build_server(
            CKPT,
            Topology(dtype="float32", language_backend="vllm"),
            options,
            vllm=VLLMOptions(python=PYTHON, dtype="float32"),
        )
    ).start()
    url = backed.language_server.url
    decoupled = LocalServer(
        build_server(
            CKPT,
            Topology("decoupled", vision_workers=1, dtype="float32", language_backend="vllm"),
            options,
            vllm=VLLMOptions(url=url),
        )
    ).start()
    yield plain, backed, decoupled
    decoupled.stop()
    backed.stop()
    plain.stop()


def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(
        base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=300
    )


def ask(server, content, **extra):
    return client(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        max_tokens=24,
        temperature=0,
        **extra,
    )


@pytest.mark.parametrize("routing", ["full", "router", "question"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_requests_answer_as_tesseras_engine(servers, routing, seed):
    plain, backed, decoupled = servers
    content = [
        {"type": "image_url", "image_url": {"url": picture(150 + 80 * seed, 120, seed)}},
        {
            "type": "text",
            "text": ["What colour is the circle?", "How many shapes?", "Read the label."][seed],
        },
    ]
    want = ask(plain, content, extra_body={"routing": routing})
    for server in (backed, decoupled):
        got = ask(server, content, extra_body={"routing": routing})
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.choices[0].finish_reason == want.choices[0].finish_reason
        assert got.usage.prompt_tokens == want.usage.prompt_tokens
        assert got.usage.completion_tokens == want.usage.completion_tokens
    assert backed.language_server.prompt_mismatches == 0


def test_text_streaming_and_thinking(servers):
    plain, backed, _ = servers
    for thinking in (False, True):
        want = ask(plain, "How many shapes are there?", extra_body={"thinking": thinking})
        stream = ask(
            backed,
            "How many shapes are there?",
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"thinking": thinking},
        )
        text, reasoning, usage = "", "", None
        for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                text += c.delta.content or ""
                reasoning += getattr(c.delta, "reasoning_content", None) or ""
        assert text == want.choices[0].message.content
        assert usage.completion_tokens == want.usage.completion_tokens


def test_n_choices_stop_strings_and_health(servers):
    _, backed, _ = servers
    got = ask(backed, "Describe the image.", n=2, seed=3, extra_body={"temperature": 1.0})
    assert [c.index for c in got.choices] == [0, 1]
    full = ask(backed, "Describe the image.").choices[0].message.content
    if len(full) > 4:
        cut = ask(backed, "Describe the image.", stop=[full[2:4]])
        assert cut.choices[0].message.content == full[:2] and cut.choices[0].finish_reason == "stop"
    import httpx

    health = httpx.get(backed.base_url + "/health").json()
    assert health["status"] == "ok"


for _name in list(globals()):
    if _name.startswith("test_") and _name != "test_missing_vllm_is_a_clear_error":
        for _mark in slow_vllm:
            globals()[_name] = _mark(globals()[_name])
