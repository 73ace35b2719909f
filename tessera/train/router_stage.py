"""Stage `router` (ViCO stage 2): train only the Visual Resolution Router; every other weight is frozen.

Labels come from the frozen model itself. For each tile i of a sample, the loss ratio
    r_i = mean over the sample's answers a of L_a(tile i at 1/16, every other tile at 1/4) / L_a(every tile at 1/4)
is computed exactly: one tile compressed at a time, all variants of a batch in one LLM forward (the ViT runs
once per tile; both projector branches are cheap). L_a is answer a's mean token cross-entropy; a small `eps` is
added to numerator and denominator so that answers the model is already sure of (L ≈ 0) give r ≈ 1 instead of
noise. With several questions per image (`turns`) each answer weighs the same: a one-token spatial answer that
needs the thumbnail counts as much as a worked chain that needs a label's tile. A tile is labelled *compress*
when r_i < τ, τ = the k-th percentile of r over a sliding window of recent tiles (so about k % of tiles are
labelled compress whatever the absolute loss scale).
The router reads the tile's last-layer ViT tokens (never the question) and is trained with binary
cross-entropy on these labels (2-way softmax CE, class 0 = compress, exactly the released output).

The sliding window is stage state and is not checkpointed: after a resume it refills within
`window / tiles-per-batch` steps, before which τ comes from the tiles seen since the restart.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tessera.auc import auc
from tessera.image import ImageProcessor
from tessera.model.router import COMPRESS, KEEP
from tessera.train import dataclass_from
from tessera.train.conversations import file_stream
from tessera.train.data import Curriculum, Encoded, WorldStream, encode, stream_batches
from tessera.train.sft import SEED_OFFSET, default_families
from tessera.train.vico import shrink_image_tokens
from tessera.world import FAMILIES, make_sample


@dataclass
class TileRatios:
    r: torch.Tensor  # [ΣN] loss ratio per tile
    loss_full: torch.Tensor  # [S] each sample's answer loss with every tile at 1/4
    loss_tile: torch.Tensor  # [ΣN] the sample's loss with only that tile at 1/16
    tiles_per_sample: list[int]
    patch_tokens: torch.Tensor  # [ΣN, P, Cv] last-layer ViT tokens (what the router reads)


@dataclass
class AnswerScores:
    """What the frozen model makes of each answer of one row, teacher-forced."""

    nats: torch.Tensor  # [A] the answer's summed cross-entropy
    tokens: torch.Tensor  # [A] its tokens
    misses: (
        torch.Tensor
    )  # [A] tokens whose argmax is not the answer's token (0: greedy reproduces it)

    @property
    def mean(self) -> torch.Tensor:
        return self.nats / self.tokens.clamp_min(1.0)  # [A] mean cross-entropy


def answer_scores(
    model, rows: list[tuple[list[int], list[int], torch.Tensor]], pad_id: int, chunk: int
) -> list[AnswerScores]:
    """Every answer of each (ids, loss_mask, features) row, scored: R AnswerScores of [A_r] each.

    An answer is a maximal run of loss-mask tokens (one per turn of a multi-question sample). Rows are sorted by
    length and run `chunk` at a time with right padding (causal attention, so padding after a row's end changes
    nothing), which keeps the padded compute close to the real tokens.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out: list[AnswerScores | None] = [None] * len(rows)
    device = next(model.parameters()).device
    for lo in range(0, len(rows), chunk):
        idx = order[lo : lo + chunk]
        part = [rows[i] for i in idx]
        L = max(len(ids) for ids, _, _ in part)
        ids = torch.full((len(part), L), pad_id, dtype=torch.long)
        mask = torch.zeros(len(part), L, dtype=torch.bool)
        for b, (row_ids, row_mask, _) in enumerate(part):
            ids[b, : len(row_ids)] = torch.tensor(row_ids)
            mask[b, : len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(
            ids, image_features=torch.cat([f for _, _, f in part]).to(device)
        )  # [R,L,V], causal: padding is after
        ce = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
        )  # [R,L-1]
        miss = (logits[:, :-1].argmax(-1) != ids[:, 1:]).float()  # [R,L-1]
        target = mask[
            :, 1:
        ]  # [R,L-1] position t predicts token t+1, a loss token when its mask is set
        starts = target & ~F.pad(target[:, :-1], (1, 0))  # [R,L-1] first token of each answer
        # [R,L-1] answer index, -1 elsewhere
        answer = (starts.long().cumsum(1) - 1).masked_fill(~target, -1)
        for b, i in enumerate(idx):
            n, keep = int(starts[b].sum()), answer[b] >= 0
            at = answer[b][keep]

            def per_answer(values: torch.Tensor) -> torch.Tensor:
                return torch.zeros(n, device=device).index_add_(0, at, values).cpu()  # [A]

            out[i] = AnswerScores(
                per_answer(ce[b][keep]),
                per_answer(torch.ones_like(ce[b][keep])),
                per_answer(miss[b][keep]),
            )
    return out


def answer_losses(
    model, rows: list[tuple[list[int], list[int], torch.Tensor]], pad_id: int, chunk: int
) -> list[torch.Tensor]:
    """Mean cross-entropy of every answer of each row → R tensors [A_r] (answer_scores' `mean`)."""
    return [s.mean for s in answer_scores(model, rows, pad_id, chunk)]


@torch.no_grad()
def tile_loss_ratios(
    model, samples: list[Encoded], eps: float = 1e-3, chunk: int = 16
) -> TileRatios:
    """Exact per-tile loss ratios for `samples` (Encoded at 1/4) under the model as it is (call in eval mode)."""
    cfg = model.config
    full, small, ctx = (
        cfg.tokens_per_tile,
        cfg.compressed_tokens_per_tile,
        cfg.image_context_token_id,
    )
    pad_id = getattr(getattr(model, "tokenizer", None), "pad_id", 0)
    pixel_values = torch.cat([s.pixel_values for s in samples])  # [ΣN,3,S,S]
    grid = model.vision_tokens(pixel_values)  # [ΣN,h,w,Cv]
    n = grid.shape[0]
    feats_full = model.project(grid, None)[0].view(n, full, -1)  # [ΣN,t1,D]
    feats_small = model.project(grid, torch.ones(n, dtype=torch.bool))[0].view(
        n, small, -1
    )  # [ΣN,t2,D]
    rows, tiles, offset = [], [], 0
    for s in samples:
        k = s.pixel_values.shape[0]
        tiles.append(k)
        for v in range(k + 1):  # v = 0: every tile at 1/4; v = i + 1: only tile i at 1/16
            compress = [i == v - 1 for i in range(k)]
            enc = shrink_image_tokens(s, compress, full, small, ctx) if v else s
            feats = torch.cat(
                [
                    feats_small[offset + i] if c else feats_full[offset + i]
                    for i, c in enumerate(compress)
                ]
            )
            rows.append((enc.input_ids, enc.loss_mask, feats))
        offset += k
    losses = answer_losses(model, rows, pad_id, chunk)  # Σ(N_s + 1) rows, each [A_s]
    base, per_tile, ratios, at = [], [], [], 0
    for k in tiles:
        full_a = losses[at]  # [A] each answer's loss with every tile at 1/4
        base.append(full_a.mean())
        for i in range(k):
            tile_a = losses[at + 1 + i]  # [A] ... with tile i at 1/16
            per_tile.append(tile_a.mean())
            ratios.append(
                ((tile_a + eps) / (full_a + eps)).mean()
            )  # every answer (question) weighs the same
        at += k + 1
    loss_full = torch.stack(base)  # [S]
    loss_tile = torch.stack(per_tile)  # [ΣN]
    r = torch.stack(ratios)  # [ΣN]
    return TileRatios(r, loss_full, loss_tile, tiles, grid.reshape(n, -1, grid.shape[-1]))


@dataclass
class SampleBatch:
    samples: list[Encoded]

    @property
    def tiles(self) -> int:
        return sum(s.pixel_values.shape[0] for s in self.samples)


class SampleGrouper:
    """Groups the sample stream `size` at a time (no packing: each sample is expanded into its tile variants)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"samples per batch must be >= 1, got {size}")
        self.size = size

    def __call__(self, stream: Iterable[tuple[int, Encoded]]) -> Iterator[tuple[SampleBatch, int]]:
        group: list[Encoded] = []
        for position, enc in stream:
            if len(group) == self.size:
                yield SampleBatch(group), position
                group = []
            group.append(enc)


class RatioWindow:
    """The last `size` loss ratios; τ = their k-th percentile."""

    def __init__(self, size: int, percentile: float):
        if not 0 < percentile < 100 or size < 1:
            raise ValueError(
                f"need 0 < percentile < 100 and window >= 1 (got {percentile}, {size})"
            )
        self.values: deque[float] = deque(maxlen=size)
        self.percentile = percentile

    def update(self, r: torch.Tensor) -> float:
        self.values.extend(float(x) for x in r.flatten())
        return float(torch.quantile(torch.tensor(list(self.values)), self.percentile / 100))


def router_labels(r: torch.Tensor, tau: float) -> torch.Tensor:
    """bool [N]: True = compress (compressing this tile costs relatively little answer loss)."""
    return r < tau


def router_bce(
    logits: torch.Tensor, compress: torch.Tensor, normalizer: float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Binary cross-entropy of the router's 2-way softmax: logits [N,2], compress bool [N] → (Σ CE / normalizer, metrics)."""
    target = torch.where(compress, COMPRESS, KEEP)  # [N] class index
    ce = F.cross_entropy(logits.float(), target, reduction="none")  # [N]
    loss = ce.sum() / (normalizer if normalizer is not None else max(1, ce.numel()))
    with torch.no_grad():
        pred = logits.argmax(-1) == COMPRESS  # [N]
        acc = float((pred == compress).float().mean()) if ce.numel() else 0.0
    return loss, {
        "bce": float(ce.detach().mean()) if ce.numel() else 0.0,
        "router_acc": acc,
        "label_compress": float(compress.float().mean()) if ce.numel() else 0.0,
    }


def router_only() -> dict[str, bool]:
    """The trainable components of the router stages: the routers; every other weight is frozen."""
    return {"vision": False, "connector": False, "language": False, "router": True}


@dataclass
class RouterStage:
    make: object  # global stream index → Encoded at 1/4 (a picklable WorldStream)
    samples_per_batch: int = 8
    percentile: float = 50.0  # k: τ is the k-th percentile of r
    window: int = 1024  # tiles in the sliding window
    eps: float = 1e-3
    workers: int = 1
    name: str = "router"
    trainable: dict[str, bool] = field(default_factory=router_only)
    component_lr: dict[str, float] = field(default_factory=dict)
    heldout: int = 48  # samples for `eval_fn`
    thresholds: tuple[float | None, float | None] = (
        None,
        None,
    )  # (relative, absolute) to ship; None keeps the config's
    heldout_families: list[str] | None = (
        None  # families of the held-out tiles (None: every question family)
    )

    def __post_init__(self) -> None:
        self._window = RatioWindow(self.window, self.percentile)
        self._heldout: list[Encoded] | None = None

    def eval_fn(self, model, step: int) -> dict[str, float]:
        """Router accuracy on held-out tiles (the trainer calls this every `eval_every` steps)."""
        if (
            self._heldout is None
        ):  # several questions per image: the training stream itself, on the eval split
            multi = getattr(self.make, "turns", 1) > 1
            self._heldout = (
                heldout_conversations(self.make, self.heldout)
                if multi
                else heldout_samples(model, self.heldout, families=self.heldout_families)
            )
        return evaluate_router(model, self._heldout, self.percentile, self.eps)

    def setup(self, model) -> None:
        if model.router is None:
            raise ValueError(
                "the router stage needs a Flash model (config.flash.enabled): this one has no router"
            )
        relative, absolute = (
            self.thresholds
        )  # written into the config, so the saved checkpoint carries them
        if relative is not None:
            model.config.flash.relative_threshold = float(relative)
        if absolute is not None:
            model.config.flash.absolute_threshold = float(absolute)

    def batches(self, position: int, rank: int, world: int) -> Iterator[tuple[SampleBatch, int]]:
        return stream_batches(
            self.make, SampleGrouper(self.samples_per_batch), position, rank, world, self.workers
        )

    def weight(self, batch: SampleBatch) -> float:
        return float(batch.tiles)

    def loss(
        self, model, batch: SampleBatch, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        model.eval()  # the frozen parts label in eval mode (no dropout in mlp2) ...
        router = model.router
        router.train()  # ... while the router trains with its released dropout
        ratios = tile_loss_ratios(model, batch.samples, self.eps)
        tau = self._window.update(ratios.r)
        labels = router_labels(ratios.r, tau)
        logits = router(ratios.patch_tokens)  # [ΣN,2]
        loss, metrics = router_bce(logits, labels, normalizer)
        metrics.update(
            tau=tau,
            r_mean=float(ratios.r.mean()),
            loss_full=float(ratios.loss_full.mean()),
            tiles=float(batch.tiles),
        )
        return loss, metrics


@torch.no_grad()
def evaluate_router(
    model,
    samples: list[Encoded],
    percentile: float = 50.0,
    eps: float = 1e-3,
    tau: float | None = None,
    chunk_samples: int = 8,
) -> dict[str, float]:
    """Router accuracy on held-out tiles: exact r, labels at τ (default: the k-th percentile of these tiles' r)."""
    was_training = model.training
    model.eval()
    rs, ps = [], []
    router = model.router
    for lo in range(0, len(samples), chunk_samples):
        ratios = tile_loss_ratios(model, samples[lo : lo + chunk_samples], eps)
        rs.append(ratios.r)
        ps.append(router.p_compress(ratios.patch_tokens))
    model.train(was_training)
    r, p = torch.cat(rs), torch.cat(ps)  # [N], [N]
    tau = float(torch.quantile(r, percentile / 100)) if tau is None else tau
    labels = router_labels(r, tau)
    pred = p >= 0.5
    tp = float((pred & labels).sum()) / max(1, int(labels.sum()))
    tn = float((~pred & ~labels).sum()) / max(1, int((~labels).sum()))
    return {
        "tiles": float(len(r)),
        "tau": tau,
        "accuracy": float((pred == labels).float().mean()),
        "balanced_accuracy": 0.5 * (tp + tn),
        "auc": auc(p, labels),
        "label_compress": float(labels.float().mean()),
        "predicted_compress": float(pred.float().mean()),
    }


@dataclass
class RouterData:
    samples_per_batch: int = 8
    percentile: float = 50.0
    window: int = 1024
    eps: float = 1e-3
    workers: int = 1
    thinking_prob: float = 0.5
    heldout: int = 48  # held-out samples for the router's tile accuracy (`eval_fn`, run every train.eval_every steps)
    # the questions whose loss ratios label the tiles (None: sft's families). A question reads a few tiles, so
    # most tiles' r is 1 plus noise; a scene description reads every label and entry, so r measures what a
    # tile's fine detail is worth to anything asked about it.
    families: dict[str, float] | None = None
    turns: int = 1  # questions per image: with more, more of an image's tiles matter to some answer in the loss
    relative_threshold: float | None = (
        None  # the decision thresholds the trained checkpoint ships with
    )
    absolute_threshold: float | None = None
    data: str | None = None  # your conversations (tessera.data): their loss ratios label the tiles
    skip_bad_records: bool = False  # with data: drop (and count) bad records instead of stopping


def build_stage(model, data: RouterData | dict | None = None) -> RouterStage:
    """The router stage on the SFT stream (same seeds as `sft`; its families unless `data.families` names others)."""
    data = dataclass_from(RouterData, data)
    if data.data is not None:
        return file_router_stage(model, data)
    families = dict(data.families) if data.families else default_families()
    stream = WorldStream(
        model.tokenizer,
        model.config,
        families=families,
        thinking_prob=data.thinking_prob,
        curriculum=Curriculum(((0, 1.0),)),
        seed=SEED_OFFSET,
        turns=data.turns,
    )
    return RouterStage(
        stream,
        data.samples_per_batch,
        data.percentile,
        data.window,
        data.eps,
        data.workers,
        heldout=data.heldout,
        thresholds=(data.relative_threshold, data.absolute_threshold),
        heldout_families=sorted(data.families) if data.families else None,
    )


def file_router_stage(model, data: RouterData) -> RouterStage:
    """The router stage on a user's conversations; the held-out tiles are the file's first `heldout` records."""
    stream, report = file_stream(
        model, data.data, model.config.language.max_position_embeddings, data.skip_bad_records
    )
    stage = RouterStage(
        stream,
        data.samples_per_batch,
        data.percentile,
        data.window,
        data.eps,
        data.workers,
        heldout=data.heldout,
        thresholds=(data.relative_threshold, data.absolute_threshold),
    )
    unshuffled = dataclasses.replace(
        stream, source=dataclasses.replace(stream.source, shuffle=False)
    )
    stage._heldout = [unshuffled(i) for i in range(min(data.heldout, len(stream.source)))]
    stage.scan_report = report
    return stage


HELDOUT_SEED = 2_000_000  # the held-out tiles' scene seeds (eval split)


def heldout_conversations(stream, n: int, seed: int = HELDOUT_SEED) -> list[Encoded]:
    """n eval-split conversations drawn exactly as the training `stream` (a WorldStream) draws its own (families,
    turns, thinking), so the held-out labels measure what the training labels measure."""
    held = dataclasses.replace(stream, split="eval", seed=seed)
    return [held(i) for i in range(n)]


def heldout_samples(
    model, n: int = 64, seed: int = HELDOUT_SEED, families: list[str] | None = None, turns: int = 1
) -> list[Encoded]:
    """n held-out (eval-split) world samples at 1/4 for `evaluate_router`. With turns = 1 each asks one question,
    of `families` (default: every question family) in turn; with more, each image is a conversation of `turns`
    questions from the router stage's own stream at its defaults (`heldout_conversations`)."""
    if turns > 1:
        data = {
            "turns": turns,
            "workers": 0,
            **({"families": dict.fromkeys(families, 1.0)} if families else {}),
        }
        return heldout_conversations(build_stage(model, data).make, n, seed)
    processor = ImageProcessor.from_config(model.config)
    families = families or FAMILIES
    out = []
    for i in range(n):
        s = make_sample(seed + i, family=families[i % len(families)], split="eval")
        out.append(
            encode(
                model.tokenizer,
                processor,
                model.config.tokens_per_tile,
                s.image,
                s.question,
                s.answer,
                family=s.family,
                index=seed + i,
            )
        )
    return out
