"""GSPO, the online half of Cascade RL.

Queries: only those whose *offline* rollout accuracy (MPO's `queries.jsonl`) lies in [0.2, 0.8]: they are
neither solved nor hopeless, so their groups carry a learning signal.

One rollout batch = `queries_per_rollout` queries × G answers sampled from the current policy, with the
log-probs of every sampled token recorded at rollout time (π_old). Advantages are normalised within each
query's group; groups whose rewards are all equal have zero advantage and are dropped (they add nothing but
compute). The batch is shuffled and split into `mini_batches` parts, one optimiser step each: the first is
on-policy (s_i = 1), the later ones are off-policy, which is what the clipping (ε_low, ε_high) is for. No KL.

Resuming: a checkpoint position counts rollout batches started; a run resumed mid-batch starts the next one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from tessera.answers import (
    Group,
    PreparedQuery,
    Query,
    SamplingConfig,
    prepare,
    rollout,
    unprepared,
)
from tessera.seeds import sub_seed
from tessera.train import dataclass_from
from tessera.train.mpo import MPOData, QueryStat, collect_or_load, read_stats
from tessera.train.records_rl import gspo_inputs
from tessera.train.rl_losses import group_advantages, gspo_loss
from tessera.train.rollout import SequenceBatch, response_logprobs, sequence_batch


def select_queries(stats: Sequence[QueryStat], low: float = 0.2, high: float = 0.8) -> list[Query]:
    """The queries whose offline rollout accuracy lies in [low, high] (both ends included)."""
    if not 0 <= low <= high <= 1:
        raise ValueError(f"need 0 <= low <= high <= 1, got [{low}, {high}]")
    return [s.query for s in stats if low <= s.accuracy <= high]


@dataclass
class GSPOConfig:
    """GSPO's options. How answers are drawn is `sampling` (G = sampling.group_size answers per
    query, at sampling.temperature, which the trained log-probs use too); its seed is the stage's:
    query order, every rollout batch's seed and the mini-batch shuffles derive from it. A run
    config may give the sampling fields flat (tessera.train.dataclass_from)."""

    queries_per_rollout: int = 8  # queries per rollout batch
    mini_batches: int = (
        4  # optimiser steps per rollout batch (the first on-policy, the rest off-policy)
    )
    eps_low: float = 3e-4  # GSPO paper's clipping range
    eps_high: float = 4e-4
    low: float = 0.2  # offline-accuracy filter
    high: float = 0.8
    train_vision: bool = False  # False: image features fixed, only the language model learns
    max_resamples: int = 4  # rollout batches tried in a row before giving up on finding any signal
    # a default rollout batch is prefilled as one (a smaller queries_per_batch splits it)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(queries_per_batch=8))

    def validate(self) -> GSPOConfig:
        G = self.sampling.group_size
        if G < 2:
            raise ValueError(
                f"GSPO compares answers within a group: group_size must be >= 2, got {G}"
            )
        if self.queries_per_rollout < 1 or self.mini_batches < 1:
            raise ValueError("queries_per_rollout and mini_batches must be >= 1")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(f"clipping ranges must be >= 0, got {self.eps_low}, {self.eps_high}")
        return self


@dataclass
class MiniBatch:
    """Part `part` (0 = on-policy) of rollout batch `rollout_index`; `seqs` is None when no group had signal."""

    seqs: SequenceBatch | None
    advantages: torch.Tensor  # [B]
    rollout_index: int
    part: int
    stats: dict[str, float] = field(default_factory=dict)


def make_minibatches(
    groups: Sequence[Group],
    prepared: dict,
    config: GSPOConfig,
    pad_id: int,
    rng: random.Random,
    rollout_index: int = 0,
) -> list[MiniBatch]:
    """Group-normalised advantages, flat groups dropped, the rest shuffled and split into mini-batches."""
    rewards = torch.tensor([g.rewards for g in groups])  # [Q,G]
    adv = group_advantages(rewards)  # [Q,G]
    items = [
        (q, i) for q in range(len(groups)) for i in range(len(groups[q].rollouts)) if adv[q, i] != 0
    ]
    informative = sum(1 for q in range(len(groups)) if bool((adv[q] != 0).any()))
    lengths = [len(r.tokens) for g in groups for r in g.rollouts]
    stats = {
        "reward": float(rewards.mean()),
        "informative_groups": informative / max(len(groups), 1),
        "response_tokens": sum(lengths) / max(len(lengths), 1),
        "truncated": sum(not r.finished for g in groups for r in g.rollouts) / max(len(lengths), 1),
    }
    if not items:
        return [MiniBatch(None, torch.zeros(0), rollout_index, 0, stats)]
    rng.shuffle(items)
    parts = min(config.mini_batches, len(items))
    out = []
    for k in range(parts):
        chunk = items[k * len(items) // parts : (k + 1) * len(items) // parts]  # near-equal split
        rolls = [groups[q].rollouts[i] for q, i in chunk]
        preps = [prepared[groups[q].query.key()] for q, _ in chunk]
        seqs = sequence_batch(preps, [r.tokens for r in rolls], pad_id, [r.logprobs for r in rolls])
        out.append(
            MiniBatch(seqs, torch.stack([adv[q, i] for q, i in chunk]), rollout_index, k, stats)
        )  # [B]
    return out


def gspo_minibatch_loss(
    model, batch: MiniBatch, config: GSPOConfig, normalizer: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GSPO loss of one mini-batch under the current policy (divided by the trainer's normalizer)."""
    if (
        batch.seqs is None
    ):  # nothing to learn from: a zero loss that still reaches the trainable parameters
        anchor = next(p for p in model.parameters() if p.requires_grad)
        return anchor.sum() * 0.0, {**batch.stats, "gspo": 0.0, "sequences": 0.0}
    temperature = config.sampling.temperature
    lp, mask = response_logprobs(model, batch.seqs, temperature, config.train_vision)  # [B,L]
    loss, metrics = gspo_loss(
        lp, batch.seqs.old_logprobs, mask, batch.advantages, config.eps_low, config.eps_high
    )
    metrics.update(batch.stats)
    metrics.update(
        {"sequences": float(batch.advantages.shape[0]), "on_policy": float(batch.part == 0)}
    )
    return loss / normalizer, metrics


@dataclass
class GSPOStage:
    """`tessera train gspo`: a Stage for tessera.train.trainer.Trainer; rollouts use the model being trained."""

    queries: list[Query]
    config: GSPOConfig = field(default_factory=GSPOConfig)
    verify: object = None  # (family, text, answer) → bool; None = the world's verifier
    prepared: dict = field(
        default_factory=dict
    )  # query key → PreparedQuery (filled lazily; tests may pre-fill)
    name: str = "gspo"
    precision: str = "fp32"  # log-probs must match the fp32 rollouts / reference (see Trainer.fit)
    trainable: dict[str, bool] = field(default_factory=dict)
    rollout_cpu_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.config.validate()
        if not self.queries:
            raise ValueError(
                f"GSPO has no query: none had an offline accuracy in [{self.config.low}, {self.config.high}]"
            )
        if not self.trainable:
            frozen = {} if self.config.train_vision else {"vision": False, "connector": False}
            self.trainable = {**frozen, "router": False}
        self._model = None

    def setup(self, model) -> None:
        self._model = model

    def _prepared(self, queries: Sequence[Query]) -> list[PreparedQuery]:
        missing = unprepared(queries, self.prepared, need_pixels=self.config.train_vision)
        if missing:
            for p in prepare(self._model, missing, keep_pixels=self.config.train_vision):
                self.prepared[p.query.key()] = p
        return [self.prepared[q.key()] for q in queries]

    def _queries_for(self, index: int, rank: int, world: int) -> list[Query]:
        n, k = len(self.queries), self.config.queries_per_rollout
        start = (index * world + rank) * k
        out = []
        for j in range(start, start + k):
            epoch, pos = divmod(j, n)
            order = list(range(n))
            random.Random(sub_seed(self.config.sampling.seed, epoch)).shuffle(order)
            out.append(self.queries[order[pos]])
        return out

    def batches(self, position: int, rank: int, world: int) -> Iterator[tuple[MiniBatch, int]]:
        if self._model is None:
            raise RuntimeError(
                "GSPOStage.setup(model) must run before batches() (the Trainer calls it)"
            )
        index = position
        pad = self._model.tokenizer.pad_id
        sampling = self.config.sampling
        while True:
            for attempt in range(self.config.max_resamples):
                queries = self._queries_for(index, rank, world)
                start = time.process_time()
                batch_sampling = replace(sampling, seed=sampling.seed * 7919 + index * 31 + rank)
                groups = rollout(
                    self._model,
                    queries,
                    batch_sampling,
                    verify=self.verify,
                    prepared=self._prepared(queries),
                )
                self.rollout_cpu_seconds += time.process_time() - start
                rng = random.Random(sampling.seed * 104_729 + index)
                minis = make_minibatches(groups, self.prepared, self.config, pad, rng, index)
                index += 1
                if minis[0].seqs is not None or attempt == self.config.max_resamples - 1:
                    break
            for mb in minis:
                mb.stats["rollout_cpu_seconds"] = self.rollout_cpu_seconds
                yield mb, index

    def weight(self, batch: MiniBatch) -> float:
        return 1.0  # the loss is already a mean over the mini-batch's sequences

    def loss(
        self, model, batch: MiniBatch, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return gspo_minibatch_loss(model, batch, self.config, normalizer)


# ---- `tessera train gspo` ------------------------------------------------------------------------


@dataclass
class GSPOData(GSPOConfig):
    """The gspo stage's data options: GSPOConfig plus where the offline accuracies come from."""

    accuracies: str = (
        ""  # a queries.jsonl of offline accuracies (MPO's collection); "" → collect now
    )
    out: str = ""  # folder for the collection when collecting ("" → not written)
    collect_queries: int = 512  # queries rolled out offline when there is no queries.jsonl
    families: dict[str, float] = field(
        default_factory=dict
    )  # for that collection; {} → default_rl_families()
    data: str = ""  # your prompts (image, question, answer) instead of the world's queries (no accuracy filter)
    reward: str = "exact"  # with data: tessera.data.rewards name or module:function
    skip_bad_records: bool = False  # with data: drop (and count) bad rows instead of stopping


def build_stage(model, data: GSPOData | dict | None = None) -> GSPOStage:
    d = dataclass_from(GSPOData, data)
    if d.data:
        queries, prepared, verify, report = gspo_inputs(
            model, d.data, d.reward, d.skip_bad_records, d.train_vision
        )
        config = GSPOConfig(**{k: getattr(d, k) for k in GSPOConfig.__dataclass_fields__})
        stage = GSPOStage(queries, config, verify=verify, prepared=prepared)
        stage.scan_report = report
        return stage
    if d.accuracies:
        stats = read_stats(d.accuracies)
    else:
        # the offline collection samples as the stage does, prefilled in mpo's batches
        collect = replace(d.sampling, queries_per_batch=MPOData().sampling.queries_per_batch)
        offline = MPOData(
            out=d.out, queries=d.collect_queries, families=d.families, sampling=collect
        )
        stats = collect_or_load(model, offline).stats
    config = GSPOConfig(**{k: getattr(d, k) for k in GSPOConfig.__dataclass_fields__})
    return GSPOStage(select_queries(stats, d.low, d.high), config)
