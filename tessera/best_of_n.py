"""Best-of-N with a learned critic (test-time scaling).

Sample N answers, score each with a critic, keep the best. InternVL3.5 uses a process reward model
(VisualPRM) as its critic. The world can only label *outcomes* (its verifiers judge final answers), so
Tessera's critic is an outcome reward model, built as small as it can be:

* **Inputs**: seven numbers per sample, from the policy itself (frozen). Its confidence in the answer it wrote
  (one teacher-forced pass over image, question, answer): the mean and the minimum token log-probability and
  the answer's length. And a **self-check** of a thinking chain: a chain states what it read off the image
  and what it computed (tessera.world.claims); each perception claim is re-asked as the direct question the
  world would ask for it, thinking off, on the same image features, and the critic gets the policy's
  log-probability of the chain's value there (mean and minimum over the claims, and whether there were any);
  the chain's arithmetic is recomputed (+1 right, -1 wrong, 0 none stated). The policy answers direct
  questions more reliably than it reads inside a chain, so a chain whose claims the policy itself does not
  confirm is likely wrong; nothing here looks at the reference answer. Text outside the world's chain grammar
  (a real checkpoint's answers) states no claims the parser knows: those four inputs are then 0 and the critic
  rests on confidence alone. An earlier critic also read the
  policy's hidden states (2·D more inputs): it fitted its training rollouts within ten epochs and ranked
  held-out ones worse (AUC 0.83 vs 0.92 for the seven numbers alone; docs/BENCHMARKS.md).
* **Head**: per-feature standardisation → Linear(7, 32) → GELU → Linear(32, 1), a logit of P(answer correct).
* **Training**: binary cross-entropy on the policy's own rollouts of *training* queries, labelled by the
  world's verifiers (tessera.answers); only the head learns (features are extracted once), a
  held-out fifth of the queries measures it. Minutes of CPU, no human labels.
* **Selection**: `critic` keeps the sample with the highest P(correct). `weighted` (default) sums the
  critic's probabilities over samples that give the same final answer and keeps the best-supported answer:
  agreement between samples is evidence too, but the critic decides how much each sample counts (a plain
  majority vote, `vote`, is kept only as a baseline; it is not a critic).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tessera.answers import (
    Group,
    PreparedQuery,
    Query,
    Rollout,
    SamplingConfig,
    answer_logprobs,
    generate_groups,
    prepare,
    rollout,
    score,
)
from tessera.auc import auc
from tessera.image import load_image
from tessera.logprobs import sequence_logprobs
from tessera.pipeline import Answer
from tessera.routing import RoutingPolicy, encode_routed
from tessera.seeds import sub_seed
from tessera.world.claims import arithmetic_consistent, perception_claims

CRITIC_DIR = (
    "critic"  # the critic lives in this folder of a checkpoint: critic.json + critic.safetensors
)
STRATEGIES = ("weighted", "critic", "vote")
CONFIDENCE_FEATURES = 3  # mean log-prob, min log-prob, log(1 + answer length)
SELF_CHECK_FEATURES = (
    4  # claims' mean and min direct log-prob, has claims, arithmetic (+1 right, -1 wrong, 0 none)
)
NUM_FEATURES = CONFIDENCE_FEATURES + SELF_CHECK_FEATURES


@dataclass
class CriticConfig:
    inner_size: int = 32
    input_size: int = NUM_FEATURES

    def __post_init__(self) -> None:
        if self.input_size != NUM_FEATURES:
            raise ValueError(
                f"this critic was built for {self.input_size} features; Tessera's critic reads "
                f"{NUM_FEATURES} (retrain it with `tessera critic CHECKPOINT`)"
            )


class Critic(nn.Module):
    """P(answer correct) from the policy's features of (image, question, answer): features [B,F] → logits [B]."""

    def __init__(self, config: CriticConfig):
        super().__init__()
        self.config = config
        f = config.input_size
        # per-feature standardisation fitted on the training rollouts (log-probs, lengths and flags differ in scale)
        self.register_buffer("feature_mean", torch.zeros(f))
        self.register_buffer("feature_std", torch.ones(f))
        self.head = nn.Sequential(
            nn.Linear(f, config.inner_size), nn.GELU(), nn.Linear(config.inner_size, 1)
        )

    def fit_standardisation(self, features: torch.Tensor) -> None:
        self.feature_mean.copy_(features.mean(dim=0))  # [F]
        self.feature_std.copy_(features.std(dim=0, correction=0).clamp_min(1e-6))  # [F]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.config.input_size:
            raise ValueError(
                f"critic features must be [B, {self.config.input_size}], got {tuple(features.shape)}"
            )
        x = (features - self.feature_mean) / self.feature_std  # [B,F]
        return self.head(x).squeeze(-1)  # [B,1] → [B]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "critic.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()},
            str(path / "critic.safetensors"),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Critic:
        path = Path(path)
        if (path / CRITIC_DIR / "critic.json").exists():
            path = path / CRITIC_DIR  # a checkpoint folder holding its critic
        if not (path / "critic.json").exists():
            raise FileNotFoundError(
                f"no critic at {path} (expected critic.json and critic.safetensors); train one with "
                f"`tessera critic CHECKPOINT`"
            )
        critic = cls(CriticConfig(**json.loads((path / "critic.json").read_text())))
        critic.load_state_dict(load_file(str(path / "critic.safetensors")), strict=True)
        return critic.eval()


# ---- features ----------------------------------------------------------------------------------------


@torch.no_grad()
def confidence_features(
    model, prepared: Sequence[PreparedQuery], answers: Sequence[Sequence[int]]
) -> torch.Tensor:
    """The policy's confidence in each (prompt, answer) row: [mean log p ; min log p ; log(1+len)] over the
    answer tokens, teacher-forced → [B, 3]."""
    logp, mask = answer_logprobs(model, prepared, answers)  # [B,L] each, logp 0 off the answer
    lengths = mask.sum(dim=1).to(logp.dtype)  # [B]
    mean_lp = sequence_logprobs(logp, mask) / lengths  # [B]
    min_lp = logp.masked_fill(~mask, 0.0).min(dim=1).values  # [B]
    return torch.stack([mean_lp, min_lp, torch.log1p(lengths)], dim=1).float()  # [B,3]


@torch.no_grad()
def self_check_features(
    model, prepared: PreparedQuery, rollouts: Sequence[Rollout]
) -> torch.Tensor:
    """Per rollout of one query, what re-asking its chain's claims says (see the module doc): → [G, 4]
    [mean claim log-prob ; min claim log-prob ; has claims ; arithmetic +1 / -1 / 0]. A claim's log-prob is
    that of the value and the closing `<|im_end|>` after the direct question (so "4" is not half of "47");
    each distinct claim is scored once per query."""
    tok = model.tokenizer
    per_rollout = [perception_claims(r.text) for r in rollouts]
    distinct = sorted(
        {c for claims in per_rollout for c in claims}, key=lambda c: (c.question, c.value)
    )
    scores: dict = {}
    if distinct:
        prompts, answers = [], []
        for c in distinct:
            prompt = tok.build_prompt(c.question, prepared.image_tokens, thinking=False)
            example = tok.build_example(c.question, c.value, prepared.image_tokens, thinking=False)
            if example.input_ids[: len(prompt)] != prompt:
                raise ValueError(
                    f"the direct prompt for {c.question!r} is not a prefix of its example"
                )
            prompts.append(
                PreparedQuery(
                    prepared.query,
                    prompt,
                    prepared.pixel_values,
                    prepared.image_features,
                    prepared.image_tokens,
                )
            )
            answers.append(example.input_ids[len(prompt) :])
        totals = sequence_logprobs(*answer_logprobs(model, prompts, answers))
        scores = dict(
            zip(distinct, totals.tolist())
        )  # claim → log P(value, <|im_end|> | image, question)
    rows = []
    for r, claims in zip(rollouts, per_rollout):
        lps = [scores[c] for c in claims]
        arithmetic = arithmetic_consistent(r.text, r.final)
        rows.append(
            [
                sum(lps) / len(lps) if lps else 0.0,
                min(lps) if lps else 0.0,
                float(bool(lps)),
                0.0 if arithmetic is None else 1.0 if arithmetic else -1.0,
            ]
        )
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rollouts), SELF_CHECK_FEATURES)


def rollout_features(model, prepared: PreparedQuery, rollouts: Sequence[Rollout]) -> torch.Tensor:
    """The critic's input for the rollouts of one query: → [G, 7]."""
    confidence = confidence_features(
        model, [prepared] * len(rollouts), [r.tokens for r in rollouts]
    )  # [G, 3]
    return torch.cat([confidence, self_check_features(model, prepared, rollouts)], dim=1)


def group_features(model, groups: Sequence[Group], prepared: dict) -> torch.Tensor:
    """Critic features of every rollout of every group, in order: → [Σ G, 7]."""
    out = [
        rollout_features(model, prepared[g.query.key()], g.rollouts) for g in groups if g.rollouts
    ]
    return torch.cat(out) if out else torch.zeros(0, NUM_FEATURES)


# ---- training ----------------------------------------------------------------------------------------


@dataclass
class CriticTrainConfig:
    epochs: int = 300  # full-batch passes over the extracted features
    lr: float = 3e-3
    weight_decay: float = 0.01
    val_fraction: float = 0.2  # held-out share of the queries (reported)
    stop_fraction: float = (
        0.15  # share of the remaining queries that picks the epoch (early stopping)
    )
    inner_size: int = 32
    seed: int = 0


@dataclass
class CriticReport:
    examples: int
    positives: float  # share of correct rollouts
    train_accuracy: float
    val_accuracy: float
    val_auc: float
    val_queries: int
    metrics: dict[str, float] = field(default_factory=dict)


def train_critic(
    features: torch.Tensor,
    labels: torch.Tensor,
    query_ids: Sequence[int],
    config: CriticTrainConfig = CriticTrainConfig(),
) -> tuple[Critic, CriticReport]:
    """Fit the head on features [E,F] with 0/1 labels [E].

    Queries, not rollouts, are split three ways, so no query's answers sit on two sides: a held-out share
    (`val_fraction`, reported), a stopping share (`stop_fraction` of the rest: the epoch with its lowest
    loss is kept, so the head stops before it memorises its rollouts) and the fitting
    share. The BCE is class-balanced (a good policy's rollouts are mostly correct)."""
    if features.shape[0] != labels.shape[0] or features.shape[0] != len(query_ids):
        raise ValueError(
            f"features {tuple(features.shape)}, labels {tuple(labels.shape)}, query_ids {len(query_ids)} disagree"
        )
    torch.manual_seed(config.seed)
    distinct = sorted(set(query_ids))
    random.Random(config.seed).shuffle(distinct)
    n_val = int(len(distinct) * config.val_fraction)
    n_stop = max(1, int((len(distinct) - n_val) * config.stop_fraction))
    val_q, stop_q = set(distinct[:n_val]), set(distinct[n_val : n_val + n_stop])
    val = torch.tensor([q in val_q for q in query_ids])  # [E]
    stop = torch.tensor([q in stop_q for q in query_ids])  # [E]
    fit = ~val & ~stop
    if not fit.any():
        raise ValueError(f"too few queries ({len(distinct)}) to train a critic")
    critic = Critic(CriticConfig(config.inner_size))
    critic.fit_standardisation(features[fit])
    y = labels.float()
    pos = float(y[fit].mean())
    pos_weight = torch.tensor((1 - pos) / pos if 0 < pos < 1 else 1.0)
    opt = torch.optim.AdamW(critic.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    best, best_state, best_epoch = float("inf"), None, 0
    for epoch in range(config.epochs):
        critic.train()
        loss = loss_fn(critic(features[fit]), y[fit])  # [E_fit] → []
        opt.zero_grad()
        loss.backward()
        opt.step()
        critic.eval()
        with torch.no_grad():
            stop_loss = (
                float(loss_fn(critic(features[stop]), y[stop])) if stop.any() else float(loss)
            )
        if stop_loss < best:
            best, best_epoch = stop_loss, epoch + 1
            best_state = {k: v.clone() for k, v in critic.state_dict().items()}
    critic.load_state_dict(best_state)
    critic.eval()
    with torch.no_grad():
        logits = critic(features)  # [E]
    acc = lambda sel: (
        float(((logits[sel] > 0).float() == y[sel]).float().mean()) if sel.any() else float("nan")
    )  # noqa: E731
    report = CriticReport(
        int(features.shape[0]),
        float(y.mean()),
        acc(fit),
        acc(val),
        auc(logits[val], y[val]) if val.any() else float("nan"),
        len(val_q),
        {"stop_loss": best, "best_epoch": float(best_epoch)},
    )
    return critic, report


def fit_critic(
    model,
    queries: Sequence[Query],
    sampling: SamplingConfig,
    config: CriticTrainConfig = CriticTrainConfig(),
    verify=None,
    log=print,
    prepared: dict | None = None,
) -> tuple[Critic, CriticReport]:
    """Roll the policy out on training queries, label with the verifiers, extract features, train the head.
    `prepared` (query key → PreparedQuery) serves queries that are not the world's (tessera.train.records_rl)."""
    if prepared is None:
        prepared = {p.query.key(): p for p in prepare(model, queries, keep_pixels=False)}
    groups = rollout(
        model, queries, sampling, verify=verify, prepared=[prepared[q.key()] for q in queries]
    )
    feats = group_features(model, groups, prepared)  # [E,7]
    labels = torch.tensor([r.reward for g in groups for r in g.rollouts])  # [E]
    qids = [i for i, g in enumerate(groups) for _ in g.rollouts]
    critic, report = train_critic(feats, labels, qids, config)
    if log:
        log(
            f"critic: {report.examples} rollouts ({report.positives:.0%} correct); held-out accuracy "
            f"{report.val_accuracy:.3f}, AUC {report.val_auc:.3f} on {report.val_queries} queries"
        )
    return critic, report


# ---- selection -----------------------------------------------------------------------------------------


def answer_key(rollout: Rollout) -> str:
    """Samples giving the same final answer (case and spacing aside) support the same answer."""
    return " ".join(rollout.final.lower().split())


def select(rollouts: Sequence[Rollout], probs: Sequence[float], strategy: str = "weighted") -> int:
    """Index of the kept sample. Ties go to the earliest sample, so the choice is deterministic."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not rollouts or len(rollouts) != len(probs):
        raise ValueError(
            f"need one probability per sample, got {len(rollouts)} samples and {len(probs)} probabilities"
        )
    if strategy == "critic":
        return max(range(len(probs)), key=lambda i: (probs[i], -i))
    support: dict[str, float] = {}
    for r, p in zip(rollouts, probs):
        if r.format_ok and r.final:
            support[answer_key(r)] = support.get(answer_key(r), 0.0) + (
                p if strategy == "weighted" else 1.0
            )
    if not support:  # no well-formed answer at all: fall back to the critic's favourite sample
        return max(range(len(probs)), key=lambda i: (probs[i], -i))
    best = max(
        support,
        key=lambda k: (support[k], -min(i for i, r in enumerate(rollouts) if answer_key(r) == k)),
    )
    members = [i for i, r in enumerate(rollouts) if r.format_ok and answer_key(r) == best]
    return max(members, key=lambda i: (probs[i], -i))


@torch.no_grad()
def best_of_n_rollouts(
    model,
    critic: Critic | None,
    prepared: Sequence[PreparedQuery],
    n: int,
    sampling: SamplingConfig,
    strategy: str = "weighted",
    verify=None,
) -> list[tuple[Rollout, list[Rollout], list[float]]]:
    """For each prompt: sample n answers, score them, keep one. → [(kept, all samples, critic probabilities)].

    `verify` only fills in correctness for reporting; the choice never looks at it."""
    if n < 1:
        raise ValueError(f"best-of-N needs n >= 1, got {n}")
    if critic is None and strategy != "vote":
        raise ValueError(
            f"strategy {strategy!r} needs a critic; train one with `tessera critic CHECKPOINT`"
        )
    was_training = model.training
    model.eval()
    cfg = SamplingConfig(**{**asdict(sampling), "group_size": n})
    out = []
    try:
        for k, lo in enumerate(range(0, len(prepared), cfg.queries_per_batch)):
            chunk = list(prepared[lo : lo + cfg.queries_per_batch])
            groups = generate_groups(
                model, chunk, n, cfg, sub_seed(cfg.seed, k), [model.tokenizer.im_end_id]
            )
            for p, rolls in zip(chunk, groups):
                rolls = [
                    score(model.tokenizer, r, p.query, verify or (lambda *_: False)) for r in rolls
                ]
                if critic is not None:
                    probs = torch.sigmoid(critic(rollout_features(model, p, rolls))).tolist()
                else:
                    probs = [1.0] * len(rolls)
                out.append((rolls[select(rolls, probs, strategy)], rolls, probs))
    finally:
        model.train(was_training)
    return out


def generate_best_of_n(
    model,
    critic: Critic | None,
    prompts: Sequence[Sequence[int]],
    image_features: torch.Tensor | None,
    thinking: bool,
    n: int,
    max_new_tokens: int,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    strategy: str = "weighted",
) -> list[list[int]]:
    """The `tessera.evaluate` hook: like its greedy generate (one row per prompt, new tokens without the stop id),
    but each row is the kept one of n samples. image_features [ΣT, D] are split by each prompt's <IMG_CONTEXT> count."""
    img = model.config.image_context_token_id
    prepared, start = [], 0
    for i, ids in enumerate(prompts):
        t = sum(1 for x in ids if x == img)
        feats = (
            image_features[start : start + t]
            if image_features is not None
            else torch.zeros(0, model.config.language.hidden_size)
        )
        start += t
        tiles = torch.zeros(
            0, 3, model.config.tile_size, model.config.tile_size
        )  # features given: no tiles needed
        prepared.append(PreparedQuery(Query(i, "", "", "", thinking), list(ids), tiles, feats, [t]))
    budget = max_new_tokens
    cfg = SamplingConfig(
        temperature, top_p, n, budget, budget, queries_per_batch=max(1, 32 // n), seed=seed
    )
    kept = best_of_n_rollouts(model, critic, prepared, n, cfg, strategy)
    stop = model.tokenizer.im_end_id
    return [[t for t in r.tokens if t != stop] for r, _, _ in kept]


def best_of_n(
    pipe,
    image,
    question: str,
    n: int,
    thinking: bool = False,
    routing: str = "full",
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int | None = None,
    critic: Critic | None = None,
    strategy: str = "weighted",
):
    """The `tessera chat --best-of N` hook: a tessera.pipeline.Answer chosen among n samples."""
    model, tok = pipe.model, pipe.model.tokenizer
    critic = critic if critic is not None else getattr(model, "critic", None)
    features, image_tokens, tiles, compressed = None, [], 0, 0
    with torch.inference_mode():
        if image is not None:
            batch = pipe.processor([load_image(image)])
            features, decision = encode_routed(
                model,
                batch.pixel_values,
                batch.tiles_per_image,
                RoutingPolicy.parse(routing, **({"seed": seed} if seed is not None else {})),
                questions=[question],
            )
            image_tokens, tiles, compressed = (
                decision.image_tokens,
                len(decision.tokens_per_tile),
                decision.compressed_tiles,
            )
    ids = tok.build_prompt(question, image_tokens, thinking=thinking)
    [out] = generate_best_of_n(
        model,
        critic,
        [ids],
        features,
        thinking,
        n,
        max_new_tokens,
        temperature,
        top_p,
        seed or 0,
        strategy,
    )
    text = tok.decode(out)
    return Answer(
        text=text,
        final=tok.final_answer(text),
        visual_tokens=sum(image_tokens),
        tiles=tiles,
        compressed_tiles=compressed,
        token_ids=list(out),
    )
