"""Rollouts for reasoning RL: G sampled answers per query with their log-probs, scored by the world's verifiers.

One call renders each query's scene (the world is deterministic by seed), encodes its tiles once, prefills
a batch of prompts (left-padded) into a KV cache, repeats the cache G times and samples the G answers of
every query in lock-step. Each sampled token's log-probability under the policy at the sampling
temperature is recorded: these are GSPO's π_old, so no second forward pass is needed.

Rewards: 1 when the answer is well-formed and the family's verifier accepts it, else 0. Well-formed means
the answer ended with `<|im_end|>` (not truncated) and, in thinking mode, is exactly one
`<think>…</think>` block followed by the final answer; with thinking off it has no think tags at all.

Everything is a function of `SamplingConfig.seed`: the same model, queries and config give the same tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tessera.train.data import Batch, Encoded, collate
from tessera.train.losses import IGNORE
from tessera.train.rl_losses import token_logprobs

Verifier = Callable[[str, str, str], bool]  # (family, prediction_text, answer) → correct?


@dataclass(frozen=True)
class Query:
    """One training or evaluation question; the image is re-rendered from (seed, family, split)."""

    seed: int
    family: str
    question: str
    answer: str
    thinking: bool = False
    split: str = "train"

    def key(self) -> tuple[int, str, str]:
        return (self.seed, self.family, self.split)


def world_query(seed: int, family: str | None = None, split: str = "train", thinking: bool | None = None) -> Query:
    """The world's sample at `seed` as a Query. Thinking defaults to on when the sample carries a worked
    `<think>` target (the reasoning family), since that is how SFT taught the model to answer it."""
    from tessera.world import build

    _, task, family, _ = build(seed, family, split)  # the question without rendering the scene
    think = (task.think is not None) if thinking is None else thinking
    return Query(seed, family, task.question, task.answer, think, split)


RL_SEED_OFFSET = 900_000_000  # RL's training scenes: train-split seeds disjoint from pretraining and SFT
CRITIC_SEED_OFFSET = 950_000_000  # the Best-of-N critic's training scenes, disjoint from RL's


def default_rl_families() -> dict[str, float]:
    """Every family; reasoning (RL's target) 8×, count 2×, the others 1×.

    Count is weighted up because a reasoning-only pool cost it 5.5 points (docs/TRAINING.md, session 8): its
    answers are the reads that reasoning chains build on, and the [0.2, 0.8] filter keeps many of its queries
    (221 of 545 against 2–29 of ~270 for the reading families)."""
    from tessera.world import FAMILIES

    weights = {"reasoning": 8.0, "count": 2.0}
    return {f: weights.get(f, 1.0) for f in FAMILIES}


def training_queries(n: int, families: dict[str, float] | None = None, seed: int = 0,
                     seed_offset: int = RL_SEED_OFFSET) -> list[Query]:
    """n train-split queries at scene seeds seed_offset + seed·n + i, families drawn by weight (deterministic)."""
    families = families or default_rl_families()
    names, weights = list(families), [float(families[f]) for f in families]
    if not names or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"families must map at least one family to a positive weight, got {families}")
    rng = random.Random(seed)
    return [world_query(seed_offset + seed * n + i, rng.choices(names, weights)[0]) for i in range(n)]


def render(query: Query):
    """The query's image (PIL), rendered again from its seed; checks the world still agrees on the question."""
    from tessera.world import make_sample

    s = make_sample(query.seed, family=query.family, split=query.split)
    if s.question != query.question or s.answer != query.answer:
        raise ValueError(f"world sample (seed={query.seed}, {query.family}, {query.split}) no longer matches the stored "
                         f"query: {s.question!r}/{s.answer!r} vs {query.question!r}/{query.answer!r}")
    return s.image


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    group_size: int = 8  # G answers per query
    max_new_tokens: int = 32  # answer budget with thinking off (tessera.evaluate's default)
    max_think_tokens: int = 160  # budget of a thinking answer (think block + final answer)
    queries_per_batch: int = 4  # prompts prefilled together (× G rows while decoding)
    seed: int = 0

    def budget(self, thinking: bool) -> int:
        return self.max_think_tokens if thinking else self.max_new_tokens


@dataclass
class Prepared:
    """A query ready for the model: prompt ids and its image features (computed once, without grad)."""

    query: Query
    prompt_ids: list[int]
    pixel_values: torch.Tensor  # [N,3,S,S]
    image_features: torch.Tensor  # [T_img, D], T_img = number of <IMG_CONTEXT> ids in prompt_ids
    image_tokens: list[int]  # visual tokens per image (one image per query)


@dataclass
class Rollout:
    """One sampled answer. `logprobs[j]` = log π_old(tokens[j] | prompt, tokens[:j]) at the sampling temperature."""

    tokens: list[int]
    logprobs: list[float]
    finished: bool  # ended with a stop id (kept in `tokens`) rather than by max_new_tokens
    text: str = ""  # the decoded answer (specials dropped)
    final: str = ""  # the part the verifier judged
    format_ok: bool = False
    correct: bool = False
    reward: float = 0.0


@dataclass
class Group:
    """A query's G rollouts; `accuracy` = fraction with reward 1."""

    query: Query
    rollouts: list[Rollout] = field(default_factory=list)

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.rollouts]

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.rollouts) / max(len(self.rollouts), 1)


# ---- preparing prompts ---------------------------------------------------------------------------

@torch.no_grad()
def prepare(model, queries: Sequence[Query], keep_pixels: bool = True) -> list[Prepared]:
    """Render, tile and encode each query's image (every tile at full resolution, 1/4); build its prompt with the
    real visual-token count. `keep_pixels=False` stores an empty tile tensor (the features suffice when the vision side is frozen)."""
    from tessera.image import ImageProcessor

    processor = ImageProcessor.from_config(model.config)
    out = []
    was_training = model.training
    model.eval()  # the features are the deterministic ones (no connector dropout), whoever calls
    try:
        for q in queries:
            pixels = processor([render(q)])
            features, per_tile = model.encode_images(pixels.pixel_values)
            image_tokens = [int(sum(per_tile))]
            prompt = model.tokenizer.build_prompt(q.question, image_tokens, thinking=q.thinking)
            tiles = pixels.pixel_values if keep_pixels else pixels.pixel_values[:0]  # [N,3,S,S] or [0,3,S,S]
            out.append(Prepared(q, prompt, tiles, features.detach(), image_tokens))
    finally:
        model.train(was_training)
    return out


def unprepared(queries: Sequence[Query], prepared: dict, need_pixels: bool) -> list[Query]:
    """The distinct queries (in order) that `prepared` (query key → Prepared) cannot serve: not encoded yet, or
    encoded without tiles when the vision side trains and needs them."""
    def ready(q: Query) -> bool:
        p = prepared.get(q.key())
        return p is not None and (not need_pixels or p.pixel_values.numel() > 0)

    return [q for q in dict.fromkeys(queries) if not ready(q)]


# ---- sampling --------------------------------------------------------------------------------------

def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                  banned: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row: logits [B,V] → (ids [B], log-probs [B]).

    temperature 0 is greedy. top-p keeps the smallest set of most likely tokens whose mass reaches p (the
    most likely token always stays). `banned` ids are never drawn (image placeholders: an answer cannot
    contain an image). The returned log-prob is log π(id) at `temperature` (1 when greedy) over the whole
    vocabulary, i.e. what the trainer computes for the same token."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    allowed = logits.index_fill(-1, torch.tensor(list(banned), dtype=torch.long), float("-inf")) if banned else logits
    if temperature <= 0:
        ids = allowed.argmax(dim=-1)  # [B]
        return ids, token_logprobs(logits[:, None], ids[:, None]).squeeze(1)
    scaled = logits / temperature  # [B,V]
    probs = torch.softmax(allowed / temperature, dim=-1)  # [B,V]
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [B,V]
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly above each token [B,V]
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)  # back to vocabulary order [B,V]
    ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [B,1] → [B]
    return ids, token_logprobs(scaled[:, None], ids[:, None]).squeeze(1)


class RolloutCache:
    """A KV cache (the llm's cache protocol) that can repeat its rows after the prefill and then decodes into
    preallocated buffers, so a decode step writes one position instead of copying the whole cache."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []  # per layer [B,Hkv,capacity,hd]
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # filled positions per layer

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v [B,Hkv,T,hd] written after the filled positions; returns the filled views [B,Hkv,S,hd]
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
            self.lengths.append(k.shape[2])
            return k, v
        n, t = self.lengths[layer_idx], k.shape[2]
        if n + t > self.keys[layer_idx].shape[2]:
            self._grow(layer_idx, max(2 * (n + t), 16))
        self.keys[layer_idx][:, :, n:n + t] = k
        self.values[layer_idx][:, :, n:n + t] = v
        self.lengths[layer_idx] = n + t
        return self.keys[layer_idx][:, :, :n + t], self.values[layer_idx][:, :, :n + t]

    def _grow(self, layer_idx: int, capacity: int) -> None:
        n = self.lengths[layer_idx]
        for bufs in (self.keys, self.values):
            old = bufs[layer_idx]
            new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])  # [B,Hkv,capacity,hd]
            new[:, :, :n] = old[:, :, :n]
            bufs[layer_idx] = new

    @property
    def seq_len(self) -> int:
        """Positions cached so far (0 when empty), as tessera.model.llm.DynamicCache."""
        return self.lengths[0] if self.lengths else 0

    def repeat_interleave(self, repeats: int, extra_capacity: int = 0) -> None:
        """Row b becomes rows b·repeats … b·repeats + repeats − 1 ([B,…] → [B·repeats,…]), with room for
        `extra_capacity` more positions."""
        for i, n in enumerate(self.lengths):
            for bufs in (self.keys, self.values):
                old = bufs[i][:, :, :n].repeat_interleave(repeats, dim=0)  # [B·repeats,Hkv,n,hd]
                new = old.new_empty(old.shape[0], old.shape[1], n + extra_capacity, old.shape[3])
                new[:, :, :n] = old
                bufs[i] = new


@torch.no_grad()
def generate_groups(model, prepared: Sequence[Prepared], group_size: int, config: SamplingConfig,
                    generator: torch.Generator | None, stop_ids: Sequence[int]) -> list[list[Rollout]]:
    """Sample `group_size` answers for each prepared prompt in one batch: → [Q][G] unscored Rollouts."""
    Q, G = len(prepared), group_size
    tok = model.tokenizer
    pad = tok.pad_id
    banned = [tok.img_context_id, tok.img_start_id, tok.img_end_id]
    lengths = [len(p.prompt_ids) for p in prepared]
    L = max(lengths)
    dev = model.device  # every tensor of the sampling loop lives beside the model
    ids = torch.full((Q, L), pad, dtype=torch.long, device=dev)  # left-padded prompts [Q,L]
    valid = torch.zeros(Q, L, dtype=torch.bool, device=dev)  # [Q,L] real tokens
    for i, p in enumerate(prepared):
        ids[i, L - lengths[i]:] = torch.tensor(p.prompt_ids)
        valid[i, L - lengths[i]:] = True
    position_ids = (valid.long().cumsum(dim=1) - 1).clamp_min(0)  # [Q,L]
    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()  # [L,L]
    # a padding query position sees only itself, so no attention row is empty
    attn = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=dev)[None]  # [Q,L,L]
    rows = sum(p.image_features.shape[0] for p in prepared)
    features = torch.cat([p.image_features for p in prepared if p.image_features.shape[0]]) if rows else None  # [ΣT,D]
    cache = RolloutCache()
    embeds = model.embed(ids, features)  # [Q,L,D]
    logits = model.language_model(embeds, position_ids, cache=cache, attn_mask=attn[:, None])[:, -1]  # [Q,V]

    limits = torch.tensor([config.budget(p.query.thinking) for p in prepared], device=dev)
    limits = limits.repeat_interleave(G)  # [Q·G]
    steps = int(limits.max())
    cache.repeat_interleave(G, extra_capacity=steps)
    logits = logits.repeat_interleave(G, dim=0)  # [Q·G,V]
    keys_valid = valid.repeat_interleave(G, dim=0)  # [Q·G,L]
    next_pos = position_ids[:, -1].repeat_interleave(G) + 1  # [Q·G]
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
    B = Q * G
    tokens = torch.zeros(B, 0, dtype=torch.long, device=dev)
    logps = torch.zeros(B, 0, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    for step in range(steps):
        new, lp = sample_tokens(logits, config.temperature, config.top_p, generator, banned)  # [B], [B]
        alive = ~done  # rows still writing; finished rows are fed padding that nothing attends to
        new = torch.where(alive, new, torch.full_like(new, pad))
        tokens = torch.cat([tokens, new[:, None]], dim=1)  # [B,step+1]
        logps = torch.cat([logps, lp[:, None]], dim=1)  # [B,step+1]
        hit = torch.isin(new, stop) & alive
        finished |= hit
        done |= hit | (limits <= step + 1)  # a row out of budget stops, unfinished
        if bool(done.all()):
            break
        keys_valid = torch.cat([keys_valid, alive[:, None]], dim=1)  # [B,S]
        step_embeds = model.embed(new[:, None], None)  # [B,1,D]
        logits = model.language_model(step_embeds, next_pos[:, None], cache=cache,
                                      attn_mask=keys_valid[:, None, None, :])[:, -1]  # [B,1,V] → [B,V]
        next_pos = next_pos + 1
    out: list[list[Rollout]] = []
    for q in range(Q):
        group = []
        for g in range(G):
            b = q * G + g
            row = tokens[b, :int(limits[b])].tolist()
            n = _answer_length(row, finished[b].item(), set(stop_ids))
            group.append(Rollout(row[:n], logps[b, :n].tolist(), bool(finished[b])))
        out.append(group)
    return out


def _answer_length(row: list[int], finished: bool, stop: set[int]) -> int:
    """Tokens that belong to the answer: up to and including the first stop id, or all when truncated."""
    if not finished:
        return len(row)
    return next(i for i, t in enumerate(row) if t in stop) + 1


# ---- teacher-forced scoring ------------------------------------------------------------------------

@dataclass
class SequenceBatch:
    """Prompt + response rows for the trainer (one sequence per row, right-padded).

    `batch.targets[b, t]` is the token at t+1 when it belongs to row b's response, else IGNORE; `old_logprobs`
    (when the responses came from a rollout) holds log π_old of that same target, aligned with `targets`."""

    batch: Batch  # tessera.train.data.Batch: input_ids, targets, position_ids, pixel_values, image_tokens
    image_features: torch.Tensor | None  # [ΣT, D] in row order (None → encode batch.pixel_values)
    old_logprobs: torch.Tensor | None = None  # [B,L]

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.targets != IGNORE  # [B,L]


def sequence_batch(prepared: Sequence[Prepared], responses: Sequence[Sequence[int]], pad_id: int,
                   old_logprobs: Sequence[Sequence[float]] | None = None) -> SequenceBatch:
    """Rows prompt_i + response_i with the loss on the response tokens (data.collate builds the tensors)."""
    if len(prepared) != len(responses) or not prepared:
        raise ValueError(f"need one response per prompt, got {len(prepared)} prompts and {len(responses)} responses")
    rows = []
    for p, r in zip(prepared, responses):
        if not r:
            raise ValueError(f"empty response for query seed={p.query.seed} ({p.query.family})")
        rows.append([Encoded(list(p.prompt_ids) + list(r), [0] * len(p.prompt_ids) + [1] * len(r), p.pixel_values,
                             p.image_tokens, p.query.family)])
    batch = collate(rows, pad_id)
    feats = [p.image_features for p in prepared]
    features = torch.cat(feats) if sum(f.shape[0] for f in feats) else None  # [ΣT, D]
    old = None
    if old_logprobs is not None:
        old = torch.zeros(batch.targets.shape)  # [B,L]
        for b, (p, lp) in enumerate(zip(prepared, old_logprobs)):
            if len(lp) != len(responses[b]):
                raise ValueError(f"row {b}: {len(lp)} old log-probs for {len(responses[b])} response tokens")
            start = len(p.prompt_ids) - 1  # position that predicts the first response token
            old[b, start:start + len(lp)] = torch.tensor(lp)
    return SequenceBatch(batch, features, old)


def response_logprobs(model, seqs: SequenceBatch, temperature: float = 1.0,
                      train_vision: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(response tokens) with gradients: → (token_logp [B,L], mask [B,L]), aligned with batch.targets.

    With `train_vision` the tiles are encoded again (gradients reach the projector and the ViT, if trainable);
    otherwise the image features recorded at rollout time are reused, so only the language model learns."""
    b = seqs.batch
    if train_vision or seqs.image_features is None:
        pixels = b.pixel_values if b.pixel_values.numel() else None
        logits = model(b.input_ids, pixel_values=pixels, position_ids=b.position_ids)  # [B,L,V]
    else:
        logits = model(b.input_ids, image_features=seqs.image_features, position_ids=b.position_ids)  # [B,L,V]
    mask = seqs.mask
    return token_logprobs(logits, b.targets.clamp_min(0), temperature) * mask, mask  # [B,L], [B,L]


# ---- rewards ------------------------------------------------------------------------------------------

def score(tokenizer, rollout: Rollout, query: Query, verify: Verifier) -> Rollout:
    """Fill in text, final answer, format check, correctness and reward (1 if well-formed and correct)."""
    ids = list(rollout.tokens)
    ok = rollout.finished and bool(ids) and ids[-1] == tokenizer.im_end_id
    body = ids[:-1] if ok else ids
    think, end = tokenizer.think_id, tokenizer.end_think_id
    if query.thinking:
        ok = ok and len(body) > 0 and body[0] == think and body.count(think) == 1 and body.count(end) == 1
        answer_ids = body[body.index(end) + 1:] if end in body else body
    else:
        ok = ok and think not in body and end not in body
        answer_ids = body
    rollout.text = tokenizer.decode(body)
    rollout.final = tokenizer.decode(answer_ids).strip()
    rollout.format_ok = ok
    rollout.correct = bool(ok and rollout.final and verify(query.family, rollout.final, query.answer))
    rollout.reward = 1.0 if rollout.correct else 0.0
    return rollout


def default_verifier() -> Verifier:
    from tessera.world import verify

    return verify


def rollout(model, queries: Sequence[Query], config: SamplingConfig, verify: Verifier | None = None,
            prepared: Sequence[Prepared] | None = None) -> list[Group]:
    """G scored rollouts for every query, in query order, reproducible under `config.seed`.

    Queries are processed `queries_per_batch` at a time; batch k draws from a generator seeded with
    (seed, k), so a run can be repeated exactly. Pass `prepared` to reuse already-encoded images."""
    if min(config.group_size, config.max_new_tokens, config.max_think_tokens, config.queries_per_batch) < 1:
        raise ValueError(f"group_size, token budgets and queries_per_batch must be >= 1: {config}")
    verify = verify or default_verifier()
    was_training = model.training
    model.eval()
    try:
        prepared = list(prepared) if prepared is not None else prepare(model, queries)
        if [p.query for p in prepared] != list(queries):
            raise ValueError("prepared prompts do not match the queries")
        stop_ids = [model.tokenizer.im_end_id]
        groups: list[Group | None] = [None] * len(prepared)
        # thinking and direct answers are batched apart: their lengths differ by an order of magnitude
        order = sorted(range(len(prepared)), key=lambda i: (prepared[i].query.thinking, i))
        step = config.queries_per_batch
        for k, start in enumerate(range(0, len(order), step)):
            idx = order[start:start + step]
            chunk = [prepared[i] for i in idx]
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + k)
            for i, p, rolls in zip(idx, chunk, generate_groups(model, chunk, config.group_size, config, gen, stop_ids)):
                groups[i] = Group(p.query, [score(model.tokenizer, r, p.query, verify) for r in rolls])
        return groups
    finally:
        model.train(was_training)
