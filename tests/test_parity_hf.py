"""Parity with transformers: a random tiny model exported with `convert --to hf` and loaded by
`transformers.InternVLForConditionalGeneration.from_pretrained` gives the same logits (fp32) and the same
greedy continuation. Covers both ViT variants, GQA, tied/untied heads, one- and multi-tile images."""

import pytest
import torch
from conftest import unit_config

from tessera.config import ModelConfig
from tessera.engine import SamplingParams, generate
from tessera.model.checkpoint import convert, save_checkpoint
from tessera.model.vlm import VisionLanguageModel

transformers = pytest.importorskip("transformers")

IMG = 3
TOL = 1e-4


def tiny_config(rms: bool, tied: bool, select_layer: int) -> ModelConfig:
    return unit_config(rms=rms, tied=tied, vit_layers=3, select_layer=select_layer)


CASES = {
    "300M-layernorm-untied": (False, False, -1),
    "6B-rmsnorm-qknorm-tied": (True, True, -1),
    "300M-layernorm-tied-select-layer-2": (False, True, -2),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    ours = VisionLanguageModel(tiny_config(*CASES[request.param]))
    with torch.no_grad():  # move norms and layer scales off their init so every tensor matters
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    root = tmp_path_factory.mktemp(request.param)
    save_checkpoint(ours, root / "tessera")
    convert(root / "tessera", root / "hf", to="hf")
    theirs = transformers.InternVLForConditionalGeneration.from_pretrained(
        root / "hf", dtype=torch.float32
    )
    return request.param, ours.eval(), theirs.eval()


def image_prompt(tiles: int, tokens_per_tile: int) -> torch.Tensor:
    text_before, text_after = [1, 40, 41, 4], [5, 50, 51, 52, 53, 2, 1, 60, 61]
    return torch.tensor([text_before + [IMG] * (tiles * tokens_per_tile) + text_after])


@pytest.mark.parametrize("tiles", [1, 5], ids=["1-tile", "4-tiles+thumbnail"])
def test_logits_match_transformers(pair, tiles):
    name, ours, theirs = pair
    torch.manual_seed(tiles)
    pixel_values = torch.randn(tiles, 3, 56, 56)
    ids = image_prompt(tiles, ours.config.tokens_per_tile)
    with torch.no_grad():
        a = ours(ids, pixel_values=pixel_values)
        b = theirs(input_ids=ids, pixel_values=pixel_values).logits
        blank = ours(ids, pixel_values=torch.zeros_like(pixel_values))
    diff = (a - b).abs().max().item()
    print(f"\nparity {name} {tiles} tile(s): max |logits ours - transformers| = {diff:.3g}")
    assert a.shape == b.shape == (1, ids.shape[1], 96)
    assert diff <= TOL
    assert (a - blank).abs().max().item() > 1e-3  # the image really reaches the logits


def test_greedy_generation_matches_transformers(pair):
    _, ours, theirs = pair
    torch.manual_seed(1)
    pixel_values = torch.randn(3, 3, 56, 56)
    ids = image_prompt(3, ours.config.tokens_per_tile)
    features, _ = ours.encode_images(pixel_values)
    mine = generate(ours, [ids[0].tolist()], features, SamplingParams(max_tokens=10)).tokens[0]
    with torch.no_grad():
        out = theirs.generate(
            input_ids=ids,
            pixel_values=pixel_values,
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )
    assert mine == out[0, ids.shape[1] :].tolist()
