"""One batched decode forward: next-token logits for the running sequences, eager or compiled.

At the tiny preset's size a decode step is ~1 ms of arithmetic wrapped in a few hundred small operator calls,
so the cost per step is mostly per-call overhead. The eager path keeps that minimal on the engine's side: the
inputs are built from Python lists in three tensor ops (tokens, positions, a mask compared against a
preallocated arange), the cache write targets are computed once per step (`SlotView`), and nothing is copied
or synchronised beyond the one `.tolist()` the sampler needs.

`compile=True` runs the same function through `torch.compile` (inductor) with weight freezing: the model's
own layer code is traced, its element-wise chains (RMSNorms, RoPE, SwiGLU, residuals) become fused C++ loops,
the projections that share an input are concatenated (q/k/v, gate/up) and their weights prepacked for the
BLAS, and the graph is driven from C++. Shapes: the batch is padded up to a power of two (at most
`max_batch`) so only a handful of graphs are built, and the key length S is a dynamic dimension so one graph
serves every step. Padding rows decode token 0 at position 0 of a free slot (slots [B, max_batch) hold no
running sequence) with a mask that lets them see only that position, and their logits are dropped.
Freezing means the graph holds the weights as they were when it was built (a second copy of them): compile
only a model that will not be trained while the engine serves it.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from tessera.engine.kv_cache import SlotKVCache, SlotView

# freezing: weights become constants (prepacked for MKL); concat_linear: one GEMM for q/k/v and for gate/up;
# cpp_wrapper: the graph's kernel calls are made from C++, not from generated Python (~15 % of a step here)
COMPILE_OPTIONS = {"freezing": True, "cpp.enable_concat_linear": True, "cpp_wrapper": True}


def batch_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes the compiled decode uses: powers of two below max_batch, then max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class DecodeStep:
    """`decoder(tokens, lengths) -> logits [B, V]` (float32) for the sequences in cache slots [0, B).

    tokens[b] is sequence b's newest token, not yet in the cache; it is written at position lengths[b] and
    attends to positions [0, lengths[b]] of slot b.
    """

    def __init__(
        self,
        llm: torch.nn.Module,
        token_embed: Callable,
        cache: SlotKVCache,
        dtype: torch.dtype,
        device: torch.device,
        compile: bool = False,
    ):
        self.llm, self.token_embed, self.cache, self.dtype, self.device = (
            llm,
            token_embed,
            cache,
            dtype,
            device,
        )
        self.max_batch, self.max_len = cache.geometry.slots, cache.geometry.max_len
        self._arange = torch.arange(
            self.max_len, device=device
        )  # [max_len], the mask's key positions
        self.compiled = compile
        self.buckets = batch_buckets(self.max_batch)
        self._forward = self._compile() if compile else self._logits

    def _compile(self) -> Callable:
        """torch.compile of `_logits` bound to this instance, through a private copy of its code object: dynamo
        keeps compiled graphs per code object, so engines over different models neither scan each other's
        graphs at every call nor share one recompile limit (the buckets must fit in it: raised, process-wide,
        when they would not)."""
        fn = DecodeStep._logits
        private = types.FunctionType(
            fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
        )
        limit = torch._dynamo.config.recompile_limit
        if len(self.buckets) + 1 > limit:
            torch._dynamo.config.recompile_limit = len(self.buckets) + 1
        return torch.compile(types.MethodType(private, self), dynamic=False)

    def _logits(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """tokens/positions [B, 1], mask bool [B, 1, 1, S] → logits [B, V]. The traced function when compiled."""
        view = SlotView(self.cache, 0, positions, mask.shape[-1])
        embeds = self.token_embed(tokens).to(self.dtype)  # [B, 1, D]
        hidden = self.llm.hidden(embeds, positions, cache=view, attn_mask=mask)  # [B, 1, D]
        return self.llm.lm_head(hidden[:, -1]).float()  # [B, V]

    def __call__(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        B = len(tokens)
        S = max(lengths) + 1
        if self.max_batch < B or self.max_len < S:
            raise ValueError(
                f"decode of {B} sequences up to {S} positions exceeds the cache "
                f"({self.max_batch} slots of {self.max_len})"
            )
        if self.compiled:
            pad = next(b for b in self.buckets if b >= B) - B
            tokens, lengths = tokens + [0] * pad, lengths + [0] * pad
        tok = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)  # [Bp, 1]
        positions = torch.tensor(lengths, dtype=torch.long, device=self.device).view(
            -1, 1
        )  # [Bp, 1]
        mask = (self._arange[:S] <= positions).view(-1, 1, 1, S)  # [Bp, S] → [Bp, 1, 1, S]
        if not self.compiled:
            return self._logits(tok, positions, mask)
        torch._dynamo.mark_dynamic(mask, 3)  # one graph for every key length
        # inductor reads these when it (re)builds a graph, which happens inside the call; `options=` of
        # torch.compile does not switch freezing on, hence the patch around every call (~25 µs)
        with torch._inductor.config.patch(COMPILE_OPTIONS):
            return self._forward(tok, positions, mask)[:B]

    def warmup(self) -> None:
        """Build the compiled graph of every batch bucket now (no-op when eager). It writes position 1 of the
        slots, so call it before any sequence is running."""
        if self.compiled:
            for b in self.buckets:
                self([0] * b, [1] * b)


def prefill(
    llm: torch.nn.Module, cache: SlotKVCache, first_slot: int, prompts: list[torch.Tensor]
) -> torch.Tensor:
    """Prefill prompt embeddings (each [T_i, D]) into cache slots [first_slot, first_slot + k) in one forward
    → logits [k, V] (float32) of each prompt's last token.

    The rows are right-padded to the longest: row i holds its tokens at positions [0, T_i) of its own slot, and
    query t of row i sees keys s <= min(t, T_i - 1) (causal; pad queries see only real keys, so no attention
    row is empty, and what they write past T_i is overwritten by the decode steps before anything reads it).
    """
    k = len(prompts)
    param = next(llm.parameters())
    device, dtype = param.device, param.dtype
    lengths = torch.tensor([e.shape[0] for e in prompts], device=device)  # [k]
    T = int(lengths.max())
    embeds = torch.zeros(
        k, T, prompts[0].shape[1], dtype=dtype, device=device
    )  # [k, T, D], right-padded
    for i, e in enumerate(prompts):
        embeds[i, : e.shape[0]] = e
    positions = torch.arange(T, device=device).expand(k, T)  # [k, T]
    last_real = torch.minimum(positions, (lengths - 1)[:, None])  # [k, T]
    s = torch.arange(T, device=device)
    mask = (s[None, None, :] <= last_real[:, :, None])[:, None]  # [k, T, S=T] → [k, 1, T, S]
    view = cache.view(first_slot, positions, T, lengths)
    hidden = llm.hidden(embeds, positions, cache=view, attn_mask=mask)  # [k, T, D]
    last = hidden[torch.arange(k, device=device), lengths - 1]  # [k, D]
    return llm.lm_head(last).float()  # [k, V]
