"""`tessera bench engine`: our engine's generation throughput vs transformers' `generate`, same model, same prompts.

The model is exported to the transformers layout with `tessera.model.checkpoint.convert` and loaded as
`transformers.InternVLForConditionalGeneration` (float32 on both sides). Both sides decode the same prompts
greedily to exactly `--new-tokens` tokens (no stop token). Reported per batch size: generated tokens per
second of wall time (prefill included, both sides), and our decode-only rate (steps after the first). Rounds
alternate between the two sides and the median is kept. At batch 1 the token ids must be identical.
Without `--checkpoint` a random model of `--preset` (tiny by default) is used, its language weights drawn at std 0.1 (instead of 0.02)
so that greedy text changes from token to token and the identity check means something.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import tessera
from tessera.bench.docs import machine, replace_section
from tessera.engine import Engine, GenerationRequest, SamplingParams
from tessera.model.checkpoint import convert, save_checkpoint
from tessera.model.init import init_lively_model

MODES = {
    "eager": (False, torch.float32),
    "compiled": (True, torch.float32),
    "eager-bf16": (False, torch.bfloat16),
    "compiled-bf16": (True, torch.bfloat16),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model to use (default: a random model of --preset)")
    p.add_argument(
        "--preset",
        default="tiny",
        help="without --checkpoint: the random model's preset "
        "(e.g. internvl3_5-1b for the 1B shape)",
    )
    p.add_argument("--batches", default="1,16", help="batch sizes (comma-separated)")
    p.add_argument(
        "--modes", default="eager,compiled", help=f"our engine's modes to time: {', '.join(MODES)}"
    )
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--parity-prompts",
        type=int,
        default=4,
        help="batch-1 prompts checked for identical greedy ids",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--docs", help="markdown file whose '## Engine' section is replaced with the result"
    )


def make_engine(model, mode: str, batch: int, max_len: int):
    """An engine over the model's language side; bf16 modes run a bfloat16 copy of it."""
    compile, dtype = MODES[mode]
    llm = (
        model.language_model
        if dtype == torch.float32
        else copy.deepcopy(model.language_model).to(dtype)
    )
    return Engine(
        llm, max_batch=max(batch, 1), max_len=max_len, embed_fn=model.embed, compile=compile
    )


def ours(
    engine, prompts: torch.Tensor, new_tokens: int
) -> tuple[float, float, float, list[list[int]]]:
    """(wall seconds, decode-only seconds, CPU seconds of this thread, tokens per prompt) through an idle
    continuous-batching engine, run until it drains."""
    if engine.has_work():
        raise RuntimeError("the engine must be idle between runs")
    B = prompts.shape[0]
    out: dict[str, list[int]] = {str(i): [] for i in range(B)}
    for i in range(B):
        engine.submit(
            GenerationRequest(
                str(i),
                prompts[i].tolist(),
                SamplingParams(max_tokens=new_tokens),
                lambda ev: ev.token_id is not None and out[ev.request_id].append(ev.token_id),
            )
        )
    cpu, start = time.thread_time(), time.perf_counter()
    engine.step()  # prefill (+ the first decode step)
    after_first = time.perf_counter()
    while engine.has_work():
        engine.step()
    end = time.perf_counter()
    return end - start, end - after_first, time.thread_time() - cpu, [out[str(i)] for i in range(B)]


def theirs(hf, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, CPU seconds of this thread, tokens per prompt) through transformers' generate."""
    cpu, start = time.thread_time(), time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return (
        time.perf_counter() - start,
        time.thread_time() - cpu,
        out[:, prompts.shape[1] :].tolist(),
    )


def run(args: argparse.Namespace) -> int:
    import transformers

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    model = (
        tessera.load(args.checkpoint, dtype=torch.float32)
        if args.checkpoint
        else init_lively_model(args.preset)
    )
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, Path(tmp) / "tessera")
        convert(Path(tmp) / "tessera", Path(tmp) / "hf", to="hf")
        hf = transformers.InternVLForConditionalGeneration.from_pretrained(
            Path(tmp) / "hf", dtype=torch.float32
        ).eval()
    hf.generation_config.eos_token_id = None  # both sides run to exactly --new-tokens
    vocab = (
        model.tokenizer.vocab_size
        if model.tokenizer is not None
        else model.config.language.vocab_size
    )
    g = torch.Generator().manual_seed(0)
    low = 16  # above the special tokens
    batches = [int(b) for b in args.batches.split(",")]
    prompts = torch.randint(
        low, vocab, (max(max(batches), args.parity_prompts), args.prompt_len), generator=g
    )
    max_len = args.prompt_len + args.new_tokens + 1
    engines: dict[tuple[str, int], object] = {}
    compile_s: dict[str, float] = {}

    def engine(mode: str, B: int):
        """One engine per (mode, batch), reused across runs; the first run of a compiled one builds its graph."""
        if (mode, B) not in engines:
            engines[mode, B] = make_engine(model, mode, B, max_len)
            t = time.perf_counter()
            ours(
                engines[mode, B], prompts[:B], 4
            )  # warm-up (compiles the batch's bucket when compiled)
            compile_s[f"{mode} batch {B}"] = round(time.perf_counter() - t, 1)
        return engines[mode, B]

    parity = dict.fromkeys(modes, 0)
    for i in range(args.parity_prompts):
        p = prompts[i : i + 1]
        ref = theirs(hf, p, args.new_tokens)[2]
        for m in modes:
            parity[m] += int(ours(engine(m, 1), p, args.new_tokens)[3] == ref)
    rows = []
    for B in batches:
        p = prompts[:B]
        theirs(hf, p, 4)  # warm-up
        for m in modes:
            engine(m, B)
        t_wall, t_cpu = [], []
        o_wall: dict[str, list[float]] = {m: [] for m in modes}
        o_decode: dict[str, list[float]] = {m: [] for m in modes}
        o_cpu: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.rounds):
            sides = ["transformers"] + modes
            for side in sides[r % len(sides) :] + sides[: r % len(sides)]:  # rotate who goes first
                if side == "transformers":
                    w, c, _ = theirs(hf, p, args.new_tokens)
                    t_wall.append(w)
                    t_cpu.append(c)
                else:
                    w, d, c, _ = ours(engine(side, B), p, args.new_tokens)
                    o_wall[side].append(w)
                    o_decode[side].append(d)
                    o_cpu[side].append(c)
        n = B * args.new_tokens
        row = {
            "batch": B,
            "transformers_tok_s": n / statistics.median(t_wall),
            "transformers_cpu_ms": 1e3 * statistics.median(t_cpu) / args.new_tokens,
        }
        for m in modes:
            row[f"{m}_tok_s"] = n / statistics.median(o_wall[m])
            row[f"{m}_x"] = row[f"{m}_tok_s"] / row["transformers_tok_s"]
            row[f"{m}_decode_tok_s"] = B * (args.new_tokens - 1) / statistics.median(o_decode[m])
            row[f"{m}_cpu_ms"] = 1e3 * statistics.median(o_cpu[m]) / args.new_tokens
            row[f"{m}_cpu_x"] = statistics.median(t_cpu) / statistics.median(o_cpu[m])
        rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        print(f"batch {B}: {rows[-1]}", file=sys.stderr)
    omp = (
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
        if "OMP_NUM_THREADS" in os.environ
        else ""
    )
    command = (
        f"{omp}tessera bench engine --batches {args.batches} --modes {args.modes} --rounds {args.rounds} "
        f"--prompt-len {args.prompt_len} --new-tokens {args.new_tokens} --parity-prompts {args.parity_prompts} "
        f"--threads {args.threads}"
        + (f" --checkpoint {args.checkpoint}" if args.checkpoint else f" --preset {args.preset}")
    )
    result = {
        "command": command,
        "settings": {
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "threads": args.threads,
            "modes": modes,
            "warmup_s": compile_s,
            "model": args.checkpoint or f"random {args.preset} (language weights std 0.1)",
        },
        "parity": {"prompts": args.parity_prompts, "identical": parity},
        "rows": rows,
    }
    text = markdown(result)
    if args.docs:
        replace_section(
            Path(args.docs),
            "## Engine",
            text + f"\n\nMachine: {machine()}, transformers {transformers.__version__}; "
            f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after the run.",
        )
    print(json.dumps(result, indent=2) if args.json else text)
    fp32 = [m for m in modes if MODES[m][1] == torch.float32]
    return 0 if all(parity[m] == args.parity_prompts for m in fp32) else 1


def markdown(r: dict) -> str:
    s = r["settings"]
    modes = s["modes"]
    lines = [
        "`tessera bench engine` (tessera/bench/engine.py): our continuous-batching engine (tessera/engine/) against "
        "`transformers.InternVLForConditionalGeneration.generate` on the same model exported with "
        f'`tessera.model.checkpoint.convert(..., to="hf")`, transformers in float32, {s["threads"]} torch thread(s), '
        f"prompts of {s['prompt_len']} tokens, exactly {s['new_tokens']} greedy new tokens, median of {s['rounds']} "
        f"rounds in which transformers and each of our modes ({', '.join(modes)}) take turns, the order rotating. "
        f"Model: {s['model']}. tokens/s = generated tokens / wall time, prefill included on both sides; "
        "decode-only = our steps after the first; × = wall-time speed-up over transformers; CPU ms / step = CPU "
        "time of the generating thread divided by the number of new tokens per sequence (one step = one token for "
        "every sequence of the batch, prefill included; far less sensitive than wall time to other jobs on a shared "
        "machine, which still slow it through shared caches), × CPU = "
        "the speed-up in those terms. "
        "Our modes: `eager` = `Engine(...)` (the default), `compiled` = `Engine(..., compile=True)`; a `-bf16` "
        "suffix runs a bfloat16 copy of the language model.",
        "",
        f"Command: `{r['command']}` (add `--docs docs/BENCHMARKS.md` to rewrite this section).",
        "",
        "| batch | side | tok/s | × transformers | CPU ms / step | × CPU | decode-only tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['batch']} | transformers | {row['transformers_tok_s']:.0f} | 1.00 "
            f"| {row['transformers_cpu_ms']:.2f} | 1.00 | |"
        )
        for m in modes:
            lines.append(
                f"| {row['batch']} | {m} | {row[f'{m}_tok_s']:.0f} | {row[f'{m}_x']:.2f} | {row[f'{m}_cpu_ms']:.2f} "
                f"| {row[f'{m}_cpu_x']:.2f} | {row[f'{m}_decode_tok_s']:.0f} |"
            )
    p = r["parity"]
    lines += [
        "",
        f"Greedy token ids identical to transformers at batch 1 ({p['prompts']} prompts × {s['new_tokens']} "
        "tokens): "
        + ", ".join(f"{m} {n} / {p['prompts']}" for m, n in p["identical"].items())
        + ".",
        "Warm-up (first 4-token run of each engine; includes building the compiled graph): "
        + ", ".join(f"{k} {v} s" for k, v in s["warmup_s"].items())
        + ".",
    ]
    big = max(r["rows"], key=lambda row: row["batch"])
    exact = [m for m in modes if MODES[m][1] == torch.float32 and p["identical"][m] == p["prompts"]]
    if exact:
        best = max(exact, key=lambda m: big[f"{m}_cpu_x"])
        met = big[f"{best}_x"] >= 3 and big[f"{best}_cpu_x"] >= 3
        lines.append(
            f"Target ≥ 3× transformers at batch {big['batch']} with identical greedy ids: best float32 mode "
            f"`{best}` measured {big[f'{best}_x']:.2f}× in wall time, {big[f'{best}_cpu_x']:.2f}× in CPU time → "
            f"{'met' if met else '**not met**'}."
        )
    lines += ["", notes(big)]
    return "\n".join(lines)


FLOOR_MS = (
    0.94 + 0.3 + 0.33
)  # float32 GEMMs + attention at bandwidth + prefill share, per step at batch 16 (see notes)


def notes(big: dict) -> str:
    """The analysis under the table; the bound it states is computed from this run's transformers CPU time."""
    bound = big["transformers_cpu_ms"] / FLOOR_MS
    verdict = (
        "So 3× lies beyond even an engine with no per-step overhead at all."
        if bound < 3
        else "Reaching 3× means removing nearly all of the remaining per-step overhead, which none of the measured "
        "alternatives did."
    )
    return NOTES.format(
        hf_cpu=big["transformers_cpu_ms"], batch=big["batch"], bound=bound, verdict=verdict
    )


NOTES = """Where the time goes (CPU time of one thread at batch 16, measured separately from the table with
torch.profiler and `time.thread_time` on this machine; the numbers move with its load). Our `eager` decode step
is ≈ 3.6–3.9 ms: the 29 projection GEMMs (M = 16 rows) take ≈ 1.3 ms through unpacked MKL sgemm, attention
over the cached keys ≈ 0.5 ms, and the rest is the per-call cost of a few hundred small operators (RMSNorms,
RoPE, SwiGLU, residuals), which no engine-side change removes. `compiled` traces the same layer code with
inductor: weights frozen and prepacked, q/k/v and gate/up concatenated (17 GEMMs, ≈ 0.94 ms at ≈ 117 GFLOP/s,
the core's float32 peak measured on a 512³ matmul), the element-wise chains fused into a dozen C++ loops driven
from C++ (`cpp_wrapper`). A step is then ≈ 1.8–1.9 ms: attention ≈ 0.45 ms (SDPA's flash kernel at S ≈ 100,
near the L3 bandwidth left to us), fused loops plus call and guard overhead ≈ 0.45 ms. Prefill (16 × 32 tokens,
eager) costs ≈ 41 ms, ≈ 0.33 ms per step over 128 steps. So with no overhead at all the float32 floor is
≈ 0.94 + 0.3 + 0.33 ≈ 1.6 ms per step: against this run's {hf_cpu:.1f} ms of transformers at batch {batch}, at
most ≈ {bound:.1f}× in CPU time. {verdict} Kept: each KV head's query group folded into one attention call
(every cached head read once), an additive float mask built once per forward, `index_copy_` cache writes with
targets computed once per step, batched sampling (same tokens as before). Measured and dropped: a RoPE table
lookup (no gain), a matmul or element-wise decode attention instead of SDPA (slower, eager and compiled),
dynamic batch shapes (inductor then calls oneDNN GEMMs, ≈ 30 % slower than prepacked MKL here), skipping
dynamo's guards (−2 %, not worth its unsafety), inductor's max-autotune GEMMs (it chose MKL anyway).

bfloat16 (this CPU has AMX): prepacked bf16 GEMMs are ≈ 1.6× faster than float32 ones, but greedy ids leave
the float32 reference after 3–75 of 128 tokens on all 8 prompts tried (and on the batch-1 check above), so
float32 stays the default; bf16 eager is slower at batch 1 (unpacked bf16 GEMMs reorder their weights at every
call). `compile=True` is opt-in: ≈ 12–20 s to build the graph of each batch bucket (powers of two up to
max_batch; `Engine.warmup()` builds them all up front), the frozen weights are held twice, and weight updates
made after compiling are not seen. When the machine is shared with other jobs (see the load average below), wall-clock
rates are pessimistic and noisy; rounds rotate, and the CPU-time columns are the steadier ratio."""
