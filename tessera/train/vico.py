"""Stage `vico` (ViCO stage 1, Visual Consistency Learning): teach the model to answer the same from 1/16 tokens.

For every SFT sample, a frozen reference (the model as the stage starts, i.e. the SFT checkpoint) reads each
image at 1/4; the trained policy reads each image at ξ, drawn once per image uniformly from {1/4, 1/16}. The loss
is the square-averaged token KL(π_ref(y_t | I at 1/4) ‖ π(y_t | I at ξ)) over the answer tokens
(tessera.train.losses.kl_consistency). No ground-truth CE: the policy is distilled towards the reference, so the
compressed branch (mlp2) learns to carry what the reference reads at full resolution.

The two sequences of a sample differ only in the number of `<IMG_CONTEXT>` tokens, so their answer tokens are the
same in the same order: the KL is taken between `ref_logits[ref loss positions]` and `logits[policy loss
positions]` (checked position by position). ξ is a pure function of the sample's stream index, so resume is exact.
The router takes no part (it is trained afterwards by the `router` stage, on the model this stage produces).

With `ViCOData.grounding` > 0 the 1/16 tokens also get the dense grounding probe of the base stages
(tessera.train.grounding_losses, one linear head reading the 4×4 cells each 1/16 token covers): the KL alone tells mlp2
what the answers need only through a few answer tokens per sample, while the probe asks every 1/16 token of every
tile which object and which glyphs it covers — the fresh branch starts from nothing, as the projector once did.

With `ViCOData.branch = "compressed"` only mlp2 trains: the policy at 1/4 is then the reference itself (its KL is
0), so `compress_prob = 1.0` spends every sample on the 1/16 branch, and every answer under `full` routing stays
bit-identical — the way to continue ViCO on a finished Flash model without touching what it already does.

With `ViCOData.xi_per = "tile"` each tile draws its own ξ (Tessera's extension): the routers make images
that mix 1/4 and 1/16 tiles, which one ξ per image never shows the model.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tessera.model.connector import shuffle_factor
from tessera.seeds import sub_seed
from tessera.train import dataclass_from
from tessera.train.conversations import file_stream
from tessera.train.data import Batch, Curriculum, Encoded, WorldStream, collate, stream_batches
from tessera.train.grounding_losses import GroundingHead, grounding_loss
from tessera.train.losses import IGNORE, kl_consistency
from tessera.train.sft import SEED_OFFSET, default_families

XI_SEED = 0x51C0  # mixes the ξ draw with the stream index
XI_UNITS = (
    "image",
    "tile",
)  # what one ξ applies to: the paper's per image, or each tile (mixed images)


def shrink_image_tokens(
    enc: Encoded, compress: list[bool], full: int, small: int, img_context_id: int
) -> Encoded:
    """The same sample with tile i's `<IMG_CONTEXT>` run cut from `full` to `small` tokens wherever compress[i].

    Tiles are in prompt order: tile i owns the i-th block of `full` context tokens (blocks never straddle images,
    each image's run is tiles × full). Returns a new Encoded with consistent `image_tokens`.
    """
    tiles_per_image = [t // full for t in enc.image_tokens]
    if any(t % full for t in enc.image_tokens) or sum(tiles_per_image) != len(compress):
        raise ValueError(
            f"sample {enc.index}: image tokens {enc.image_tokens} are not {len(compress)} tiles × {full}"
        )
    ids, mask = [], []
    seen = 0  # context tokens passed so far
    for tok, m in zip(enc.input_ids, enc.loss_mask):
        if tok == img_context_id:
            tile, offset = divmod(seen, full)
            seen += 1
            if compress[tile] and offset >= small:
                continue  # the tile keeps its first `small` slots
        ids.append(tok)
        mask.append(m)
    if seen != sum(enc.image_tokens):
        raise ValueError(
            f"sample {enc.index}: {seen} <IMG_CONTEXT> tokens in the prompt, image_tokens say {sum(enc.image_tokens)}"
        )
    image_tokens, start = [], 0
    for n in tiles_per_image:
        image_tokens.append(sum(small if c else full for c in compress[start : start + n]))
        start += n
    return Encoded(
        ids, mask, enc.pixel_values, image_tokens, enc.family, enc.index, questions=enc.questions
    )


def draw_xi(index: int, num_images: int, compress_prob: float = 0.5) -> list[bool]:
    """ξ per image of the sample at stream `index`: True = 1/16. Deterministic in the index."""
    rng = random.Random(sub_seed(XI_SEED, index))
    return [rng.random() < compress_prob for _ in range(num_images)]


@dataclass
class ViCOBatch:
    reference: Batch  # every image at 1/4
    policy: Batch  # each image at its ξ
    compress: torch.Tensor  # bool [ΣN tiles], the policy's tiles at 1/16
    small_positions: (
        torch.Tensor
    )  # bool [B,L'] of the policy batch: positions of samples with an image at 1/16


class PairPacker:
    """Packs (reference, policy) pairs into rows by the reference length; both batches get the same rows."""

    def __init__(
        self,
        rows: int,
        row_tokens: int,
        pad_id: int,
        full: int,
        small: int,
        img_context_id: int,
        compress_prob: float = 0.5,
        xi_per: str = "image",
    ):
        if xi_per not in XI_UNITS:
            raise ValueError(f"xi_per must be one of {', '.join(XI_UNITS)}, got {xi_per!r}")
        self.xi_per = xi_per
        self.rows, self.row_tokens, self.pad_id = rows, row_tokens, pad_id
        self.full, self.small, self.img_context_id, self.compress_prob = (
            full,
            small,
            img_context_id,
            compress_prob,
        )

    def pair(self, enc: Encoded) -> tuple[Encoded, Encoded, list[bool], bool]:
        tiles = [t // self.full for t in enc.image_tokens]
        if self.xi_per == "tile":  # each tile its own ξ: images that mix 1/4 and 1/16 tiles
            per_tile = draw_xi(enc.index, sum(tiles), self.compress_prob)
        else:
            xi = draw_xi(enc.index, len(enc.image_tokens), self.compress_prob)
            per_tile = [c for c, n in zip(xi, tiles) for _ in range(n)]
        policy = (
            shrink_image_tokens(enc, per_tile, self.full, self.small, self.img_context_id)
            if any(per_tile)
            else enc
        )
        return enc, policy, per_tile, any(per_tile)

    def _collate(self, rows: list[list[tuple[Encoded, Encoded, list[bool], bool]]]) -> ViCOBatch:
        ref = collate([[p[0] for p in row] for row in rows], self.pad_id)
        pol = collate([[p[1] for p in row] for row in rows], self.pad_id)
        small = torch.zeros_like(pol.segment_ids, dtype=torch.bool)  # [B,L']
        for b, row in enumerate(rows):
            for seg, p in enumerate(row, start=1):
                if p[3]:
                    small[b] |= pol.segment_ids[b] == seg
        compress = torch.tensor([c for row in rows for p in row for c in p[2]], dtype=torch.bool)
        return ViCOBatch(ref, pol, compress, small)

    def __call__(self, stream: Iterable[tuple[int, Encoded]]) -> Iterator[tuple[ViCOBatch, int]]:
        rows: list[list] = []
        used = 0
        for position, enc in stream:
            if len(enc) > self.row_tokens:
                raise ValueError(
                    f"sample {enc.index} has {len(enc)} tokens, more than row_tokens={self.row_tokens}"
                )
            item = self.pair(enc)
            if rows and used + len(enc) <= self.row_tokens:
                rows[-1].append(item)
                used += len(enc)
                continue
            if len(rows) == self.rows:
                yield self._collate(rows), position
                rows = []
            rows.append([item])
            used = len(enc)


@dataclass
class ViCOStage:
    """KL(reference at 1/4 ‖ policy at ξ) on SFT data; the reference is a frozen copy made in `setup`."""

    make: object  # global stream index → Encoded at 1/4 (a picklable WorldStream)
    packer: PairPacker
    workers: int = 1
    name: str = "vico"
    trainable: dict[str, bool] = field(default_factory=lambda: {"router": False})
    component_lr: dict[str, float] = field(default_factory=dict)
    reference: torch.nn.Module | None = None
    grounding: float = 0.0  # weight of the dense grounding loss on every tile's 1/16 tokens
    extra: torch.nn.Module | None = (
        None  # its head (tessera.train.grounding_losses.GroundingHead), when grounding > 0
    )
    param_filter: Callable[[str], bool] | None = None  # branch="compressed": only mlp2.* trains

    def setup(self, model: torch.nn.Module) -> None:
        model.add_flash_branch()  # an SFT model trained without Flash parts gets a fresh 1/16 branch and router
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def batches(self, position: int, rank: int, world: int) -> Iterator[tuple[ViCOBatch, int]]:
        return stream_batches(self.make, self.packer, position, rank, world, self.workers)

    def weight(self, batch: ViCOBatch) -> float:
        return batch.policy.weight_sum

    def loss(
        self, model: torch.nn.Module, batch: ViCOBatch, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.reference is None:
            raise RuntimeError(
                "ViCOStage.setup(model) must run before loss (it builds the frozen reference)"
            )
        ref, pol = batch.reference, batch.policy
        with torch.no_grad():
            ref_logits = self.reference(
                ref.input_ids,
                pixel_values=ref.pixel_values,
                position_ids=ref.position_ids,
                attn_mask=ref.attn_mask(),
            )  # [B,L,V]
        grid = model.vision_tokens(pol.pixel_values)  # [ΣN, h, w, Cv]
        features, _ = model.project(grid, batch.compress)  # [ΣT', D], each tile at its ξ
        logits = model(
            pol.input_ids,
            image_features=features,
            position_ids=pol.position_ids,
            attn_mask=pol.attn_mask(),
        )  # [B,L',V]
        rmask, pmask = ref.targets != IGNORE, pol.targets != IGNORE  # [B,L], [B,L']
        if not torch.equal(ref.targets[rmask], pol.targets[pmask]):
            raise ValueError(
                "reference and policy answer tokens differ: the pair sequences are misaligned"
            )
        ref_sel, pol_sel = (
            ref_logits[rmask],
            logits[pmask],
        )  # [M,V] each, the same answer tokens in order
        weights = pol.weights[pmask]  # [M]
        loss, metrics = kl_consistency(
            ref_sel[None], pol_sel[None], weights[None], normalizer
        )  # [1,M,V] each
        if self.grounding > 0:
            if ref.grounding is None or self.extra is None:
                raise ValueError(
                    "vico grounding needs samples with grounding targets and a head (build_stage makes both)"
                )
            every_small = torch.ones(grid.shape[0], dtype=torch.bool, device=grid.device)
            small, _ = model.project(grid, every_small)  # [ΣN·t16, D], every tile at 1/16
            share = pol.weight_sum / normalizer if normalizer else 1.0
            aux, aux_metrics = grounding_loss(
                self.extra,
                small,
                ref.grounding,
                model.config.flash.compressed_downsample_ratio,
                name="ground16",
            )
            loss = loss + self.grounding * share * aux
            metrics.update(aux_metrics)
        with torch.no_grad():
            ref_logp = F.log_softmax(ref_sel.float(), -1)  # [M,V]
            kl = (ref_logp.exp() * (ref_logp - F.log_softmax(pol_sel.float(), -1))).sum(-1)  # [M]
            small = batch.small_positions[pmask]  # [M]
            metrics["kl_at_1_16"] = float(kl[small].mean()) if bool(small.any()) else 0.0
            metrics["kl_at_1_4"] = float(kl[~small].mean()) if bool((~small).any()) else 0.0
            metrics["ce_policy"] = float(F.cross_entropy(pol_sel.float(), pol.targets[pmask]))
            metrics["compressed_tiles"] = float(batch.compress.float().mean())
        return loss, metrics


@dataclass
class ViCOData:
    rows: int = 8
    row_tokens: int = 512
    compress_prob: float = 0.5  # P(ξ = 1/16) per image
    workers: int = 1
    curriculum: tuple[tuple[int, float], ...] = ((0, 1.0),)
    thinking_prob: float = 0.5
    train_vision: bool = True  # the paper trains the whole model; False freezes the ViT
    grounding: float = (
        0.0  # weight of the dense grounding probe on the 1/16 tokens (see the module doc)
    )
    data: str | None = None  # your conversations (tessera.data) instead of the SFT world stream
    skip_bad_records: bool = False  # with data: drop (and count) bad records instead of stopping
    # "all": the paper's whole-model stage; "compressed": only the 1/16 branch (mlp2) trains, so the 1/4 path
    # (and every answer under `full`) stays bit-identical: continue ViCO on a finished model
    branch: str = "all"
    # "image": one ξ per image (the paper); "tile": one per tile, so images mix 1/4 and 1/16 tiles as a router
    # makes them (Tessera's extension: consistency where the routers put the model)
    xi_per: str = "image"


def compressed_branch_only(name: str) -> bool:
    """The parameters `branch="compressed"` trains: the 1/16 projector's."""
    return name.startswith("mlp2.")


def build_stage(model, data: ViCOData | dict | None = None) -> ViCOStage:
    """The ViCO stage on the SFT stream (same families and seeds as `sft`) for a Flash `model` with a tokenizer."""
    data = dataclass_from(ViCOData, data)
    if data.branch not in ("all", "compressed"):
        raise ValueError(f"vico branch must be 'all' or 'compressed', not {data.branch!r}")
    cfg, tok = model.config, model.tokenizer
    report = None
    if data.data is not None:
        if data.grounding > 0:
            raise ValueError(
                "vico grounding reads the world's scenes; a --data file has none (set grounding to 0)"
            )
        stream, report = file_stream(model, data.data, data.row_tokens, data.skip_bad_records)
    else:
        stream = WorldStream(
            tok,
            cfg,
            families=default_families(),
            thinking_prob=data.thinking_prob,
            curriculum=Curriculum(tuple(data.curriculum)),
            seed=SEED_OFFSET,
            grounding=data.grounding > 0,
        )
    packer = PairPacker(
        data.rows,
        data.row_tokens,
        tok.pad_id,
        cfg.tokens_per_tile,
        cfg.compressed_tokens_per_tile,
        cfg.image_context_token_id,
        data.compress_prob,
        data.xi_per,
    )
    trainable = {"router": False} if data.train_vision else {"router": False, "vision": False}
    head = None
    if data.grounding > 0:
        head = GroundingHead(
            cfg.language.hidden_size, shuffle_factor(cfg.flash.compressed_downsample_ratio) ** 2
        )
    stage = ViCOStage(
        stream,
        packer,
        data.workers,
        trainable=trainable,
        grounding=data.grounding,
        extra=head,
        param_filter=compressed_branch_only if data.branch == "compressed" else None,
    )
    stage.scan_report = report
    return stage
