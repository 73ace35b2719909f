"""World queries and sampled answers: what RL rollouts and Best-of-N both build on.

A `Query` is one world question (its image re-rendered from its seed); `prepare` encodes it for the model
(`PreparedQuery`: prompt ids and image features, computed once); `generate_groups` samples G answers per
prepared query through `tessera.engine.generate`, each token's log-probability recorded (GSPO's π_old);
`score` fills in the reward: 1 when the answer is well-formed and the family's verifier accepts it, else 0.
Well-formed means the answer ended with `<|im_end|>` (not truncated) and, in thinking mode, is exactly one
`<think>…</think>` block followed by the final answer; with thinking off it has no think tags at all.
`answer_logprobs` scores given answers teacher-forced (one forward over prompt + answer).

Everything is a function of the sampling seed: the same model, queries and config give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tessera.engine import SamplingParams, generate
from tessera.image import ImageProcessor
from tessera.logprobs import token_logprobs
from tessera.seeds import sub_seed
from tessera.world import build, make_sample
from tessera.world import verify as world_verify

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


def world_query(
    seed: int, family: str | None = None, split: str = "train", thinking: bool | None = None
) -> Query:
    """The world's sample at `seed` as a Query. Thinking defaults to on when the sample carries a worked
    `<think>` target (the reasoning family), since that is how SFT taught the model to answer it."""
    _, task, family, _ = build(seed, family, split)  # the question without rendering the scene
    think = (task.think is not None) if thinking is None else thinking
    return Query(seed, family, task.question, task.answer, think, split)


def render(query: Query):
    """The query's image (PIL), rendered again from its seed; checks the world still agrees on the question."""
    s = make_sample(query.seed, family=query.family, split=query.split)
    if s.question != query.question or s.answer != query.answer:
        raise ValueError(
            f"world sample (seed={query.seed}, {query.family}, {query.split}) no longer matches the stored "
            f"query: {s.question!r}/{s.answer!r} vs {query.question!r}/{query.answer!r}"
        )
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
class PreparedQuery:
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


# ---- preparing prompts --------------------------------------------------------------------------


@torch.no_grad()
def prepare(model, queries: Sequence[Query], keep_pixels: bool = True) -> list[PreparedQuery]:
    """Render, tile and encode each query's image (every tile at full resolution, 1/4); build its prompt with the
    real visual-token count. `keep_pixels=False` stores an empty tile tensor (the features suffice when the vision side is frozen)."""
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
            tiles = (
                pixels.pixel_values if keep_pixels else pixels.pixel_values[:0]
            )  # [N,3,S,S] or [0,3,S,S]
            out.append(PreparedQuery(q, prompt, tiles, features.detach(), image_tokens))
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


def generate_groups(
    model,
    prepared: Sequence[PreparedQuery],
    group_size: int,
    config: SamplingConfig,
    seed: int,
    stop_ids: Sequence[int],
) -> list[list[Rollout]]:
    """Sample `group_size` answers for each prepared prompt in one batch (tessera.engine.generate, one
    generator seeded with `seed`; image placeholders are never drawn): → [Q][G] unscored Rollouts."""
    tok = model.tokenizer
    rows = sum(p.image_features.shape[0] for p in prepared)
    features = (
        torch.cat([p.image_features for p in prepared if p.image_features.shape[0]])
        if rows
        else None
    )  # [ΣT,D]
    params = SamplingParams(
        max_tokens=max(config.max_new_tokens, config.max_think_tokens),
        temperature=config.temperature,
        top_p=config.top_p,
        seed=seed,
        stop_ids=frozenset(stop_ids),
        banned_ids=frozenset([tok.img_context_id, tok.img_start_id, tok.img_end_id]),
    )
    gen = generate(
        model,
        [p.prompt_ids for p in prepared],
        features,
        params,
        group_size,
        max_tokens=[config.budget(p.query.thinking) for p in prepared],
    )
    return [
        [Rollout(gen.tokens[r], gen.logprobs[r], gen.finished[r]) for r in group]
        for group in gen.groups()
    ]


# ---- rewards ------------------------------------------------------------------------------------------


def score(tokenizer, rollout: Rollout, query: Query, verify: Verifier) -> Rollout:
    """Fill in text, final answer, format check, correctness and reward (1 if well-formed and correct)."""
    ids = list(rollout.tokens)
    ok = rollout.finished and bool(ids) and ids[-1] == tokenizer.im_end_id
    body = ids[:-1] if ok else ids
    think, end = tokenizer.think_id, tokenizer.end_think_id
    if query.thinking:
        ok = (
            ok
            and len(body) > 0
            and body[0] == think
            and body.count(think) == 1
            and body.count(end) == 1
        )
        answer_ids = body[body.index(end) + 1 :] if end in body else body
    else:
        ok = ok and think not in body and end not in body
        answer_ids = body
    rollout.text = tokenizer.decode(body)
    rollout.final = tokenizer.decode(answer_ids).strip()
    rollout.format_ok = ok
    rollout.correct = bool(
        ok and rollout.final and verify(query.family, rollout.final, query.answer)
    )
    rollout.reward = 1.0 if rollout.correct else 0.0
    return rollout


def default_verifier() -> Verifier:
    return world_verify


def rollout(
    model,
    queries: Sequence[Query],
    config: SamplingConfig,
    verify: Verifier | None = None,
    prepared: Sequence[PreparedQuery] | None = None,
) -> list[Group]:
    """G scored rollouts for every query, in query order, reproducible under `config.seed`.

    Queries are processed `queries_per_batch` at a time; batch k draws from a generator seeded with
    (seed, k), so a run can be repeated exactly. Pass `prepared` to reuse already-encoded images."""
    if (
        min(
            config.group_size,
            config.max_new_tokens,
            config.max_think_tokens,
            config.queries_per_batch,
        )
        < 1
    ):
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
            idx = order[start : start + step]
            chunk = [prepared[i] for i in idx]
            rolls_of = generate_groups(
                model, chunk, config.group_size, config, sub_seed(config.seed, k), stop_ids
            )
            for i, p, rolls in zip(idx, chunk, rolls_of):
                groups[i] = Group(
                    p.query, [score(model.tokenizer, r, p.query, verify) for r in rolls]
                )
        return groups
    finally:
        model.train(was_training)


# ---- teacher-forced log-probabilities ---------------------------------------------------------------


def answer_logprobs(
    model,
    prepared: Sequence[PreparedQuery],
    answers: Sequence[Sequence[int]],
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(answer tokens | image, prompt), teacher-forced on the recorded image features, one forward over the
    right-padded rows prompt_i + answer_i → (token_logp [B,L], mask [B,L]); token_logp[b, t] scores the token
    at t+1 when it belongs to row b's answer (0 elsewhere, mask False)."""
    if len(prepared) != len(answers) or not prepared:
        raise ValueError(
            f"need one answer per prompt, got {len(prepared)} prompts and {len(answers)} answers"
        )
    rows = [list(p.prompt_ids) + list(a) for p, a in zip(prepared, answers)]
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), model.tokenizer.pad_id, dtype=torch.long)  # [B,L], right-padded
    targets = torch.zeros(B, L, dtype=torch.long)  # [B,L], the token at t+1
    mask = torch.zeros(B, L, dtype=torch.bool)  # [B,L], targets that belong to the answer
    for b, (p, a) in enumerate(zip(prepared, answers)):
        if not a:
            raise ValueError(f"empty answer for query seed={p.query.seed} ({p.query.family})")
        ids[b, : len(rows[b])] = torch.tensor(rows[b])
        start = len(p.prompt_ids) - 1  # position that predicts the first answer token
        targets[b, start : start + len(a)] = torch.tensor(list(a))
        mask[b, start : start + len(a)] = True
    feats = [p.image_features for p in prepared]
    features = torch.cat(feats) if sum(f.shape[0] for f in feats) else None  # [ΣT, D]
    positions = torch.arange(L).expand(
        B, L
    )  # [B,L]; padding sits after each row, so causal masking suffices
    logits = model(ids, image_features=features, position_ids=positions)  # [B,L,V]
    return token_logprobs(logits, targets, temperature) * mask, mask  # [B,L], [B,L]
