"""Stage `question_router_policy`: train the question router's whole decision against what it costs.

The labelled stage (tessera.train.question_router_stage) scores each tile on its own, in fixed contexts, and
the router learns to predict those scores. What it cannot see is a decision's joint effect: on the tiny model
8 of the 9 count answers the router loses are mended by restoring a single tile, and a count can survive every
tile at 1/4 and every tile at 1/16 yet fail under a mix (docs/log/2026-12-04-question-router-contexts.md).
This stage optimises the decision itself. For one (image, question) the router's scores define a policy over
compress masks m (one bit per tile):

    π(m | image, q) = Π_i p_i^{m_i} (1 − p_i)^{1 − m_i}       p_i = p(compress | tile i, q), temperature T
    R(m) = −C_a(m) − λ · kept(m)
           C_a(m): what m costs the answer under the frozen model, teacher-forced (`answer_cost`): its mean
                   cross-entropy, its summed cross-entropy, or whether greedy decoding still reproduces it
           kept(m): the image's visual tokens under m / its visual tokens with every tile at 1/4

`group` masks are drawn from π per question and scored exactly (one LLM forward each, all of a batch in
batched forwards); the advantage of each is its reward against its group's mean (GRPO's group baseline, so no
value model; not divided by the group's std, which blew tiny differences up to whole units and made the
router deterministic within 150 steps on the tiny model), and the loss is REINFORCE's −(1/G) Σ_g A_g log π(m_g), averaged over
questions. λ is a dual variable: after each batch λ ← max(0, λ + η (target_saved − saved)), with saved the
share of visual tokens the batch's masks removed, so the user names the budget and the stage finds its price
(`hold_target`: without the max, so that a saving above the target is paid back in kept tokens).

The model is frozen (only `question_router.*` moves); the stage adds a question router copied from the released
one where the model has none, but starting from a labelled one (`tessera train question_router`) is the
intended path: that router already ranks tiles, and this stage moves its decision where the answers need it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F

from tessera.model.router import COMPRESS, KEEP
from tessera.routing import question_vectors
from tessera.train import dataclass_from
from tessera.train.data import Encoded, stream_batches
from tessera.train.question_router_stage import build_stage as build_labelled_stage
from tessera.train.question_router_stage import (
    heldout_stream_samples,
    install_question_router,
    is_question_router_weight,
    projected_tiles,
    routed_row,
)
from tessera.train.router_stage import SampleBatch, SampleGrouper, answer_scores, router_only


@dataclass
class Rollouts:
    """Every question of a batch with `group` sampled masks, scored."""

    logits: torch.Tensor  # [M, 2] the router's logits for every (tile, question) row (with grad)
    masks: torch.Tensor  # [G, M] bool: compress, per draw and row
    row_question: torch.Tensor  # [M] long: the question of each row
    scores: MaskScores  # [G, Q] each draw's answer, scored
    kept: torch.Tensor  # [G, Q] visual tokens kept / at full, per draw and question


def question_rows(samples: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(tile [M], question [M], questions [Q]): one row per (question, tile of its image), question-major."""
    tiles, qs, questions, first = [], [], [], 0
    for s in samples:
        k = s.pixel_values.shape[0]
        for question in s.questions:
            tiles.append(first + torch.arange(k))
            qs.append(torch.full((k,), len(questions)))
            questions.append(question)
        first += k
    return torch.cat(tiles), torch.cat(qs), questions


def router_logits(model, tokens: torch.Tensor, tile, question, questions) -> torch.Tensor:
    """The question router's logits [M, 2] for rows (tile, question) of the batch's ViT tokens."""
    vectors = question_vectors(model, questions).to(tokens.device)  # [Q, Dl]
    tile, question = tile.to(tokens.device), question.to(tokens.device)
    return model.question_router(tokens[tile], vectors[question])


@dataclass
class MaskScores:
    """How the frozen model answers each question under each draw, teacher-forced: [G, Q] each."""

    nats: torch.Tensor  # the answer's summed cross-entropy
    tokens: torch.Tensor  # its tokens
    misses: (
        torch.Tensor
    )  # its tokens whose argmax is wrong (0: greedy decoding reproduces the answer)

    @property
    def mean(self) -> torch.Tensor:
        return self.nats / self.tokens.clamp_min(1.0)  # [G, Q] mean cross-entropy


def score_masks(
    model, samples: list[Encoded], masks: torch.Tensor, feats_full, feats_small, chunk: int = 16
) -> MaskScores:
    """Question q's answer (rows question-major, as `question_rows`) scored with its image's tiles routed by
    masks[g] ([G, M] bool); one LLM forward per (draw, question)."""
    pad_id = getattr(getattr(model, "tokenizer", None), "pad_id", 0)
    rows, pick, at, first = [], [], 0, 0
    for s in samples:
        k = s.pixel_values.shape[0]
        full_k, small_k = feats_full[first : first + k], feats_small[first : first + k]
        for a in range(len(s.questions)):
            for g in range(masks.shape[0]):
                rows.append(routed_row(model, s, masks[g, at : at + k].tolist(), full_k, small_k))
                pick.append(a)
            at += k
        first += k
    scores = answer_scores(model, rows, pad_id, chunk)  # one AnswerScores [A_s] per row
    for row, (score, a) in enumerate(zip(scores, pick)):
        if score.nats.numel() <= a:
            raise ValueError(
                f"row {row}: {score.nats.numel()} answers but question {a} asked "
                "(each answered turn needs its question)"
            )

    def grid(field: str) -> torch.Tensor:  # [Q·G] question-major → [G, Q]
        flat = torch.stack([getattr(score, field)[a] for score, a in zip(scores, pick)])
        return flat.view(-1, masks.shape[0]).T

    return MaskScores(grid("nats"), grid("tokens"), grid("misses"))


COSTS = ("mean_nats", "nats", "exact")
EXACT_TIE_BREAK = (
    0.1  # "exact": the mean cross-entropy's weight, ordering draws that all keep (or lose) it
)


def answer_cost(scores: MaskScores, cost: str, cap: float) -> torch.Tensor:
    """What a draw costs the answer [G, Q]: its mean cross-entropy ("mean_nats"), its summed cross-entropy
    ("nats"), or ("exact") 1 when greedy decoding would no longer reproduce it plus EXACT_TIE_BREAK × its mean
    cross-entropy; the cross-entropies capped at `cap` (a lost answer is lost)."""
    if cost == "mean_nats":
        return scores.mean.clamp(max=cap)
    if cost == "nats":
        return scores.nats.clamp(max=cap)
    if cost == "exact":
        return (scores.misses > 0).float() + EXACT_TIE_BREAK * scores.mean.clamp(max=cap)
    raise ValueError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")


def kept_share(masks: torch.Tensor, row_question: torch.Tensor, questions: int, full, small):
    """Visual tokens kept / at full [G, Q] for masks [G, M] over rows of `row_question`."""
    tokens = torch.where(masks, float(small), float(full))  # [G, M]
    kept = torch.zeros(masks.shape[0], questions).index_add_(1, row_question, tokens)
    total = torch.zeros(questions).index_add_(
        0, row_question, torch.full_like(row_question, full, dtype=torch.float)
    )
    return kept / total  # [G, Q]


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [G, Q] → advantages [G, Q]: each against its question's group mean, in nats (not over the
    group's std: a group whose draws differ by a thousandth of a nat should barely move the router)."""
    return rewards - rewards.mean(0, keepdim=True)


def mask_log_prob(logits: torch.Tensor, masks: torch.Tensor, row_question, questions, temperature):
    """log π(m) [G, Q]: Σ over each question's tiles of log p(compress) or log p(keep) as masks [G, M] say."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # [M, 2]
    per_row = torch.where(masks, logp[:, COMPRESS], logp[:, KEEP])  # [G, M]
    return torch.zeros(masks.shape[0], questions, device=per_row.device).index_add_(
        1, row_question.to(per_row.device), per_row
    )


@dataclass
class QuestionRouterPolicyStage:
    make: object  # global stream index → Encoded at 1/4 with its `questions`
    samples_per_batch: int = 4
    group: int = 8  # masks drawn per question
    target_saved: float = 0.55  # share of visual tokens the masks should remove
    price: float = 1.0  # λ's start: nats of answer loss one image's whole token budget is worth
    price_lr: float = 0.3  # η of the dual update
    loss_cap: float = 5.0  # an answer's loss counts at most this (a lost answer is lost)
    temperature: float = 1.0  # of the router's softmax, for the policy
    workers: int = 1
    heldout: int = 16
    cost: str = "mean_nats"  # what a draw costs its answer (answer_cost: mean_nats, nats, exact)
    chunk: int = 16  # sequences per LLM forward when scoring the masks (larger on a GPU)
    hold_target: bool = (
        False  # True: λ may turn negative, holding the saving at target_saved exactly
    )
    thresholds: tuple[float | None, float | None] = (None, None)  # (relative, absolute) to ship
    seed: int = 0
    name: str = "question_router_policy"
    trainable: dict[str, bool] = field(default_factory=router_only)
    component_lr: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group < 2:
            raise ValueError(
                f"group must be >= 2 (a group baseline needs two draws), got {self.group}"
            )
        if not 0.0 < self.target_saved < 0.75 + 1e-9:
            raise ValueError(f"target_saved must be in (0, 0.75], got {self.target_saved}")
        if self.temperature <= 0 or self.loss_cap <= 0 or self.price < 0 or self.price_lr < 0:
            raise ValueError("temperature and loss_cap must be > 0, price and price_lr >= 0")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        self._draws = torch.Generator().manual_seed(self.seed)
        self._heldout: list[Encoded] | None = None

    param_filter = staticmethod(is_question_router_weight)

    def setup(self, model) -> None:
        install_question_router(model, self.thresholds)

    def batches(self, position: int, rank: int, world: int) -> Iterator[tuple[object, int]]:
        return stream_batches(
            self.make, SampleGrouper(self.samples_per_batch), position, rank, world, self.workers
        )

    def weight(self, batch: SampleBatch) -> float:
        return float(sum(len(s.questions) for s in batch.samples))  # questions

    def rollouts(self, model, samples: list[Encoded]) -> Rollouts:
        """Draw `group` masks per question from the router and score each with the frozen model."""
        cfg = model.config
        with torch.no_grad():
            tokens, feats_full, feats_small = projected_tiles(model, samples)
        tile, row_question, questions = question_rows(samples)
        logits = router_logits(model, tokens, tile, row_question, questions)  # [M, 2]
        p = torch.softmax(logits.detach().float() / self.temperature, -1)[:, COMPRESS].cpu()
        draw = torch.rand(self.group, p.numel(), generator=self._draws)
        masks = draw < p  # [G, M]
        with torch.no_grad():
            scores = score_masks(model, samples, masks, feats_full, feats_small, self.chunk)
        kept = kept_share(
            masks, row_question, len(questions), cfg.tokens_per_tile, cfg.compressed_tokens_per_tile
        )
        return Rollouts(logits, masks, row_question, scores, kept)

    def loss(self, model, batch: SampleBatch, normalizer: float):
        model.eval()  # the frozen model scores in eval mode; the router's dropout is off too
        roll = self.rollouts(model, batch.samples)
        questions = roll.kept.shape[1]
        cost = answer_cost(roll.scores, self.cost, self.loss_cap)  # [G, Q]
        rewards = -cost - self.price * roll.kept  # [G, Q]
        adv = group_advantages(rewards)  # [G, Q]
        logp = mask_log_prob(
            roll.logits,
            roll.masks.to(roll.logits.device),
            roll.row_question.to(roll.logits.device),
            questions,
            self.temperature,
        ).cpu()  # [G, Q]
        loss = -(adv * logp).mean(0).sum() / normalizer  # Σ over questions of the group mean
        saved = 1.0 - float(roll.kept.mean())
        metrics = {
            "answer_loss": float(roll.scores.mean.mean()),
            "answer_cost": float(cost.mean()),
            "saved": saved,
            "price": self.price,
            "p_compress": float(roll.masks.float().mean()),
            "flat_groups": float((adv.abs().sum(0) == 0).float().mean()),
        }
        self.price += self.price_lr * (self.target_saved - saved)
        if not self.hold_target:
            self.price = max(0.0, self.price)  # a floor: saving more than asked costs nothing
        return loss, metrics

    @torch.no_grad()
    def eval_fn(self, model, step: int) -> dict[str, float]:
        """Held-out answer loss with the router's greedy decision (p ≥ 0.5) beside every tile at 1/4."""
        if self._heldout is None:
            self._heldout = heldout_stream_samples(self.make, self.heldout)
        return evaluate_policy(model, self._heldout)


@torch.no_grad()
def evaluate_policy(model, samples: list[Encoded], chunk_samples: int = 4) -> dict[str, float]:
    """Mean answer loss and tokens saved with the question router's greedy masks (p(compress) ≥ 0.5) and with
    every tile at 1/4, on `samples`."""
    was_training = model.training
    model.eval()
    cfg = model.config
    routed, full, kept = [], [], []
    for lo in range(0, len(samples), chunk_samples):
        part = samples[lo : lo + chunk_samples]
        tokens, feats_full, feats_small = projected_tiles(model, part)
        tile, row_question, questions = question_rows(part)
        p = torch.softmax(router_logits(model, tokens, tile, row_question, questions).float(), -1)
        masks = torch.stack([p[:, COMPRESS].cpu() >= 0.5, torch.zeros(len(tile), dtype=torch.bool)])
        losses = score_masks(model, part, masks, feats_full, feats_small).mean  # [2, Q]
        routed.append(losses[0])
        full.append(losses[1])
        kept.append(
            kept_share(
                masks[:1],
                row_question,
                len(questions),
                cfg.tokens_per_tile,
                cfg.compressed_tokens_per_tile,
            )[0]
        )
    model.train(was_training)
    routed_l, full_l = torch.cat(routed).float(), torch.cat(full).float()
    return {
        "questions": float(routed_l.numel()),
        "answer_loss": float(routed_l.mean()),
        "full_answer_loss": float(full_l.mean()),
        "lost": float(((routed_l - full_l) > 0.5).float().mean()),  # answers losing > 0.5 nats
        "saved": 1.0 - float(torch.cat(kept).mean()),
    }


@dataclass
class QuestionRouterPolicyData:
    samples_per_batch: int = 4
    group: int = 8
    target_saved: float = 0.55
    price: float = 1.0
    price_lr: float = 0.3
    loss_cap: float = 5.0
    temperature: float = 1.0
    workers: int = 1
    heldout: int = 16
    cost: str = (
        "mean_nats"  # or "nats" (long answers weigh more), "exact" (greedy reproduces it or not)
    )
    chunk: int = 16  # sequences per LLM forward when scoring masks
    hold_target: bool = (
        False  # True: save target_saved exactly (a negative price pays for kept tokens)
    )
    thinking_prob: float = 0.5
    families: dict[str, float] | None = None  # the questions asked (None: sft's families)
    turns: int = 4  # questions per image
    relative_threshold: float | None = None  # the question router's thresholds the checkpoint ships
    absolute_threshold: float | None = None
    data: str | None = None  # your conversations (tessera.data): each turn's question is routed for
    skip_bad_records: bool = False
    seed: int = 0


def build_stage(
    model, data: QuestionRouterPolicyData | dict | None = None
) -> QuestionRouterPolicyStage:
    """The policy stage on the question router stage's stream (the world's SFT questions, or `data.data`)."""
    data = dataclass_from(QuestionRouterPolicyData, data)
    labelled = build_labelled_stage(
        model,
        {
            "workers": data.workers,
            "thinking_prob": data.thinking_prob,
            "families": data.families,
            "turns": data.turns,
            "data": data.data,
            "skip_bad_records": data.skip_bad_records,
        },
    )
    own = {f.name for f in fields(QuestionRouterPolicyStage)}
    options = {k: v for k, v in asdict(data).items() if k in own}
    thresholds = (data.relative_threshold, data.absolute_threshold)
    stage = QuestionRouterPolicyStage(labelled.make, thresholds=thresholds, **options)
    if hasattr(labelled, "scan_report"):
        stage.scan_report = labelled.scan_report
    return stage
