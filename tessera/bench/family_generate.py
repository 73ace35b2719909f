"""`tessera bench family_generate`: tiny Qwen3-MoE and GPT-OSS decoders, our engine vs transformers' `generate`.

For each architecture a random tiny decoder is built (weights drawn wider than init, routers scaled up, so greedy
text changes from token to token and expert choices are decisive), written in transformers' layout and loaded
as `Qwen3MoeForCausalLM` / `GptOssForCausalLM` (float32 on both sides). Both decode the same equal-length
prompts greedily to exactly `--new-tokens` tokens; reported per batch size: generated tokens per second of wall
time (prefill included) and whether every row's ids are identical. Rounds alternate sides; the median is kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tessera.config import LanguageConfig, RopeScaling
from tessera.engine import Engine, GenerationRequest, SamplingParams
from tessera.model.layouts import _ARCH_NAMES, _qwen3_dict, _rope_dict
from tessera.model.llm import Qwen3ForCausalLM


def tiny_language(arch: str) -> LanguageConfig:
    common = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    if arch == "qwen3_moe":
        return LanguageConfig(
            **common,
            rope_theta=10_000.0,
            architecture="qwen3_moe",
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=64,
            norm_topk_prob=True,
        )
    return LanguageConfig(
        **common,
        rope_theta=150_000.0,
        rms_norm_eps=1e-5,
        architecture="gpt_oss",
        rope_scaling=RopeScaling(
            rope_type="yarn", factor=32.0, original_max_position_embeddings=64, truncate=False
        ),
        num_experts=8,
        num_experts_per_tok=2,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )


def build(arch: str, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    llm = Qwen3ForCausalLM(tiny_language(arch)).eval()
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.mul_(10)
    return llm


def to_transformers(llm: Qwen3ForCausalLM, folder: Path):
    import transformers

    lang = llm.config
    raw = {
        "architectures": [_ARCH_NAMES[lang.architecture]],
        **_qwen3_dict(lang),
        "rope_parameters": _rope_dict(lang),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous() for k, v in llm.state_dict().items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(json.dumps(raw))
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ours(engine: Engine, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    out: dict[str, list[int]] = {str(i): [] for i in range(prompts.shape[0])}
    for i in range(prompts.shape[0]):
        engine.submit(
            GenerationRequest(
                str(i),
                prompts[i].tolist(),
                SamplingParams(max_tokens=new_tokens),
                lambda ev: ev.token_id is not None and out[ev.request_id].append(ev.token_id),
            )
        )
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
    return time.perf_counter() - start, [out[str(i)] for i in range(prompts.shape[0])]


@torch.inference_mode()
def theirs(hf, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = hf.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return time.perf_counter() - start, out[:, prompts.shape[1] :].tolist()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archs", default="qwen3_moe,gpt_oss")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            llm = build(arch, seed=0)
            hf = to_transformers(llm, Path(tmp) / arch)
            for b in (int(x) for x in args.batches.split(",")):
                prompts = torch.randint(
                    0, 512, (b, args.prompt_len), generator=torch.Generator().manual_seed(b)
                )
                engine = Engine(llm, max_batch=b, max_len=args.prompt_len + args.new_tokens + 1)
                t_ours, t_theirs, same = [], [], True
                for _ in range(args.rounds):
                    t, a = ours(engine, prompts, args.new_tokens)
                    t_ours.append(t)
                    t, h = theirs(hf, prompts, args.new_tokens)
                    t_theirs.append(t)
                    same = same and a == h
                tokens = b * args.new_tokens
                rows.append(
                    {
                        "arch": arch,
                        "batch": b,
                        "ours_tok_s": round(tokens / statistics.median(t_ours), 1),
                        "transformers_tok_s": round(tokens / statistics.median(t_theirs), 1),
                        "greedy_identical": same,
                    }
                )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            f"{'arch':<10} {'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'greedy identical':>17}"
        )
        for r in rows:
            print(
                f"{r['arch']:<10} {r['batch']:>5} {r['ours_tok_s']:>11} {r['transformers_tok_s']:>19} "
                f"{r['greedy_identical']!s:>17}"
            )
    return 0 if all(r["greedy_identical"] for r in rows) else 1
