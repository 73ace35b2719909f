"""Engine core on a toy decoder that honours the cache protocol (docs/CONTRACTS.md): slot cache, ragged
prefill masks, continuous batching equivalence, sampling, stops, aborts, bounds and the loop thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tessera.engine import Engine, EngineFull, GenerationRequest, SamplingParams
from tessera.engine.decode import batch_buckets
from tessera.engine.kv_cache import CacheGeometry, SlotKVCache
from tessera.engine.sampling import sample_tokens, top_p_filter


@dataclass
class ToyConfig:
    vocab_size: int = 97
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B,H,T,hd] rotated by positions pos [B,T] (half-split RoPE)."""
    hd = x.shape[-1]
    freq = 1.0 / (100.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))  # [hd/2]
    ang = pos[:, None, :, None].float() * freq  # [B,1,T,hd/2]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1)


class ToyLayer(torch.nn.Module):
    def __init__(self, c: ToyConfig):
        super().__init__()
        self.c = c
        self.q = torch.nn.Linear(c.hidden_size, c.num_heads * c.head_dim)
        self.kv = torch.nn.Linear(c.hidden_size, 2 * c.num_kv_heads * c.head_dim)
        self.o = torch.nn.Linear(c.num_heads * c.head_dim, c.hidden_size)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(c.hidden_size, 64), torch.nn.GELU(), torch.nn.Linear(64, c.hidden_size)
        )

    def forward(self, x, pos, idx, cache, mask):
        c, (B, T, _) = self.c, x.shape
        q = self.q(x).view(B, T, c.num_heads, c.head_dim).transpose(1, 2)  # [B,H,T,hd]
        k, v = (
            self.kv(x).view(B, T, 2, c.num_kv_heads, c.head_dim).permute(2, 0, 3, 1, 4)
        )  # 2 × [B,Hkv,T,hd]
        q, k = rope(q, pos), rope(k, pos)
        if cache is not None:
            k, v = cache.update(idx, k, v)  # [B,Hkv,S,hd]
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
        )  # [B,H,T,hd]
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))  # [B,T,H*hd]
        return x + self.mlp(x)


class ToyLLM(torch.nn.Module):
    """Just enough of a decoder to exercise the engine: GQA, RoPE, cache protocol, bool masks."""

    def __init__(self, c: ToyConfig = ToyConfig(), seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = c
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = torch.nn.ModuleList(ToyLayer(c) for _ in range(c.num_layers))
        self.lm_head = torch.nn.Linear(c.hidden_size, c.vocab_size)
        torch.nn.init.normal_(
            self.lm_head.weight, std=2.0
        )  # peaked logits: no near-ties between paths

    def hidden(self, inputs_embeds, position_ids, cache=None, attn_mask=None):
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, position_ids, i, cache, attn_mask)
        return x


def reference_greedy(llm: ToyLLM, ids: list[int], n: int, stop: int | None = None) -> list[int]:
    """Greedy decoding by full recomputation (no cache, causal mask) — the ground truth."""
    out = []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            x = llm.model.embed_tokens(torch.tensor([seq]))
            h = llm.hidden(x, torch.arange(len(seq))[None])
            tok = int(llm.lm_head(h[0, -1]).argmax())
            out.append(tok)
            seq.append(tok)
            if tok == stop:
                break
    return out


class Collector:
    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.reasons: dict[str, str] = {}
        self.done = threading.Event()
        self.expected = 0

    def __call__(self, ev):
        if ev.token_id is not None:
            self.tokens.setdefault(ev.request_id, []).append(ev.token_id)
        if ev.finished:
            self.reasons[ev.request_id] = ev.finish_reason
            if len(self.reasons) >= self.expected:
                self.done.set()


def make_request(rid, ids, col, **params):
    return GenerationRequest(rid, ids, SamplingParams(**params), col)


def run_all(engine: Engine, max_steps: int = 1000):
    for _ in range(max_steps):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("engine did not drain")


PROMPTS = [
    [5, 6, 7],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [42],
    [9, 9, 9, 9, 9],
    [3, 1, 4, 1, 5, 9, 2, 6],
    [7, 7],
]
MAX_TOKENS = [6, 3, 9, 5, 7, 4]


def test_slot_cache_writes_rows_at_their_own_positions():
    cache = SlotKVCache(
        CacheGeometry(num_layers=1, num_kv_heads=2, head_dim=3, slots=4, max_len=10)
    )
    positions = torch.tensor([[4], [7]])  # [B=2, T=1], slots 1 and 2
    k = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 1, 3)  # [B,Hkv,T,hd]
    k_all, v_all = cache.view(1, positions, 8).update(0, k, -k)
    assert k_all.shape == (2, 2, 8, 3)
    assert torch.equal(cache.k[0][1, :, 4], k[0, :, 0]) and torch.equal(
        cache.k[0][2, :, 7], k[1, :, 0]
    )
    assert torch.equal(v_all[1, :, 7], -k[1, :, 0])
    assert (
        cache.k[0][0].abs().sum() == 0 and cache.k[0][3].abs().sum() == 0
    )  # other slots untouched
    cache.move(2, 0, 8)
    assert torch.equal(cache.k[0][0, :, 7], k[1, :, 0])
    # several tokens per row (prefill): row r's token t goes to position positions[r, t] of slot 2 + r
    k2 = torch.randn(2, 2, 3, 3)  # [B, Hkv, T, hd]
    cache.view(2, torch.tensor([[0, 1, 2], [5, 6, 7]]), 8).update(0, k2, k2)
    assert torch.equal(cache.k[0][2, :, 0:3], k2[0]) and torch.equal(cache.k[0][3, :, 5:8], k2[1])
    with pytest.raises(ValueError, match="max_len"):
        cache.view(0, torch.tensor([[10]]), 11)


def test_single_request_matches_full_recompute():
    llm = ToyLLM()
    engine = Engine(llm, max_batch=4, max_len=64)
    col = Collector()
    engine.submit(make_request("a", PROMPTS[1], col, max_tokens=12))
    run_all(engine)
    assert col.tokens["a"] == reference_greedy(llm, PROMPTS[1], 12)
    assert col.reasons["a"] == "length"


def test_continuous_batching_matches_one_at_a_time():
    llm = ToyLLM()
    expected = {
        f"r{i}": reference_greedy(llm, p, m) for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS))
    }
    # small batch + staggered arrivals: requests join mid-flight, finish at different steps, slots get compacted
    engine = Engine(llm, max_batch=3, max_len=64, prefill_token_budget=16)
    col = Collector()
    for i in range(2):
        engine.submit(make_request(f"r{i}", PROMPTS[i], col, max_tokens=MAX_TOKENS[i]))
    engine.step()
    engine.step()
    for i in range(2, len(PROMPTS)):
        engine.submit(make_request(f"r{i}", PROMPTS[i], col, max_tokens=MAX_TOKENS[i]))
        engine.step()
    run_all(engine)
    assert col.tokens == expected
    assert engine.running == [] and engine.stats.finished_requests == len(PROMPTS)


def test_stop_token_ends_the_sequence():
    llm = ToyLLM()
    ref = reference_greedy(llm, PROMPTS[0], 8)
    stop = ref[3]
    engine = Engine(llm, max_batch=2, max_len=32)
    col = Collector()
    engine.submit(make_request("s", PROMPTS[0], col, max_tokens=8, stop_ids={stop}))
    run_all(engine)
    assert col.tokens["s"] == ref[: ref.index(stop) + 1]
    assert col.reasons["s"] == "stop"


def test_sampling_is_seeded_per_request_and_independent_of_the_batch():
    llm = ToyLLM()
    params = dict(max_tokens=10, temperature=1.5, top_p=0.9, seed=1234)

    def run(companions: int) -> list[int]:
        engine = Engine(llm, max_batch=8, max_len=64)
        col = Collector()
        engine.submit(make_request("x", PROMPTS[3], col, **params))
        for j in range(companions):
            engine.submit(
                make_request(f"c{j}", PROMPTS[j], col, max_tokens=5, temperature=1.0, seed=j)
            )
        run_all(engine)
        return col.tokens["x"]

    alone, crowded = run(0), run(4)
    assert alone == crowded
    other = Engine(llm, max_batch=2, max_len=64)
    col = Collector()
    other.submit(make_request("y", PROMPTS[3], col, **{**params, "seed": 99}))
    run_all(other)
    assert (
        col.tokens["y"] != alone
    )  # 10 tokens at T=1.5 from a 97-way vocab: a collision means the seed is ignored


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert torch.allclose(top_p_filter(probs, 0.7), torch.tensor([0.5, 0.3, 0, 0]) / 0.8)
    assert torch.allclose(top_p_filter(probs, 0.1), torch.tensor([1.0, 0, 0, 0]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)


def test_batched_sampling_equals_row_by_row():
    """Mixed greedy / sampled rows in one call give each row what it would get alone (same seed)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 97, generator=g) * 3
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_p=0.5, seed=1),
        SamplingParams(temperature=1.5, seed=2),
        SamplingParams(),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3),
    ]
    batched, _ = sample_tokens(logits, params, [p.make_generator() for p in params])
    alone = [
        sample_tokens(logits[b : b + 1], [p], [p.make_generator()])[0][0]
        for b, p in enumerate(params)
    ]
    assert batched == alone
    assert batched[0] == int(logits[0].argmax()) and batched[3] == int(logits[3].argmax())
    probs = torch.softmax(
        logits[:2], dim=-1
    )  # per-row top_p: row 0 untouched at 1.0, row 1 as the 1-D filter
    rows = top_p_filter(probs, torch.tensor([1.0, 0.6]))
    assert torch.equal(rows[0], probs[0]) and torch.allclose(rows[1], top_p_filter(probs[1], 0.6))


def test_compile_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(6) == [1, 2, 4, 6]


def test_bounds_abort_and_context_limit():
    llm = ToyLLM()
    engine = Engine(llm, max_batch=1, max_len=16, max_waiting=2)
    col = Collector()
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.submit(make_request("long", list(range(10)), col, max_tokens=7))
    engine.submit(make_request("a", [1, 2], col, max_tokens=10))
    engine.submit(make_request("b", [1, 2], col, max_tokens=10))
    with pytest.raises(EngineFull):
        engine.submit(make_request("c", [1, 2], col, max_tokens=10))
    engine.step()  # a is running (batch of one), b waits
    engine.abort("a")
    engine.abort("b")
    run_all(engine)
    assert col.reasons == {"a": "abort", "b": "abort"}
    assert len(col.tokens["a"]) >= 1 and "b" not in col.tokens


def test_bad_image_features_fail_only_that_request():
    llm = ToyLLM()

    def embed(ids, feats):
        if feats is not None and feats.shape[0] != 2:
            raise ValueError(f"2 image tokens but {feats.shape[0]} feature rows")
        return llm.model.embed_tokens(ids)

    engine = Engine(llm, max_batch=4, max_len=32, embed_fn=embed)
    col = Collector()
    engine.submit(
        GenerationRequest(
            "bad", [1, 2, 3], SamplingParams(max_tokens=3), col, image_features=torch.zeros(5, 32)
        )
    )
    engine.submit(make_request("good", PROMPTS[0], col, max_tokens=3))
    run_all(engine)
    assert col.reasons == {"bad": "error", "good": "length"}
    assert col.tokens["good"] == reference_greedy(llm, PROMPTS[0], 3)


def test_loop_thread_serves_concurrent_submissions_and_jobs():
    llm = ToyLLM()
    engine = Engine(llm, max_batch=4, max_len=64).start()
    try:
        col = Collector()
        col.expected = len(PROMPTS)
        for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS)):
            engine.submit(make_request(f"r{i}", p, col, max_tokens=m))
        assert (
            engine.call_in_loop(lambda: threading.current_thread().name).result(5)
            == "tessera-engine"
        )
        assert col.done.wait(10)
        for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS)):
            assert col.tokens[f"r{i}"] == reference_greedy(llm, p, m)
        assert engine.snapshot().generated_tokens == sum(MAX_TOKENS)
    finally:
        engine.stop()


def test_qwen3_decoder_continuous_batching_matches_one_at_a_time():
    """The real decoder (tiny preset) through the engine, staggered, equals per-prompt greedy recomputation."""
    from tessera.config import preset
    from tessera.model.llm import Qwen3ForCausalLM

    torch.manual_seed(0)
    llm = Qwen3ForCausalLM(preset("tiny").language).eval()
    with torch.no_grad():  # std 0.1 instead of 0.02: greedy text that depends on the prompt
        for p in llm.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    prompts = [[(7 * i + 3 * j) % 300 + 20 for j in range(4 + 3 * i)] for i in range(6)]
    expected = {f"q{i}": reference_greedy(llm, p, 8) for i, p in enumerate(prompts)}
    assert len({tuple(v) for v in expected.values()}) == len(prompts)
    engine = Engine(llm, max_batch=4, max_len=128)
    col = Collector()
    for i, p in enumerate(prompts):
        engine.submit(make_request(f"q{i}", p, col, max_tokens=8))
        if i % 2:
            engine.step()
    run_all(engine)
    assert col.tokens == expected


def lively_tiny_decoder(seed: int):
    from tessera.config import preset
    from tessera.model.llm import Qwen3ForCausalLM

    torch.manual_seed(seed)
    llm = Qwen3ForCausalLM(preset("tiny").language).eval()
    with torch.no_grad():
        for p in llm.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    return llm


@pytest.mark.slow
def test_compiled_decode_matches_eager():
    """compile=True (inductor, frozen weights, padded batch buckets, dynamic key length) decodes the same greedy
    tokens as the eager engine, staggered so that the batch moves between buckets; a second model compiled in
    the same process gets its own graphs (not the first model's frozen weights). ~1 minute: three compiles."""
    prompts = [[(5 * i + 3 * j) % 300 + 20 for j in range(3 + 4 * i)] for i in range(3)]
    a, b = lively_tiny_decoder(0), lively_tiny_decoder(1)

    def run(llm, compile: bool, max_batch: int, which: list[int]) -> dict[str, list[int]]:
        engine = Engine(llm, max_batch=max_batch, max_len=64, compile=compile)
        col = Collector()
        for i in which:
            engine.submit(make_request(f"p{i}", prompts[i], col, max_tokens=6 + 3 * i))
            engine.step()
        run_all(engine)
        return col.tokens

    assert run(a, True, 2, [0, 1, 2]) == run(a, False, 2, [0, 1, 2])
    expected_b = run(b, False, 1, [2])
    assert expected_b != run(a, False, 1, [2])
    assert run(b, True, 1, [2]) == expected_b
