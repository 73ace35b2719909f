"""MPO, the offline half of Cascade RL: preference pairs from the SFT model's own rollouts, then
0.8·DPO + 0.2·BCO + 1.0·NLL against a frozen reference.

Data (`collect_preferences`): each training query gets G sampled answers (tessera.train.rollout); the verifier
splits them into correct and wrong; a pair is (a correct answer, a wrong answer) of the *same* query, never two of
a kind. Two JSONL files are written: `pairs.jsonl` (the pairs, with scene seeds and token ids) and
`queries.jsonl` (every query's rollout accuracy), which is also what GSPO's accuracy filter reads.

Training (`MPOStage`, a tessera.train.stage.Stage): the reference is the model as it enters the stage. When that
model also sampled the pairs at temperature 1 (the cascade's case), the log-probs recorded while sampling already
*are* the reference's: `setup` checks them against one batch scored by the model and uses them, so no reference
forward pass is spent. Otherwise (pairs from another model or temperature) the model scores every pair once in
`setup`; either way there is no second model in memory. By default the vision tower and projector stay frozen
and the image features are computed once (or taken from the collection): only the language model learns
(InternVL's preference training also freezes the ViT).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tessera.answers import Group, Query, SamplingConfig, prepare, rollout, unprepared
from tessera.logprobs import sequence_logprobs
from tessera.seeds import sub_seed
from tessera.train import dataclass_from
from tessera.train.rl_losses import MPOWeights, RunningMean, implicit_reward_mean, mpo_loss
from tessera.train.rollout import SequenceBatch, response_logprobs, sequence_batch, training_queries


@dataclass
class PreferencePair:
    """A verified-correct (chosen) and a verified-wrong (rejected) answer to one query, as token ids."""

    query: Query
    chosen: list[int]
    rejected: list[int]
    chosen_text: str = ""
    rejected_text: str = ""
    accuracy: float = (
        0.0  # the query's rollout accuracy (fraction of its G answers that were correct)
    )
    # Σ log π_sampler(answer) recorded at sampling time (temperature 1 only; None otherwise): the frozen
    # reference's log-probs when the sampler is the model entering MPO
    chosen_logprob: float | None = None
    rejected_logprob: float | None = None

    @property
    def recorded(self) -> bool:
        return self.chosen_logprob is not None and self.rejected_logprob is not None

    def to_json(self) -> dict:
        return {
            **asdict(self.query),
            "chosen": self.chosen,
            "rejected": self.rejected,
            "chosen_text": self.chosen_text,
            "rejected_text": self.rejected_text,
            "accuracy": self.accuracy,
            "chosen_logprob": self.chosen_logprob,
            "rejected_logprob": self.rejected_logprob,
        }

    @classmethod
    def from_json(cls, d: dict) -> PreferencePair:
        q = Query(d["seed"], d["family"], d["question"], d["answer"], d["thinking"], d["split"])
        return cls(
            q,
            list(d["chosen"]),
            list(d["rejected"]),
            d.get("chosen_text", ""),
            d.get("rejected_text", ""),
            float(d["accuracy"]),
            d.get("chosen_logprob"),
            d.get("rejected_logprob"),
        )


@dataclass
class QueryStat:
    """A query's offline rollout accuracy (what GSPO's [0.2, 0.8] filter reads)."""

    query: Query
    accuracy: float
    rollouts: int

    def to_json(self) -> dict:
        return {**asdict(self.query), "accuracy": self.accuracy, "rollouts": self.rollouts}

    @classmethod
    def from_json(cls, d: dict) -> QueryStat:
        q = Query(d["seed"], d["family"], d["question"], d["answer"], d["thinking"], d["split"])
        return cls(q, float(d["accuracy"]), int(d["rollouts"]))


def build_pairs(
    group: Group, max_pairs: int, rng: random.Random, record_logprobs: bool = True
) -> list[PreferencePair]:
    """Up to `max_pairs` (correct, wrong) pairs from one query's rollouts.

    Duplicate answers are merged first; then the distinct correct and wrong answers are shuffled and paired
    cyclically, so every distinct answer of the smaller side is used before any repeats. A query whose answers
    are all correct or all wrong yields nothing. `record_logprobs` keeps each answer's summed sampling log-prob
    (only meaningful when it was sampled at temperature 1, where it is the sampler's own log-prob)."""
    correct = _distinct([r for r in group.rollouts if r.correct])
    wrong = _distinct([r for r in group.rollouts if not r.correct])
    if not correct or not wrong or max_pairs < 1:
        return []
    rng.shuffle(correct)
    rng.shuffle(wrong)
    n = min(max_pairs, max(len(correct), len(wrong)))
    pairs = []
    for i in range(n):
        c, w = correct[i % len(correct)], wrong[i % len(wrong)]
        logprobs = (sum(c.logprobs), sum(w.logprobs)) if record_logprobs else (None, None)
        pairs.append(
            PreferencePair(
                group.query, c.tokens, w.tokens, c.text, w.text, group.accuracy, *logprobs
            )
        )
    return pairs


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
    return [
        PreferencePair.from_json(json.loads(line))
        for line in Path(path).read_text().splitlines()
        if line
    ]


def read_stats(path: str | Path) -> list[QueryStat]:
    return [
        QueryStat.from_json(json.loads(line))
        for line in Path(path).read_text().splitlines()
        if line
    ]


@dataclass
class CollectResult:
    pairs: list[PreferencePair]
    stats: list[QueryStat]
    seconds: float
    # the paired queries' encoded prompts (image features, no tiles), so MPO need not encode the scenes again;
    # empty when the result was read back from disk
    prepared: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return sum(s.accuracy for s in self.stats) / max(len(self.stats), 1)


def collect_preferences(
    model,
    queries: Sequence[Query],
    sampling: SamplingConfig,
    max_pairs_per_query: int = 2,
    out_dir: str | Path | None = None,
    verify=None,
    log=print,
) -> CollectResult:
    """Roll out every query G times, build pairs and per-query accuracies; write them under `out_dir`.

    At temperature 1 each pair carries its answers' summed log-probs under `model`: MPO's reference when `model`
    is also the model MPO starts from (compare them in the precision MPO trains in: fp32)."""
    start = time.process_time()
    rng = random.Random(sampling.seed)
    pairs: list[PreferencePair] = []
    stats: list[QueryStat] = []
    kept: dict = {}
    chunk = max(sampling.queries_per_batch * 8, 1)
    for lo in range(0, len(queries), chunk):
        part = list(queries[lo : lo + chunk])
        cfg = SamplingConfig(**{**asdict(sampling), "seed": sampling.seed * 7919 + lo})
        prepared = prepare(model, part)
        for p, g in zip(prepared, rollout(model, part, cfg, verify=verify, prepared=prepared)):
            stats.append(QueryStat(g.query, g.accuracy, len(g.rollouts)))
            new = build_pairs(
                g, max_pairs_per_query, rng, record_logprobs=sampling.temperature == 1.0
            )
            if new:
                kept[p.query.key()] = replace(
                    p, pixel_values=p.pixel_values[:0]
                )  # [0,3,S,S]: features suffice
            pairs.extend(new)
        if log:
            done = stats[-len(part) :]
            log(
                f"mpo collect: {lo + len(part)}/{len(queries)} queries, {len(pairs)} pairs, "
                f"rollout accuracy {sum(s.accuracy for s in done) / len(done):.2f}"
            )
    if out_dir is not None:
        write_jsonl(Path(out_dir) / "pairs.jsonl", pairs)
        write_jsonl(Path(out_dir) / "queries.jsonl", stats)
    return CollectResult(pairs, stats, time.process_time() - start, kept)


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
    prepared: dict = field(
        default_factory=dict
    )  # query key → PreparedQuery (filled in setup; tests may pre-fill)
    name: str = "mpo"
    precision: str = "fp32"  # log-probs must match the fp32 rollouts / reference (see Trainer.fit)
    trainable: dict[str, bool] = field(default_factory=dict)
    running: RunningMean = field(default_factory=RunningMean)
    reference: str = (
        "auto"  # "rollout" (the pairs' recorded log-probs) | "model" (score every pair) | "auto"
    )
    reference_tolerance: float = (
        1e-3  # nats per token the recorded log-probs may differ from the model's
    )
    reference_source: str = field(default="", init=False)  # "rollout" or "model": what setup used

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError(
                "MPO needs at least one preference pair (did every query come back all-correct or all-wrong?)"
            )
        if self.reference not in ("auto", "rollout", "model"):
            raise ValueError(f"reference must be auto, rollout or model, got {self.reference!r}")
        if not self.trainable:
            frozen = {} if self.train_vision else {"vision": False, "connector": False}
            self.trainable = {**frozen, "router": False}
        self._ref: list[tuple[float, float]] = []
        self._pad = 0

    def setup(self, model) -> None:
        """Encode every query's image once and fix the frozen reference's log-probs of every pair.

        "auto" uses the log-probs recorded at sampling time when every pair has them and they agree with the
        model on the first batch (so the pairs were sampled by this very model), else scores every pair."""
        self._pad = model.tokenizer.pad_id
        missing = unprepared(
            [p.query for p in self.pairs], self.prepared, need_pixels=self.train_vision
        )
        if missing:
            for p in prepare(model, missing, keep_pixels=self.train_vision):
                self.prepared[p.query.key()] = p
        recorded = all(p.recorded for p in self.pairs)
        if self.reference == "rollout" and not recorded:
            raise ValueError(
                "reference='rollout' needs every pair's recorded log-probs (pairs collected at "
                "temperature 1); use reference='model' to score them with the model instead"
            )
        if self.reference != "model" and recorded:
            gap = self._recorded_gap(model)
            if gap <= self.reference_tolerance:
                self._ref = [(p.chosen_logprob, p.rejected_logprob) for p in self.pairs]
                self.reference_source = "rollout"
                return
            if self.reference == "rollout":
                raise ValueError(
                    f"the pairs' recorded log-probs differ from this model's by {gap:.2e} nats per token "
                    f"(tolerance {self.reference_tolerance:.0e}): they were sampled by another model. "
                    "Use reference='model' to score the pairs with the model entering MPO"
                )
        self._ref = self._model_logprobs(model, self.pairs)
        self.reference_source = "model"

    @torch.no_grad()
    def _model_logprobs(self, model, pairs: Sequence[PreferencePair]) -> list[tuple[float, float]]:
        """(Σ log π(chosen), Σ log π(rejected)) of every pair under `model`, in eval mode."""
        was_training = model.training
        model.eval()
        out = []
        try:
            for lo in range(0, len(pairs), self.pairs_per_batch):
                seqs = self._sequences(pairs[lo : lo + self.pairs_per_batch])
                lp, mask = response_logprobs(model, seqs, train_vision=self.train_vision)  # [2B,L]
                sums = sequence_logprobs(lp, mask)  # [2B]
                half = sums.shape[0] // 2
                out.extend(zip(sums[:half].tolist(), sums[half:].tolist()))
        finally:
            model.train(was_training)
        return out

    def _recorded_gap(self, model) -> float:
        """Largest per-token gap between the first batch's recorded log-probs and the model's own."""
        first = self.pairs[: self.pairs_per_batch]
        scored = self._model_logprobs(model, first)
        gaps = [
            max(
                abs(p.chosen_logprob - c) / len(p.chosen),
                abs(p.rejected_logprob - r) / len(p.rejected),
            )
            for p, (c, r) in zip(first, scored)
        ]
        return max(gaps)

    def _sequences(self, pairs: Sequence[PreferencePair]) -> SequenceBatch:
        prepared = [self.prepared[p.query.key()] for p in pairs]
        return sequence_batch(
            prepared + prepared, [p.chosen for p in pairs] + [p.rejected for p in pairs], self._pad
        )

    def batches(self, position: int, rank: int, world: int) -> Iterator[tuple[PairBatch, int]]:
        """Endless pass over the pairs, reshuffled every epoch; `position` counts batches already consumed."""
        if not self._ref:
            raise RuntimeError(
                "MPOStage.setup(model) must run before batches() (the Trainer calls it)"
            )
        n = len(self.pairs)
        step = position
        while True:
            epoch, offset = divmod(step * self.pairs_per_batch * world, n)
            order = list(range(n))
            random.Random(sub_seed(self.seed, epoch)).shuffle(order)
            start = offset + rank * self.pairs_per_batch
            idx = [order[(start + k) % n] for k in range(self.pairs_per_batch)]
            chosen = [self.pairs[i] for i in idx]
            ref = torch.tensor([self._ref[i] for i in idx])  # [B,2]
            step += 1
            yield PairBatch(self._sequences(chosen), ref[:, 0], ref[:, 1], len(idx)), step

    def weight(self, batch: PairBatch) -> float:
        return 1.0  # the loss is already a mean over the batch's pairs

    def loss(
        self, model, batch: PairBatch, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        lp, mask = response_logprobs(model, batch.seqs, train_vision=self.train_vision)  # [2B,L]
        B = batch.pairs
        chosen_lp, rejected_lp = lp[:B], lp[B:]  # [B,L] each
        chosen_mask, rejected_mask = mask[:B], mask[B:]
        with torch.no_grad():
            batch_reward = implicit_reward_mean(
                sequence_logprobs(chosen_lp, chosen_mask),
                sequence_logprobs(rejected_lp, rejected_mask),
                batch.ref_chosen,
                batch.ref_rejected,
                self.weights.beta,
            )
        delta = self.running.update(batch_reward)  # δ includes this batch, as in TRL's bco_pair
        loss, metrics = mpo_loss(
            chosen_lp,
            chosen_mask,
            rejected_lp,
            rejected_mask,
            batch.ref_chosen,
            batch.ref_rejected,
            delta,
            self.weights,
        )
        metrics["pairs"] = float(B)
        return loss / normalizer, metrics


# ---- `tessera train mpo` -------------------------------------------------------------------------


@dataclass
class MPOData:
    """The mpo stage's data options (the `data` section of a run config). `sampling` is how the
    collection draws its answers; its seed is the stage's (the pair shuffles too). A run config may
    give the sampling fields flat (tessera.train.dataclass_from)."""

    pairs: str = (
        ""  # a pairs.jsonl to train on; "" → roll out the model now (or reuse out/pairs.jsonl)
    )
    out: str = ""  # folder for pairs.jsonl and queries.jsonl when collecting ("" → not written)
    queries: int = 512  # training queries rolled out
    families: dict[str, float] = field(
        default_factory=dict
    )  # family → weight; {} → default_rl_families()
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_pairs_per_query: int = 2
    pairs_per_batch: int = 8
    train_vision: bool = False
    reference: str = "auto"  # the frozen reference's log-probs: "rollout" (recorded) | "model" | "auto" (see MPOStage)
    dpo: float = 0.8
    bco: float = 0.2
    nll: float = 1.0
    beta: float = 0.1
    data: str = ""  # your preference pairs (MMPR style: image, question, chosen, rejected) instead of rollouts
    skip_bad_records: bool = False  # with data: drop (and count) bad rows instead of stopping


def collect_or_load(model, data: MPOData, log=print) -> CollectResult:
    """The offline rollouts: read `data.out`'s files when a previous run wrote them, else collect (and write).

    A model stored in bf16 is first cast to fp32, the precision MPO trains it in (tessera.train.trainer keeps fp32
    master weights): sampled so, the pairs' recorded log-probs are the reference's to ~1e-5 nats, where a bf16
    sampler's differ by ~2e-2 nats per token and MPO would have to score every pair again."""
    out = Path(data.out) if data.out else None
    if out is not None and (out / "pairs.jsonl").exists() and (out / "queries.jsonl").exists():
        info = (
            json.loads((out / "collect.json").read_text())
            if (out / "collect.json").exists()
            else {}
        )
        return CollectResult(
            read_pairs(out / "pairs.jsonl"),
            read_stats(out / "queries.jsonl"),
            float(info.get("cpu_seconds", 0.0)),
        )
    queries = training_queries(data.queries, data.families or None, data.sampling.seed)
    model.float()
    result = collect_preferences(
        model, queries, data.sampling, data.max_pairs_per_query, out, log=log
    )
    if out is not None:
        (out / "collect.json").write_text(
            json.dumps(
                {
                    "queries": len(result.stats),
                    "pairs": len(result.pairs),
                    "accuracy": result.accuracy,
                    "cpu_seconds": result.seconds,
                }
            )
            + "\n"
        )
    return result


def build_stage(model, data: MPOData | dict | None = None) -> MPOStage:
    d = dataclass_from(MPOData, data)
    if d.data:
        # here, not at the top: records_rl builds this module's PreferencePair (an import cycle)
        from tessera.train.records_rl import mpo_inputs

        pairs, prepared, report = mpo_inputs(model, d.data, d.skip_bad_records, d.train_vision)
        weights = MPOWeights(d.dpo, d.bco, d.nll, d.beta)
        stage = MPOStage(
            pairs,
            d.pairs_per_batch,
            weights,
            d.train_vision,
            d.sampling.seed,
            prepared=prepared,
            reference="model",
        )
        stage.scan_report = report
        return stage
    collected = (
        CollectResult(read_pairs(d.pairs), [], 0.0) if d.pairs else collect_or_load(model, d)
    )
    weights = MPOWeights(d.dpo, d.bco, d.nll, d.beta)
    return MPOStage(
        collected.pairs,
        d.pairs_per_batch,
        weights,
        d.train_vision,
        d.sampling.seed,
        prepared=dict(collected.prepared),
        reference=d.reference,
    )
