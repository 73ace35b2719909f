"""Stage `question_router`: train Tessera's question-aware router (tessera.model.question_router) per question.

ViCO's stage 2, asked per question instead of per image. The model is frozen; for every (tile i, answer a) of a
batch the label comes from the loss ratio of *that answer* with tile i at 1/16 against tile i at 1/4, in one or
both of two contexts:

    context "full"        r_full = (L_a(tile i at 1/16, the rest at 1/4) + eps) / (L_a(every tile at 1/4) + eps)
                          (the released router's ratio: what losing this tile's detail costs)
    context "compressed"  r_comp = (L_a(every tile at 1/16) + eps) / (L_a(tile i at 1/4, the rest at 1/16) + eps)
                          (what keeping this tile alone at 1/4 buys when the router compresses the others,
                          which is the situation a question router creates)
    context "mixed"       r_mix = L_a(tile i at 1/16 | m) / L_a(tile i at 1/4 | m), the other tiles as a random
                          mask m sets them (each at 1/16 with probability 1/2, drawn from the sample's index):
                          what tile i is worth in the half-compressed images a question router makes
    context "routed"      r_route = the same ratio with the other tiles as the question router now routes them
                          for one of the sample's questions (its thresholds in the config; the other
                          answers' rows get no score from this context): what tile i is worth where the
                          router puts it
    context "both"        r = max(r_full, r_comp); contexts join with "+" ("full+compressed+routed"), r the
                          largest of theirs

`measure="difference"` labels from how many nats the answer loses instead, d = L_a(…at 1/16) − L_a(…at 1/4)
in each context (d = max(d_full, d_comp) for "both"). A loss ratio treats a colour answer whose loss moves
0.001 → 0.01 (10×, nothing lost) like a label read wrongly, and a count whose loss moves 0.5 → 0.9 (1.8×, an
answer often lost) as cheap; the difference is the answer's log-likelihood lost. Measured on the tiny model
(docs/log/2026-12-03-question-router-difference.md): difference labels keep 6 % of colour and 10 % of shape
(tile, question) rows at 1/4 against 38 % and 42 % with ratios, but rank label tiles less sharply and keep no
more of count's; the router trained on them is better above 50 % fewer tokens and worse below, so "ratio"
stays the default.

"mixed" and "routed" were built for counts, measured on the tiny model and left as options
(docs/log/2026-12-04-question-router-contexts.md): a count whose loss is 0.02 with every tile at 1/4 and 0.02
with every tile at 1/16 can rise to 0.32 as the router mixes them, and restoring one tile mends 8 of 9 count
answers the router loses, which neither uniform context sees. Trained with "full+compressed+mixed" or
"full+compressed+routed", the router's count accuracy at 50 % fewer tokens stayed where it was (74-76 of 88)
and its curve was no better than "both", which stays the default.

"both" matters where evidence is duplicated: the thumbnail and a tile both show a shape, so compressing either
alone costs nothing (r_full ≈ 1 for each) while compressing both loses it; r_comp sees that either one rescues
the answer. Each ratio is exact (one variant per tile, all variants of a batch in batched LLM forwards).
A (tile, answer) pair is labelled *compress* when r < τ, τ = the k-th percentile of r over a sliding window;
the router reads the tile's last-layer ViT tokens and the answer's question (its mean token embedding) and is
trained with the 2-way softmax cross-entropy of the released router. One multi-question conversation per
image gives `turns` labelled questions for one ViT pass.

Labels are the expensive part (one LLM forward per tile variant) and do not depend on the router (the model is
frozen), so each labelled batch is kept in a replay buffer (the last `buffer_batches`): a step that labels a batch
is followed by `relabel_every - 1` steps that train on `rows_per_step` (tile, question) rows drawn from the buffer
(labels cut at the current τ). Measured on the tiny model: held-out AUC 0.84 after 400 such cheap updates on the
rows of 160 labelled images, while one update per labelled batch stayed at the label prior after 140 steps.

The stage adds the question router to a Flash model that lacks one (copied from its released router, so it
starts deciding as that one does) and writes its thresholds into the config it saves.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tessera.auc import auc
from tessera.routing import RoutingPolicy, question_vectors, route_patch_tokens
from tessera.train import dataclass_from
from tessera.train.conversations import file_stream
from tessera.train.data import Curriculum, Encoded, WorldStream, stream_batches
from tessera.train.router_stage import (
    HELDOUT_SEED,
    RatioWindow,
    SampleBatch,
    SampleGrouper,
    answer_losses,
    router_bce,
    router_labels,
    router_only,
)
from tessera.train.sft import SEED_OFFSET, default_families
from tessera.train.vico import shrink_image_tokens

ROUTED = RoutingPolicy(
    "question"
)  # the "routed" context's policy: the model's own question thresholds
CONTEXTS = ("full", "compressed", "mixed", "routed")  # joined with "+"; "both" = "full+compressed"
MEASURES = ("ratio", "difference")


def context_parts(context: str) -> tuple[str, ...]:
    """The contexts `context` scores in: "both" or CONTEXTS joined with "+" (ValueError otherwise)."""
    parts = tuple(("full+compressed" if context == "both" else context).split("+"))
    if not parts or any(p not in CONTEXTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"context must be one of {', '.join(CONTEXTS)} or several joined with '+' "
            f"('both' = 'full+compressed'), got {context!r}"
        )
    return parts


def check_labelling(context: str, measure: str) -> None:
    """Raise ValueError unless `context` and `measure` name a way to label (context_parts, MEASURES)."""
    context_parts(context)
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")


@dataclass
class QuestionRatios:
    """One row per (sample, answer, tile) of a batch."""

    r: torch.Tensor  # [M] the score the label is cut from (a loss ratio, or a difference in nats)
    r_full: torch.Tensor  # [M] in the released context (nan when not computed)
    r_compressed: torch.Tensor  # [M] in the compressed context (nan when not computed)
    r_mixed: torch.Tensor  # [M] in the mixed context (nan when not computed)
    r_routed: torch.Tensor  # [M] in the routed context (nan when not computed or another answer's)
    tile: torch.Tensor  # [M] long: row of `patch_tokens`
    question: torch.Tensor  # [M] long: row of `questions`
    patch_tokens: torch.Tensor  # [ΣN, P, Cv] last-layer ViT tokens
    questions: list[str]  # [ΣA] every answer's question, sample by sample


def mixed_mask(k: int, index: int) -> list[bool]:
    """The mixed context's random mask for a sample of k tiles: each at 1/16 with probability 1/2, drawn from
    the sample's stream index (so a sample is labelled the same every time)."""
    draw = torch.rand(k, generator=torch.Generator().manual_seed(int(index) & 0xFFFFFFFF))
    return (draw < 0.5).tolist()


def _variants(bases: list[list[bool]]) -> list[list[bool]]:
    """The compress masks one sample is scored under: each context's base mask, then that base with each
    tile flipped in turn."""
    out = []
    for base in bases:
        out += [base] + [[c != (i == j) for i, c in enumerate(base)] for j in range(len(base))]
    return out


def routed_row(
    model,
    sample: Encoded,
    compress: list[bool],
    feats_full: torch.Tensor,
    feats_small: torch.Tensor,
) -> tuple[list[int], list[int], torch.Tensor]:
    """`sample` (Encoded at 1/4) with tile i at 1/16 wherever compress[i], as an (ids, loss_mask,
    features) row for `answer_losses`; feats_full [k, t1, D] and feats_small [k, t2, D] are its tiles'
    features through each projector."""
    cfg = model.config
    full, small = cfg.tokens_per_tile, cfg.compressed_tokens_per_tile
    enc = (
        shrink_image_tokens(sample, compress, full, small, cfg.image_context_token_id)
        if any(compress)
        else sample
    )
    feats = torch.cat([feats_small[i] if c else feats_full[i] for i, c in enumerate(compress)])
    return enc.input_ids, enc.loss_mask, feats  # feats [tokens, D]


def projected_tiles(model, samples: list[Encoded]) -> tuple[torch.Tensor, ...]:
    """The frozen vision side of `samples` once: last-layer ViT tokens [ΣN, P, Cv] and every tile's
    features through the 1/4 projector [ΣN, t1, D] and the 1/16 one [ΣN, t2, D]."""
    cfg = model.config
    device = next(model.parameters()).device
    grid = model.vision_tokens(
        torch.cat([s.pixel_values for s in samples]).to(device)
    )  # [ΣN,h,w,Cv]
    n = grid.shape[0]
    feats_full = model.project(grid, None)[0].view(n, cfg.tokens_per_tile, -1)
    every = torch.ones(n, dtype=torch.bool)
    feats_small = model.project(grid, every)[0].view(n, cfg.compressed_tokens_per_tile, -1)
    return grid.reshape(n, -1, grid.shape[-1]), feats_full, feats_small


@torch.no_grad()
def question_tile_ratios(
    model,
    samples: list[Encoded],
    context: str = "both",
    eps: float = 1e-3,
    chunk: int = 16,
    measure: str = "ratio",
) -> QuestionRatios:
    """Exact per-(tile, answer) loss ratios (or differences) for `samples` (Encoded at 1/4, each with its
    `questions`)."""
    check_labelling(context, measure)

    def worse_than(small: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
        """How much worse the answer is with less detail (`small`) than with more (`large`)."""
        return (small + eps) / (large + eps) if measure == "ratio" else small - large

    pad_id = getattr(getattr(model, "tokenizer", None), "pad_id", 0)
    tokens, feats_full, feats_small = projected_tiles(model, samples)  # [ΣN,P,Cv], [ΣN,t,D] ×2
    parts = context_parts(context)
    if "routed" in parts and getattr(model, "question_router", None) is None:
        raise ValueError("context 'routed' needs the question router (model.add_question_router())")
    rows, plan, offset = [], [], 0
    for s in samples:
        k, bases = s.pixel_values.shape[0], []
        # the "routed" context routes for one of the sample's questions, a different one per sample
        routed_answer = int(s.index) % max(1, len(s.questions))
        for part in parts:
            if (
                part == "routed"
            ):  # the decision serving makes, under the config's question thresholds
                question = [s.questions[routed_answer]]
                decision = route_patch_tokens(
                    model, tokens[offset : offset + k], [k], ROUTED, question
                )
                bases.append(decision.compress.tolist())
            elif part == "mixed":
                bases.append(mixed_mask(k, s.index))
            else:  # every tile at 1/4 ("full") or every tile at 1/16 ("compressed")
                bases.append([part == "compressed"] * k)
        for compress in _variants(bases):
            rows.append(
                routed_row(
                    model,
                    s,
                    compress,
                    feats_full[offset : offset + k],
                    feats_small[offset : offset + k],
                )
            )
        plan.append((k, offset, bases, routed_answer))
        offset += k
    losses = answer_losses(model, rows, pad_id, chunk)  # one [A_s] per row
    per_context = {part: [] for part in CONTEXTS}
    tiles, qs, questions, at = [], [], [], 0
    for s, (k, first, bases, routed_answer) in zip(samples, plan):
        answers = losses[at].numel()
        if len(s.questions) != answers:
            raise ValueError(
                f"sample {s.index}: {answers} answers but {len(s.questions)} questions "
                "(the question router needs each answered turn's question)"
            )
        nan = torch.full((k, answers), float("nan"))
        scores = dict.fromkeys(CONTEXTS, nan)  # each [k, A]
        for part, base in zip(parts, bases):
            loss_base, flipped = losses[at], torch.stack(losses[at + 1 : at + 1 + k])  # [A], [k, A]
            at += k + 1
            masked = torch.as_tensor(base)[:, None]  # [k, 1]: tile i at 1/16 in the base
            scores[part] = worse_than(  # tile i at 1/16 against tile i at 1/4, the rest as the base
                torch.where(masked, loss_base, flipped), torch.where(masked, flipped, loss_base)
            )
            if part == "routed":  # only the routed question's answer saw its router's mask
                scores[part][:, torch.arange(answers) != routed_answer] = float("nan")
        for part in CONTEXTS:
            per_context[part].append(scores[part].T.reshape(-1))  # [A·k], answer-major
        tiles.append((first + torch.arange(k)).repeat(answers))  # [A·k]
        qs.append((len(questions) + torch.arange(answers)).repeat_interleave(k))  # [A·k]
        questions += list(s.questions)
    scored = {part: torch.cat(per_context[part]) for part in CONTEXTS}  # each [M]
    r = torch.stack(list(scored.values())).nan_to_num(float("-inf")).amax(0)  # [M]
    keep = r > float("-inf")  # rows no context scored (another answer's routing only) are left out
    return QuestionRatios(
        r=r[keep],
        r_full=scored["full"][keep],
        r_compressed=scored["compressed"][keep],
        r_mixed=scored["mixed"][keep],
        r_routed=scored["routed"][keep],
        tile=torch.cat(tiles)[keep],
        question=torch.cat(qs)[keep],
        patch_tokens=tokens,
        questions=questions,
    )


def question_router_scores(model, ratios: QuestionRatios) -> torch.Tensor:
    """The question router's logits [M, 2] for every (tile, answer) row of `ratios`."""
    vectors = question_vectors(model, ratios.questions).to(ratios.patch_tokens.device)  # [ΣA, Dl]
    return model.question_router(ratios.patch_tokens[ratios.tile], vectors[ratios.question])


def is_question_router_weight(name: str) -> bool:
    """Only the question router's weights move (the released router is in the same component)."""
    return name.startswith("question_router.")


def install_question_router(model, thresholds: tuple[float | None, float | None]) -> None:
    """Give `model` its question router (a copy of the released one where it has none) and write the
    (relative, absolute) thresholds that are not None into the config the checkpoint saves."""
    model.add_question_router()
    relative, absolute = thresholds
    if relative is not None:
        model.config.flash.question_relative_threshold = float(relative)
    if absolute is not None:
        model.config.flash.question_absolute_threshold = float(absolute)


@dataclass
class Replay:
    """A step that trains on rows of the replay buffer only (no new labels)."""

    rows: int


@dataclass
class LabelledRows:
    """One labelled batch as the buffer keeps it: tile tokens once, the rows as indices."""

    patch_tokens: torch.Tensor  # [ΣN, P, Cv]
    vectors: torch.Tensor  # [ΣA, Dl] question embeddings
    tile: torch.Tensor  # [M] long
    question: torch.Tensor  # [M] long
    r: torch.Tensor  # [M]


class ReplayGrouper:
    """SampleGrouper's batches, each followed by `relabel_every - 1` Replay steps (a resumed stream starts
    with a labelled batch again: the buffer is stage state and is not checkpointed)."""

    def __init__(self, size: int, relabel_every: int, rows: int):
        if relabel_every < 1 or rows < 1:
            raise ValueError(
                f"need relabel_every >= 1 and rows_per_step >= 1, got {relabel_every}, {rows}"
            )
        self.group, self.relabel_every, self.rows = SampleGrouper(size), relabel_every, rows

    def __call__(self, stream):
        for batch, position in self.group(stream):
            yield batch, position
            for _ in range(self.relabel_every - 1):
                yield Replay(self.rows), position


@dataclass
class QuestionRouterStage:
    make: object  # global stream index → Encoded at 1/4 (a picklable WorldStream or ConversationStream)
    samples_per_batch: int = 8
    percentile: float = (
        70.0  # k: τ is the k-th percentile of r; about k % of (tile, question) rows compress
    )
    window: int = 4096  # (tile, question) rows in the sliding window
    context: str = "both"
    eps: float = 1e-3
    workers: int = 1
    name: str = "question_router"
    measure: str = "ratio"  # "difference": label from the nats an answer loses (module docstring)
    trainable: dict[str, bool] = field(default_factory=router_only)
    component_lr: dict[str, float] = field(default_factory=dict)
    heldout: int = 32  # held-out conversations for `eval_fn`
    thresholds: tuple[float | None, float | None] = (None, None)  # (relative, absolute) to ship
    relabel_every: int = 4  # steps per labelled batch (the others replay the buffer)
    rows_per_step: int = 128  # (tile, question) rows per update
    buffer_batches: int = 32  # labelled batches the replay buffer keeps
    seed: int = 0

    def __post_init__(self) -> None:
        check_labelling(self.context, self.measure)  # at build time, before any labelling
        self._window = RatioWindow(self.window, self.percentile)
        self._heldout: list[Encoded] | None = None
        self._buffer: deque[LabelledRows] = deque(maxlen=self.buffer_batches)
        self._draws = torch.Generator().manual_seed(self.seed)
        self._tau = float("nan")

    param_filter = staticmethod(is_question_router_weight)

    def setup(self, model) -> None:
        install_question_router(model, self.thresholds)

    def eval_fn(self, model, step: int) -> dict[str, float]:
        """Per-question accuracy and AUC on held-out conversations (every `eval_every` steps)."""
        if self._heldout is None:
            self._heldout = heldout_stream_samples(self.make, self.heldout)
        return evaluate_question_router(
            model, self._heldout, self.percentile, self.context, self.eps, measure=self.measure
        )

    def batches(self, position: int, rank: int, world: int) -> Iterator[tuple[object, int]]:
        grouper = ReplayGrouper(self.samples_per_batch, self.relabel_every, self.rows_per_step)
        return stream_batches(self.make, grouper, position, rank, world, self.workers)

    def weight(self, batch) -> float:
        return float(self.rows_per_step)

    def label(self, model, batch: SampleBatch) -> None:
        """Exact per-question ratios of `batch` into the buffer and the sliding window."""
        ratios = question_tile_ratios(
            model, batch.samples, self.context, self.eps, measure=self.measure
        )
        self._tau = self._window.update(ratios.r)
        vectors = question_vectors(model, ratios.questions)  # [ΣA, Dl]
        self._buffer.append(
            LabelledRows(ratios.patch_tokens, vectors, ratios.tile, ratios.question, ratios.r)
        )

    def loss(self, model, batch, normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
        model.eval()  # the frozen model labels in eval mode ...
        if isinstance(batch, SampleBatch):
            self.label(model, batch)
        elif (
            not self._buffer
        ):  # cannot happen through `batches`, which starts with a labelled batch
            raise ValueError("a replay step before any labelled batch: nothing to train on")
        model.question_router.train()  # ... while the router trains with its dropout
        sizes = torch.tensor([len(b.r) for b in self._buffer])  # rows per buffered batch
        ends = sizes.cumsum(0)
        pick = torch.randint(0, int(ends[-1]), (self.rows_per_step,), generator=self._draws)
        owner = torch.bucketize(pick, ends, right=True)  # [R] the buffered batch of each row
        tokens, vectors, r = [], [], []
        for b in owner.unique().tolist():
            chunk, rows = self._buffer[b], pick[owner == b] - (ends[b] - sizes[b])
            tokens.append(chunk.patch_tokens[chunk.tile[rows]])  # [R_b, P, Cv]
            vectors.append(chunk.vectors[chunk.question[rows]])  # [R_b, Dl]
            r.append(chunk.r[rows])
        labels = router_labels(torch.cat(r), self._tau)  # [R]
        logits = model.question_router(torch.cat(tokens), torch.cat(vectors))  # [R, 2]
        loss, metrics = router_bce(logits, labels, normalizer)
        metrics.update(
            tau=self._tau,
            labelled=float(isinstance(batch, SampleBatch)),
            buffer_rows=float(ends[-1]),
        )
        return loss, metrics


def heldout_stream_samples(stream, n: int, seed: int = HELDOUT_SEED) -> list[Encoded]:
    """n held-out samples drawn as `stream` draws its own: a WorldStream's eval split, or a user file's first
    n records (in file order)."""
    if isinstance(stream, WorldStream):
        held = dataclasses.replace(stream, split="eval", seed=seed)
        return [held(i) for i in range(n)]
    unshuffled = dataclasses.replace(
        stream, source=dataclasses.replace(stream.source, shuffle=False)
    )
    return [unshuffled(i) for i in range(min(n, len(stream.source)))]


@torch.no_grad()
def evaluate_question_router(
    model,
    samples: list[Encoded],
    percentile: float = 70.0,
    context: str = "both",
    eps: float = 1e-3,
    chunk_samples: int = 8,
    measure: str = "ratio",
) -> dict[str, float]:
    """The question router against exact per-question labels on `samples` (τ: their own k-th percentile),
    beside the released router scored on the same rows (it sees the tile only)."""
    was_training = model.training
    model.eval()
    rs, ps, released = [], [], []
    for lo in range(0, len(samples), chunk_samples):
        ratios = question_tile_ratios(
            model, samples[lo : lo + chunk_samples], context, eps, measure=measure
        )
        rs.append(ratios.r)
        ps.append(torch.softmax(question_router_scores(model, ratios).float(), -1)[:, 0])
        released.append(model.router.p_compress(ratios.patch_tokens)[ratios.tile])
    model.train(was_training)
    r, p, p_released = torch.cat(rs), torch.cat(ps), torch.cat(released)  # [M] each
    tau = float(torch.quantile(r, percentile / 100))
    labels = router_labels(r, tau)
    pred = p >= 0.5
    return {
        "rows": float(r.numel()),
        "tau": tau,
        "accuracy": float((pred == labels).float().mean()),
        "auc": auc(p, labels),
        "released_auc": auc(p_released, labels),
        "label_compress": float(labels.float().mean()),
        "predicted_compress": float(pred.float().mean()),
    }


@dataclass
class QuestionRouterData:
    samples_per_batch: int = 8
    percentile: float = 70.0
    window: int = 4096
    context: str = "both"
    eps: float = 1e-3
    workers: int = 1
    thinking_prob: float = 0.5
    heldout: int = 32
    families: dict[str, float] | None = None  # the questions asked (None: sft's families)
    turns: int = 4  # questions per image, each labelled on its own
    relative_threshold: float | None = None  # the question router's thresholds the checkpoint ships
    absolute_threshold: float | None = None
    data: str | None = (
        None  # your conversations (tessera.data): each turn's question labels the tiles
    )
    skip_bad_records: bool = False
    relabel_every: int = 4  # steps per labelled batch; the others replay the buffer
    rows_per_step: int = 128
    buffer_batches: int = 32
    measure: str = "ratio"  # or "difference" (nats lost; the module docstring says why)


def build_stage(model, data: QuestionRouterData | dict | None = None) -> QuestionRouterStage:
    """The question router stage on the SFT stream (same seeds and families as `sft`), or on `data.data`."""
    data = dataclass_from(QuestionRouterData, data)
    if data.data is not None:
        stream, report = file_stream(
            model, data.data, model.config.language.max_position_embeddings, data.skip_bad_records
        )
    else:
        stream, report = (
            WorldStream(
                model.tokenizer,
                model.config,
                families=dict(data.families) if data.families else default_families(),
                thinking_prob=data.thinking_prob,
                curriculum=Curriculum(((0, 1.0),)),
                seed=SEED_OFFSET,
                turns=data.turns,
            ),
            None,
        )
    stage = QuestionRouterStage(
        stream,
        data.samples_per_batch,
        data.percentile,
        data.window,
        data.context,
        data.eps,
        data.workers,
        heldout=data.heldout,
        thresholds=(data.relative_threshold, data.absolute_threshold),
        relabel_every=data.relabel_every,
        rows_per_step=data.rows_per_step,
        buffer_batches=data.buffer_batches,
        measure=data.measure,
    )
    if report is not None:
        stage.scan_report = report
    return stage
