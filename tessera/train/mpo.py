"""MPO, the offline half of Cascade RL: preference pairs from the SFT model's own rollouts, then
0.8·DPO + 0.2·BCO + 1.0·NLL against a frozen reference.

Data (`collect_preferences`): each training query gets G sampled answers (tessera.train.rollout); the verifier
splits them into correct and wrong; a pair is (a correct answer, a wrong answer) of the *same* query, never two of
a kind. Two JSONL files are written: `pairs.jsonl` (the pairs, with scene seeds and token ids) and
`queries.jsonl` (every query's rollout accuracy), which is also what GSPO's accuracy filter reads.

Training (`MPOStage`, a tessera.train.stage.Stage): the reference is the model as it enters the stage; its
summed log-probs of every pair are computed once in `setup` (that *is* the frozen reference, without a second
model in memory). By default the vision tower and projector stay frozen and the image features are computed
once: only the language model learns (InternVL's preference training also freezes the ViT).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tessera.train.rl_losses import MPOWeights, RunningMean, implicit_reward_mean, mpo_loss, sequence_logprobs
from tessera.train.rollout import (Group, Query, SamplingConfig, SequenceBatch, prepare, response_logprobs,
                                   rollout, sequence_batch)


@dataclass
class PreferencePair:
    """A verified-correct (chosen) and a verified-wrong (rejected) answer to one query, as token ids."""

    query: Query
    chosen: list[int]
    rejected: list[int]
    chosen_text: str = ""
    rejected_text: str = ""
    accuracy: float = 0.0  # the query's rollout accuracy (fraction of its G answers that were correct)

    def to_json(self) -> dict:
        return {**asdict(self.query), "chosen": self.chosen, "rejected": self.rejected, "chosen_text": self.chosen_text,
                "rejected_text": self.rejected_text, "accuracy": self.accuracy}

    @classmethod
    def from_json(cls, d: dict) -> "PreferencePair":
        q = Query(d["seed"], d["family"], d["question"], d["answer"], d["thinking"], d["split"])
        return cls(q, list(d["chosen"]), list(d["rejected"]), d.get("chosen_text", ""), d.get("rejected_text", ""),
                   float(d["accuracy"]))


@dataclass
class QueryStat:
    """A query's offline rollout accuracy (what GSPO's [0.2, 0.8] filter reads)."""

    query: Query
    accuracy: float
    rollouts: int

    def to_json(self) -> dict:
        return {**asdict(self.query), "accuracy": self.accuracy, "rollouts": self.rollouts}

    @classmethod
    def from_json(cls, d: dict) -> "QueryStat":
        q = Query(d["seed"], d["family"], d["question"], d["answer"], d["thinking"], d["split"])
        return cls(q, float(d["accuracy"]), int(d["rollouts"]))


def build_pairs(group: Group, max_pairs: int, rng: random.Random) -> list[PreferencePair]:
    """Up to `max_pairs` (correct, wrong) pairs from one query's rollouts.

    Duplicate answers are merged first; then the distinct correct and wrong answers are shuffled and paired
    cyclically, so every distinct answer of the smaller side is used before any repeats. A query whose answers
    are all correct or all wrong yields nothing."""
    correct = _distinct([r for r in group.rollouts if r.correct])
    wrong = _distinct([r for r in group.rollouts if not r.correct])
    if not correct or not wrong or max_pairs < 1:
        return []
    rng.shuffle(correct)
    rng.shuffle(wrong)
    n = min(max_pairs, max(len(correct), len(wrong)))
    return [PreferencePair(group.query, correct[i % len(correct)].tokens, wrong[i % len(wrong)].tokens,
                           correct[i % len(correct)].text, wrong[i % len(wrong)].text, group.accuracy)
            for i in range(n)]


def _distinct(rollouts):
    seen, out = set(), []
    for r in rollouts:
        if tuple(r.tokens) not in seen:
            seen.add(tuple(r.tokens))
            out.append(r)
    return out


def write_jsonl(path: str | Path, records: Sequence) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")


def read_pairs(path: str | Path) -> list[PreferencePair]:
    return [PreferencePair.from_json(json.loads(line)) for line in Path(path).read_text().splitlines() if line]


def read_stats(path: str | Path) -> list[QueryStat]:
    return [QueryStat.from_json(json.loads(line)) for line in Path(path).read_text().splitlines() if line]


@dataclass
class CollectResult:
    pairs: list[PreferencePair]
    stats: list[QueryStat]
    seconds: float

    @property
    def accuracy(self) -> float:
        return sum(s.accuracy for s in self.stats) / max(len(self.stats), 1)


def collect_preferences(model, queries: Sequence[Query], sampling: SamplingConfig, max_pairs_per_query: int = 2,
                        out_dir: str | Path | None = None, verify=None, log=print) -> CollectResult:
    """Roll out every query G times, build pairs and per-query accuracies; write them under `out_dir`."""
    start = time.process_time()
    rng = random.Random(sampling.seed)
    pairs: list[PreferencePair] = []
    stats: list[QueryStat] = []
    chunk = max(sampling.queries_per_batch * 8, 1)
    for lo in range(0, len(queries), chunk):
        part = list(queries[lo:lo + chunk])
        cfg = SamplingConfig(**{**asdict(sampling), "seed": sampling.seed * 7919 + lo})
        for g in rollout(model, part, cfg, verify=verify):
            stats.append(QueryStat(g.query, g.accuracy, len(g.rollouts)))
            pairs.extend(build_pairs(g, max_pairs_per_query, rng))
        if log:
            done = stats[-len(part):]
            log(f"mpo collect: {lo + len(part)}/{len(queries)} queries, {len(pairs)} pairs, "
                f"rollout accuracy {sum(s.accuracy for s in done) / len(done):.2f}")
    if out_dir is not None:
        write_jsonl(Path(out_dir) / "pairs.jsonl", pairs)
        write_jsonl(Path(out_dir) / "queries.jsonl", stats)
    return CollectResult(pairs, stats, time.process_time() - start)


# ---- the training stage --------------------------------------------------------------------------

@dataclass
class PairBatch:
    """B pairs: rows 0..B−1 are the chosen answers, rows B..2B−1 the rejected ones (same prompts)."""

    seqs: SequenceBatch
    ref_chosen: torch.Tensor  # [B] summed reference log-probs
    ref_rejected: torch.Tensor  # [B]
    pairs: int


@dataclass
class MPOStage:
    """`tessera train mpo`: a Stage for tessera.train.trainer.Trainer over stored preference pairs."""

    pairs: list[PreferencePair]
    pairs_per_batch: int = 8
    weights: MPOWeights = field(default_factory=MPOWeights)
    train_vision: bool = False
    seed: int = 0
    prepared: dict = field(default_factory=dict)  # query key → Prepared (filled in setup; tests may pre-fill)
    name: str = "mpo"
    precision: str = "fp32"  # log-probs must match the fp32 rollouts / reference (see Trainer.fit)
    trainable: dict[str, bool] = field(default_factory=dict)
    running: RunningMean = field(default_factory=RunningMean)

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("MPO needs at least one preference pair (did every query come back all-correct or all-wrong?)")
        if not self.trainable:
            frozen = {} if self.train_vision else {"vision": False, "connector": False}
            self.trainable = {**frozen, "router": False}
        self._ref: list[tuple[float, float]] = []
        self._pad = 0

    def setup(self, model) -> None:
        """Encode every query's image once and record the frozen reference's log-probs of every pair."""
        self._pad = model.tokenizer.pad_id
        missing = list({p.query.key(): p.query for p in self.pairs if p.query.key() not in self.prepared}.values())
        if missing:
            for p in prepare(model, missing, keep_pixels=self.train_vision):
                self.prepared[p.query.key()] = p
        was_training = model.training
        model.eval()
        self._ref = []
        with torch.no_grad():
            for lo in range(0, len(self.pairs), self.pairs_per_batch):
                seqs = self._sequences(self.pairs[lo:lo + self.pairs_per_batch])
                lp, mask = response_logprobs(model, seqs, train_vision=self.train_vision)  # [2B,L]
                sums = sequence_logprobs(lp, mask)  # [2B]
                half = sums.shape[0] // 2
                self._ref.extend(zip(sums[:half].tolist(), sums[half:].tolist()))
        model.train(was_training)

    def _sequences(self, pairs: Sequence[PreferencePair]) -> SequenceBatch:
        prepared = [self.prepared[p.query.key()] for p in pairs]
        return sequence_batch(prepared + prepared, [p.chosen for p in pairs] + [p.rejected for p in pairs], self._pad)

    def batches(self, position: int, rank: int, world: int) -> Iterator[tuple[PairBatch, int]]:
        """Endless pass over the pairs, reshuffled every epoch; `position` counts batches already consumed."""
        if not self._ref:
            raise RuntimeError("MPOStage.setup(model) must run before batches() (the Trainer calls it)")
        n = len(self.pairs)
        step = position
        while True:
            epoch, offset = divmod(step * self.pairs_per_batch * world, n)
            order = list(range(n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            start = offset + rank * self.pairs_per_batch
            idx = [order[(start + k) % n] for k in range(self.pairs_per_batch)]
            chosen = [self.pairs[i] for i in idx]
            ref = torch.tensor([self._ref[i] for i in idx])  # [B,2]
            step += 1
            yield PairBatch(self._sequences(chosen), ref[:, 0], ref[:, 1], len(idx)), step

    def weight(self, batch: PairBatch) -> float:
        return 1.0  # the loss is already a mean over the batch's pairs

    def loss(self, model, batch: PairBatch, normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
        lp, mask = response_logprobs(model, batch.seqs, train_vision=self.train_vision)  # [2B,L]
        B = batch.pairs
        chosen_lp, rejected_lp = lp[:B], lp[B:]  # [B,L] each
        chosen_mask, rejected_mask = mask[:B], mask[B:]
        with torch.no_grad():
            batch_reward = implicit_reward_mean(sequence_logprobs(chosen_lp, chosen_mask),
                                                sequence_logprobs(rejected_lp, rejected_mask),
                                                batch.ref_chosen, batch.ref_rejected, self.weights.beta)
        delta = self.running.update(batch_reward)  # δ includes this batch, as in TRL's bco_pair
        loss, metrics = mpo_loss(chosen_lp, chosen_mask, rejected_lp, rejected_mask, batch.ref_chosen,
                                 batch.ref_rejected, delta, self.weights)
        metrics["pairs"] = float(B)
        return loss / normalizer, metrics


# ---- `tessera train mpo` -------------------------------------------------------------------------

@dataclass
class MPOData:
    """The mpo stage's data options (the `data` section of a run config)."""

    pairs: str = ""  # a pairs.jsonl to train on; "" → roll out the model now (or reuse out/pairs.jsonl)
    out: str = ""  # folder for pairs.jsonl and queries.jsonl when collecting ("" → not written)
    queries: int = 512  # training queries rolled out
    families: dict[str, float] = field(default_factory=dict)  # family → weight; {} → default_rl_families()
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    max_think_tokens: int = 160
    queries_per_batch: int = 4
    max_pairs_per_query: int = 2
    pairs_per_batch: int = 8
    train_vision: bool = False
    dpo: float = 0.8
    bco: float = 0.2
    nll: float = 1.0
    beta: float = 0.1
    seed: int = 0

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.group_size, self.max_new_tokens, self.max_think_tokens,
                              self.queries_per_batch, self.seed)


def collect_or_load(model, data: MPOData, log=print) -> CollectResult:
    """The offline rollouts: read `data.out`'s files when a previous run wrote them, else collect (and write)."""
    from tessera.train.rollout import training_queries

    out = Path(data.out) if data.out else None
    if out is not None and (out / "pairs.jsonl").exists() and (out / "queries.jsonl").exists():
        info = json.loads((out / "collect.json").read_text()) if (out / "collect.json").exists() else {}
        return CollectResult(read_pairs(out / "pairs.jsonl"), read_stats(out / "queries.jsonl"),
                             float(info.get("cpu_seconds", 0.0)))
    queries = training_queries(data.queries, data.families or None, data.seed)
    result = collect_preferences(model, queries, data.sampling(), data.max_pairs_per_query, out, log=log)
    if out is not None:
        (out / "collect.json").write_text(json.dumps({"queries": len(result.stats), "pairs": len(result.pairs),
                                                      "accuracy": result.accuracy, "cpu_seconds": result.seconds}) + "\n")
    return result


def build_stage(model, data: MPOData | dict | None = None) -> MPOStage:
    from tessera.train import dataclass_from

    d = dataclass_from(MPOData, data)
    pairs = read_pairs(d.pairs) if d.pairs else collect_or_load(model, d).pairs
    return MPOStage(pairs, d.pairs_per_batch, MPOWeights(d.dpo, d.bco, d.nll, d.beta), d.train_vision, d.seed)
