"""vLLM loads `tessera convert --to hf` folders as written and agrees with Tessera token for token
in float32: from pixels (vLLM's own image processor and ViT on the exported weights) and from
Tessera's features (`image_embeds`); transformers' AutoProcessor (which needs torchvision, present
in the vLLM environment) expands images to Tessera's prompt. Needs a Python with vLLM in
$TESSERA_VLLM_PYTHON (../shared/tools/vllm-cpu-setup.sh
builds one); skipped without it."""

import base64
import io
import json
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import tessera
from tessera.engine import SamplingParams, generate
from tessera.image import ImageProcessor
from tessera.model.checkpoint import convert
from tessera.serve.vllm_backend import VLLMOptions, VLLMProcess, embeds_payload

PYTHON = os.environ.get("TESSERA_VLLM_PYTHON")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON, reason="set TESSERA_VLLM_PYTHON to a Python with vLLM"),
]
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "checkpoints/tiny"
QUESTIONS = [
    "What colour is the circle?",
    "How many shapes are there?",
    "Read the label.",
    "What is left of the square?",
    "Describe the image.",
]


def picture(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def png_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(Tessera's float32 model, the vLLM server of its hf export)."""
    folder = convert(TINY, tmp_path_factory.mktemp("vllm") / "hf", to="hf", drop_flash=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = VLLMProcess(folder, "tiny", 2048, 8, 4, VLLMOptions(python=PYTHON, dtype="float32"))
    proc.start()
    yield tessera.load(TINY, dtype=torch.float32), proc, folder
    proc.stop()


def chat(url: str, content, max_tokens: int = 24) -> tuple[list[int], list[int]]:
    """(vLLM's prompt ids, its greedy completion ids)."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
        "skip_special_tokens": False,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    data = r.json()
    return data["prompt_token_ids"], data["choices"][0]["token_ids"]


def ours(
    model, question: str, images: list[Image.Image], max_tokens: int = 24
) -> tuple[list[int], list[int]]:
    tok = model.tokenizer
    feats, counts = None, []
    if images:
        px = ImageProcessor.from_config(model.config)(images)
        feats, _ = model.encode_images(px.pixel_values)
        counts = [t * model.config.tokens_per_tile for t in px.tiles_per_image]
    ids = tok.build_prompt(question, counts)
    stop = frozenset({tok.im_end_id, tok.pad_id})
    out = generate(
        model, [ids], feats, SamplingParams(max_tokens=max_tokens, stop_ids=stop)
    ).tokens[0]
    return ids, out


def strip_stop(ids: list[int], model) -> list[int]:
    stop = {model.tokenizer.im_end_id, model.tokenizer.pad_id}
    return ids[:-1] if ids and ids[-1] in stop else ids


@pytest.mark.parametrize("q", range(len(QUESTIONS)))
def test_vllm_from_pixels_equals_tessera(served, q):
    model, proc, _ = served
    img = picture(120 + 90 * q, 100 + 40 * (q % 3), q)
    prompt, got = chat(
        proc.url,
        [
            {"type": "image_url", "image_url": {"url": png_url(img)}},
            {"type": "text", "text": QUESTIONS[q]},
        ],
    )
    ids, want = ours(model, QUESTIONS[q], [img])
    assert prompt == ids
    assert strip_stop(got, model) == strip_stop(want, model)


@pytest.mark.parametrize("q", range(len(QUESTIONS)))
def test_vllm_from_tessera_features_equals_tessera(served, q):
    model, proc, _ = served
    img = picture(300 - 40 * q, 120 + 60 * q, 10 + q)
    px = ImageProcessor.from_config(model.config)([img])
    feats, _ = model.encode_images(px.pixel_values)
    prompt, got = chat(
        proc.url,
        [
            {"type": "image_embeds", "image_embeds": embeds_payload(feats)},
            {"type": "text", "text": QUESTIONS[q]},
        ],
    )
    ids, want = ours(model, QUESTIONS[q], [img])
    assert prompt == ids
    assert strip_stop(got, model) == strip_stop(want, model)


def test_vllm_text_only_equals_tessera(served):
    model, proc, _ = served
    for q in QUESTIONS:
        prompt, got = chat(proc.url, q)
        ids, want = ours(model, q, [])
        assert prompt == ids and strip_stop(got, model) == strip_stop(want, model)


def test_auto_processor_in_the_vllm_environment_expands_to_our_prompt(served, tmp_path):
    model, _, folder = served
    images = [picture(300, 100, 0), picture(112, 112, 1)]
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    script = (
        "import json, sys; from PIL import Image; from transformers import AutoProcessor\n"
        "folder, paths = sys.argv[1], sys.argv[2:]\n"
        "proc = AutoProcessor.from_pretrained(folder)\n"
        "parts = [{'type': 'image'}, {'type': 'image'}, {'type': 'text', 'text': 'Compare.'}]\n"
        "msgs = [{'role': 'user', 'content': parts}]\n"
        "text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)\n"
        "out = proc(images=[Image.open(p) for p in paths], text=[text], return_tensors='pt')\n"
        "ids, pixels = out['input_ids'][0].tolist(), out['pixel_values'].shape[0]\n"
        "print(json.dumps({'ids': ids, 'pixels': pixels}))\n"
    )
    run = subprocess.run(
        [PYTHON, "-c", script, str(folder), *paths], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    px = ImageProcessor.from_config(model.config)(images)
    counts = [t * model.config.tokens_per_tile for t in px.tiles_per_image]
    tok = model.tokenizer
    assert got["pixels"] == sum(px.tiles_per_image)
    assert got["ids"] == tok.encode(tok.render([("user", "Compare.", [0, 1])], counts, False))


def test_vllm_reads_the_official_export_with_our_configuration_module(tmp_path):
    """`--to official` through trust_remote_code: our InternVLChatConfig, vLLM's InternVLChatModel
    and the `<image>` template."""
    model = tessera.load(ROOT / "checkpoints/tiny-sft", dtype=torch.float32)
    folder = convert(ROOT / "checkpoints/tiny-sft", tmp_path / "official", to="official")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    options = VLLMOptions(python=PYTHON, dtype="float32", extra_args=["--trust-remote-code"])
    proc = VLLMProcess(folder, "tiny", 2048, 4, 2, options)
    proc.start()
    try:
        for q in range(3):
            img = picture(300, 100 + 50 * q, 20 + q)
            url = {"url": png_url(img)}
            content = [
                {"type": "image_url", "image_url": url},
                {"type": "text", "text": QUESTIONS[q]},
            ]
            prompt, got = chat(proc.url, content)
            ids, want = ours(model, QUESTIONS[q], [img])
            assert prompt == ids
            assert strip_stop(got, model) == strip_stop(want, model)
    finally:
        proc.stop()
