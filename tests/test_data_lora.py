"""LoRA with peft: only adapters train, the merged model's logits equal the adapter model's, merge
writes any
layout, and `train sft --data --lora` runs end to end (adapter beside the run, merged final/)."""

import copy
import json

import pytest
import torch

import tessera
from tessera.cli import main
from tessera.model.checkpoint import save_checkpoint
from tessera.train.lora import (
    LoraOptions,
    apply_lora,
    is_lora_param,
    load_adapter,
    lora_share,
    merge_into,
    save_adapter,
)


def _inputs(model):
    torch.manual_seed(0)
    ids = torch.randint(20, 200, (2, 12))
    return ids, torch.arange(12).expand(2, 12)


def _perturb(model):
    with (
        torch.no_grad()
    ):  # peft starts B at zero (adapter = identity); make the adapters do something
        for name, p in model.named_parameters():
            if is_lora_param(name):
                p.normal_(0, 0.05)


def _perturb_trained_copies(model):
    with torch.no_grad():  # a train module's copy starts equal to its original: move it
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.05)


# a conv + the position table, the ViT's first norms, the connector's LayerNorm
FULL = ("vision_model.embeddings", "norm1", "mlp1.0")


@pytest.mark.parametrize(
    "components,train_modules",
    [
        (("language",), ()),
        (("language", "vision", "connector"), ()),
        (("language", "vision", "connector"), FULL),
    ],
)
def test_merged_logits_equal_the_adapter_model(tiny, components, train_modules):
    model = copy.deepcopy(tiny).float()
    options = LoraOptions(rank=4, alpha=8, components=components, train_modules=train_modules)
    names = apply_lora(model, options)
    if train_modules:
        trained = {
            n.split(".modules_to_save.")[0]
            for n, p in model.named_parameters()
            if is_lora_param(n) and ".modules_to_save." in n
        }
        assert "vision_model.embeddings" in trained and "mlp1.0" in trained
        assert "vision_model.encoder.layers.5.norm1" in trained
        assert all(p.requires_grad == is_lora_param(n) for n, p in model.named_parameters())
        _perturb_trained_copies(model)
    assert all(n.startswith(("language_model", "vision_model", "mlp1", "mlp2")) for n in names)
    assert any(n.startswith("vision_model") for n in names) == ("vision" in components)
    _perturb(model)
    pixels = torch.rand(2, 3, 112, 112)
    ids, pos = _inputs(model)
    with torch.no_grad():
        lora_logits = model(ids, position_ids=pos)
        lora_vision = model.encode_images(pixels)[0]
        merge_into(model)
        assert not any(is_lora_param(n) for n, _ in model.named_parameters())
        assert set(model.state_dict()) == set(tiny.state_dict())  # a plain model again
        assert torch.allclose(model(ids, position_ids=pos), lora_logits, atol=1e-5)
        assert torch.allclose(model.encode_images(pixels)[0], lora_vision, atol=1e-5)
    base = copy.deepcopy(tiny).float()
    with torch.no_grad():
        assert not torch.allclose(
            base(ids, position_ids=pos), lora_logits, atol=1e-3
        )  # the adapter mattered


def test_adapter_round_trip_and_merge_command_layouts(tiny, tmp_path):
    base_dir = save_checkpoint(copy.deepcopy(tiny).float(), tmp_path / "base")
    model = tessera.load(base_dir).float()
    options = LoraOptions(rank=4, alpha=16)
    apply_lora(model, options)
    _perturb(model)
    lora, total = lora_share(model)
    assert 0 < lora < 0.1 * total
    run = tmp_path / "run"
    save_adapter(model, run / "adapter", options, str(base_dir))
    ids, pos = _inputs(model)
    with torch.no_grad():
        want = model(ids, position_ids=pos)
    again = tessera.load(base_dir).float()
    load_adapter(again, run / "adapter")
    with torch.no_grad():
        assert torch.allclose(again(ids, position_ids=pos), want, atol=1e-6)
    for layout in ("tessera", "hf"):
        assert main(["merge", str(run), "--out", str(tmp_path / layout), "--layout", layout]) == 0
        merged = tessera.load(tmp_path / layout)
        with torch.no_grad():
            assert torch.allclose(merged.float()(ids, position_ids=pos), want, atol=1e-5)


def test_train_modules_round_trip_through_the_adapter_and_merge(tiny, tmp_path):
    base_dir = save_checkpoint(copy.deepcopy(tiny).float(), tmp_path / "base")
    model = tessera.load(base_dir).float()
    options = LoraOptions(
        rank=4, alpha=8, components=("language", "vision"), train_modules=FULL, rslora=True
    )
    apply_lora(model, options)
    _perturb(model)
    _perturb_trained_copies(model)
    save_adapter(model, tmp_path / "run" / "adapter", options, str(base_dir))
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert "vision_model.embeddings" in config["train_modules"] and config["options"]["rslora"]
    pixels = torch.rand(1, 3, 112, 112)
    ids, pos = _inputs(model)
    with torch.no_grad():
        want, want_vision = model(ids, position_ids=pos), model.encode_images(pixels)[0]
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    merged = tessera.load(tmp_path / "merged").float()
    base = tessera.load(base_dir).float()
    with torch.no_grad():
        assert torch.allclose(merged(ids, position_ids=pos), want, atol=1e-5)
        assert torch.allclose(merged.encode_images(pixels)[0], want_vision, atol=1e-5)
        moved = merged.vision_model.embeddings.position_embedding
        assert not torch.allclose(moved, base.vision_model.embeddings.position_embedding)


@pytest.mark.parametrize(
    "train_modules,message",
    [
        (("no_such_module",), "matches no module"),
        (("vision_model.encoder.layers.0",), "holds LoRA target"),
        (("embed_tokens",), "tied"),
    ],
)
def test_bad_train_modules_fail_clearly(tiny, train_modules, message):
    model = copy.deepcopy(tiny).float()
    options = LoraOptions(components=("language", "vision"), train_modules=train_modules)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, options)


def test_merge_command_without_adapter_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="trained with --lora"):
        main(["merge", str(tmp_path), "--out", str(tmp_path / "x")])


def test_train_sft_data_lora_end_to_end(tiny, tmp_path, write_dataset, capsys):
    base_dir = save_checkpoint(copy.deepcopy(tiny).float(), tmp_path / "base")
    data = write_dataset(tmp_path / "ds", 6)
    out = tmp_path / "run"
    args = [
        "train",
        "sft",
        "--init",
        str(base_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--rows",
        "2",
        "--row-tokens",
        "256",
        "--no-progress",
        "--lora",
        "--lora-rank",
        "4",
        "--precision",
        "fp32",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "LoRA rank 4 on language" in text and "(LoRA merged; adapter in" in text
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base"] == str(base_dir.resolve()) and adapter["options"]["rank"] == 4
    trained = tessera.load(out / "final")  # the merged model loads like any checkpoint
    base = tessera.load(base_dir)
    changed = [
        n
        for n, p in trained.state_dict().items()
        if not torch.equal(p.float(), base.state_dict()[n].float())
    ]
    assert changed and all(
        n.startswith("language_model") for n in changed
    )  # only the adapted layers moved
    assert all(any(t in n for t in ("proj",)) for n in changed)
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    again = tessera.load(tmp_path / "merged")
    for n, p in again.state_dict().items():
        assert torch.allclose(p.float(), trained.state_dict()[n].float(), atol=1e-6), n


def test_train_sft_lora_train_modules_train_in_full(tiny, tmp_path, write_dataset, capsys):
    base_dir = save_checkpoint(copy.deepcopy(tiny).float(), tmp_path / "base")
    data = write_dataset(tmp_path / "ds", 6)
    out = tmp_path / "run"
    args = [
        "train",
        "sft",
        "--init",
        str(base_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--rows",
        "2",
        "--row-tokens",
        "256",
        "--no-progress",
        "--precision",
        "fp32",
        "--lora",
        "--lora-rank",
        "4",
        "--lora-rslora",
        "--lora-train-modules",
        "mlp1.0,norm",
    ]
    assert main(args) == 0
    assert "LoRA rank 4 on language + mlp1.0, norm in full" in capsys.readouterr().out
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["train_modules"] == ["language_model.model.norm", "mlp1.0"]
    trained, base = tessera.load(out / "final"), tessera.load(base_dir)
    changed = {
        n
        for n, p in trained.state_dict().items()
        if not torch.equal(p.float(), base.state_dict()[n].float())
    }
    assert {"mlp1.0.weight", "language_model.model.norm.weight"} <= changed  # trained in full
    assert all(n.startswith("language_model") or n.startswith("mlp1.0") for n in changed)
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    again = tessera.load(tmp_path / "merged")
    for n, p in again.state_dict().items():
        assert torch.allclose(p.float(), trained.state_dict()[n].float(), atol=1e-6), n


def test_a_lora_run_resumes_from_its_checkpoint(tiny, tmp_path, write_dataset, capsys):
    base_dir = save_checkpoint(copy.deepcopy(tiny).float(), tmp_path / "base")
    data = write_dataset(tmp_path / "ds", 6)
    out = tmp_path / "run"
    args = [
        "train",
        "sft",
        "--init",
        str(base_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--rows",
        "2",
        "--row-tokens",
        "256",
        "--no-progress",
        "--lora",
        "--lora-rank",
        "4",
        "--precision",
        "fp32",
    ]
    assert main(args + ["--steps", "1"]) == 0
    assert (out / "checkpoints" / "step-000001" / "adapter" / "adapter_config.json").exists()
    assert main(args + ["--steps", "2"]) == 0  # picks up step 1's adapters and optimiser state
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert "sft: step 2" in capsys.readouterr().out


@pytest.mark.slow
def test_two_process_training_on_a_file_with_lora(tiny, tmp_path, write_dataset):
    """Under torchrun (2 processes, gloo) the file's records are split over the ranks and the LoRA run ends
    with its adapter and merged model like a single process's."""
    import os
    import subprocess
    import sys

    base_dir = save_checkpoint(copy.deepcopy(tiny).float(), tmp_path / "base")
    data = write_dataset(tmp_path / "ds", 12)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29541",
    ]
    out = tmp_path / "run"
    done = subprocess.run(
        torchrun
        + [
            "-m",
            "tessera.cli",
            "train",
            "sft",
            "--init",
            str(base_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "2",
            "--rows",
            "1",
            "--row-tokens",
            "128",
            "--no-progress",
            "--lora",
            "--lora-rank",
            "4",
            "--precision",
            "fp32",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter" / "adapter_config.json").exists()
    assert tessera.load(out / "final") is not None
    positions = [
        json.loads(line)["position"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert positions[-1] >= 2  # each rank read its own share of the records


def test_lora_plus_gives_the_b_matrices_a_larger_learning_rate(tiny):
    from tessera.train.lora import lr_scale
    from tessera.train.trainer import TrainConfig, build_optimizer

    model = copy.deepcopy(tiny).float()
    options = LoraOptions(rank=4, plus_ratio=16.0)
    apply_lora(model, options)
    optimizer = build_optimizer(
        model, TrainConfig(lr=1e-3), {"param_filter": is_lora_param, "lr_scale": lr_scale(options)}
    )
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    b_lrs = [lr_of[id(p)] for n, p in named.items() if ".lora_B." in n]
    a_lrs = [lr_of[id(p)] for n, p in named.items() if ".lora_A." in n]
    assert b_lrs and a_lrs
    assert b_lrs == pytest.approx([1.6e-2] * len(b_lrs)) and a_lrs == pytest.approx(
        [1e-3] * len(a_lrs)
    )
    assert lr_scale(LoraOptions()) is None  # ratio 1: plain LoRA
    with pytest.raises(ValueError, match="plus ratio"):
        LoraOptions(plus_ratio=0)
