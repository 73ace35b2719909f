"""Samples → model inputs: tiles, prompts with image tokens, packed rows, square-averaged loss weights.

The pipeline for one stream position `index`:
    source(index) → (world Sample, thinking?) ─encode→ Encoded (ids, loss mask, tiles)
a stream of Encoded ─Packer→ Batch: several samples concatenated per row up to `row_tokens`, position ids
restarting at 0 for every sample and segment ids (1, 2, … per row; 0 = padding) from which the block-diagonal
causal mask is built, so attention never crosses samples. Packing saves the padding a per-sample batch would
waste when prompts differ in length (tile counts vary with the image's aspect ratio).

Every sample is a pure function of its stream index, so a data position is one integer and resuming from a
checkpoint replays exactly the same batches. Rendering (PIL) and tiling run in a DataLoader worker process
(`stream_batches(..., workers=1)`), which overlaps with the training step.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tessera.geometry import tokens_of_images
from tessera.image import ImageProcessor
from tessera.model.llm import packed_causal_mask
from tessera.seeds import sub_seed
from tessera.train.losses import IGNORE
from tessera.world import FAMILIES, Lookup, build, make_sample, render
from tessera.world.curriculum import level
from tessera.world.grounding_targets import (
    place_of_cells,
    thumbnail_token_of_cell,
    tile_targets,
    token_of_cell,
)
from tessera.world.tasks import (  # the per-family askers, on a given scene
    _FAMILY_FNS,
    thinking_text,
)


@dataclass(frozen=True)
class Evidence:
    """Where one answer's evidence is, for the attention grounding and place losses (tessera.train.grounding_losses).

    queries: the positions that predict the answer's tokens; keys: per group, the positions of the visual tokens
    that show it; words: per group, the positions of the question's words naming it; places: for an answer that
    compares places, each group's (column, row) on the whole-canvas view; sink: for a counting answer, the
    position the heads park the rest of their mass on (the sample's first token) — each key is then one counted
    thing. `row` is the packed row (0 in a single sample)."""

    queries: list[int]
    keys: list[list[int]]
    words: list[list[int]] = field(default_factory=list)
    places: list[tuple[int, int]] = field(default_factory=list)
    sink: int | None = None
    row: int = 0

    def packed(self, row: int, start: int) -> Evidence:
        """The same evidence for a sample packed at `start` of row `row`."""
        return Evidence(
            [start + q for q in self.queries],
            [[start + k for k in g] for g in self.keys],
            [[start + w for w in g] for g in self.words],
            self.places,
            None if self.sink is None else start + self.sink,
            row,
        )


@dataclass
class Encoded:
    """One tokenised sample with its tiles. `loss_mask[t]` = 1 when token t is a target the model must write."""

    input_ids: list[int]
    loss_mask: list[int]
    pixel_values: torch.Tensor  # [N,3,S,S], the tiles of every image of the sample in prompt order
    image_tokens: list[int]  # visual tokens per image (their sum = number of <IMG_CONTEXT> ids)
    family: str = ""
    index: int = -1  # stream position, for debugging and resume checks
    grounding: torch.Tensor | None = (
        None  # [N,8,8,F] long, the tiles' cell targets (tessera.world.grounding_targets)
    )
    evidence: list[Evidence] | None = (
        None  # per answered turn (row 0, positions in the sample); None without a scene
    )
    questions: tuple[
        str, ...
    ] = ()  # each answered turn's question text, in order (the question router's input)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        # the first token is never a target (nothing predicts it)
        return sum(self.loss_mask[1:])


def encode(
    tokenizer,
    processor,
    tokens_per_tile: int,
    image,
    question: str,
    answer: str,
    thinking: bool = False,
    family: str = "",
    index: int = -1,
    scene=None,
    lookup=None,
) -> Encoded:
    """Tile `image` (tessera.image.ImageProcessor), expand the prompt with the real token count, mask the labels.
    With the world `scene` the image was drawn from (and what the answer is read from, a tessera.world.Lookup),
    the tiles' dense grounding targets and the answer's evidence positions come along."""
    pixels = processor([image])
    image_tokens = tokens_of_images(pixels.tiles_per_image, tokens_per_tile)
    example = tokenizer.build_example(question, answer, image_tokens, thinking=thinking)
    evidence = _evidence(
        example.input_ids,
        example.loss_mask,
        tokenizer,
        scene,
        tokens_per_tile,
        [(lookup, thinking)],
    )
    return Encoded(
        example.input_ids,
        example.loss_mask,
        pixels.pixel_values,
        image_tokens,
        family,
        index,
        _grounding(scene, pixels.pixel_values.shape[0]),
        evidence,
        (question,),
    )


def _evidence(
    ids: Sequence[int],
    mask: Sequence[int],
    tokenizer,
    scene,
    tokens_per_tile: int,
    turns: Sequence[tuple[Any, bool]],
) -> list[Evidence] | None:
    """Per turn (its Lookup or None, thinking?) one Evidence: the positions predicting its answer tokens (not
    `<|im_end|>`); per group, the positions of the visual tokens that show its cells — when `coarse`, only the
    thumbnail's tokens at those cells (a one-tile image has no thumbnail: its tile is the whole canvas); per group,
    the positions of the words in the turn's question that name it (empty when it has none); when `coarse`, per
    group the (column, row) of its cells on the whole-canvas view; and for a counted group (one anchor cell per
    thing, possibly none) the sample's first position as the sink. A thinking turn instead gives one entry per
    number its chain reads off the image (the positions that write it → its group's tokens) when the Lookup names
    them (`chain`), and nothing otherwise; turns without cells (and nothing counted) give nothing."""
    if scene is None:
        return None
    runs, start = [], None  # maximal runs of loss tokens: one per turn (its answer and <|im_end|>)
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    if len(runs) != len(turns):
        raise ValueError(f"{len(runs)} answers in the sample but {len(turns)} turns")
    image_positions = [i for i, t in enumerate(ids) if t == tokenizer.img_context_id]
    out = []
    for (s, e), (lookup, thinking) in zip(runs, turns):
        if (
            lookup is None
            or not (any(lookup.cells) or lookup.counted)
            or (thinking and not lookup.chain)
        ):
            continue
        counted = {
            group for group, _ in lookup.counted
        }  # their cells are the things' anchors (WorldStream._lookup)
        keys = []
        for cells in lookup.cells:
            # a coarse lookup reads places: from the view of the whole canvas (the thumbnail when there is one)
            ordinals = (
                {thumbnail_token_of_cell(scene, x, y, tokens_per_tile) for x, y in cells} - {None}
                if lookup.coarse
                else set()
            )
            if not ordinals:
                ordinals = {token_of_cell(scene, x, y, tokens_per_tile) for x, y in cells}
            keys.append(sorted(image_positions[o] for o in ordinals))
        if thinking:  # each number the chain reads off the image, from the positions that write it
            reads = _word_positions(tokenizer, ids, s, e, [(text,) for text, _ in lookup.chain])
            for (_, group), written in zip(lookup.chain, reads):
                if written:
                    out.append(
                        Evidence(
                            [p - 1 for p in written],
                            [keys[group]],
                            [[]],
                            sink=0 if group in counted else None,
                        )
                    )
            continue
        starts = [
            i for i in range(s) if ids[i] == tokenizer.im_start_id
        ]  # ..., user message, assistant's
        user = starts[-2] if len(starts) >= 2 else 0
        words = (
            _word_positions(tokenizer, ids, user, s, lookup.names)
            if lookup.names
            else [[] for _ in keys]
        )
        places = [place_of_cells(scene, cells) for cells in lookup.cells] if lookup.coarse else []
        # a sink when the answer is a count; a counted group beside others (a non-thinking reasoning turn) is
        # looked up like any other group
        counting = bool(counted) and len(counted) == len(lookup.cells)
        # position p predicts token p + 1; e - 1 is <|im_end|>
        out.append(
            Evidence(list(range(s - 1, e - 2)), keys, words, places, sink=0 if counting else None)
        )
    return out


def _word_positions(
    tokenizer, ids: Sequence[int], lo: int, hi: int, names: Sequence[Sequence[str]]
) -> list[list[int]]:
    """Per group of words, the positions in ids[lo:hi] of the tokens spelling them (as consecutive words, each
    group found after the previous one); [] for a group that is empty or not found."""
    pieces = [tokenizer.decode([t]) for t in ids[lo:hi]]
    spans, at = [], 0
    for piece in pieces:
        spans.append((at, at + len(piece)))
        at += len(piece)
    text, cursor, out = "".join(pieces), 0, []
    for words in names:
        found = (
            re.compile(r"\b" + r"\s+".join(map(re.escape, words)) + r"\b").search(text, cursor)
            if words
            else None
        )
        if found is None:
            out.append([])
            continue
        cursor = found.end()
        out.append(
            [lo + i for i, (a, b) in enumerate(spans) if a < found.end() and b > found.start()]
        )
    return out


def _grounding(scene, num_tiles: int) -> torch.Tensor | None:
    """The scene's cell targets per tile, checked against the processor's tiling (the world draws canvases
    that tile exactly, so row-major tiles + thumbnail must be what the processor made)."""
    if scene is None:
        return None
    tiles = scene.cols * scene.rows
    targets = torch.from_numpy(tile_targets(scene, thumbnail=tiles > 1))  # [N,8,8,F]
    if targets.shape[0] != num_tiles:
        raise ValueError(
            f"the scene is {scene.cols}x{scene.rows} tiles (+ thumbnail) but the processor made {num_tiles}"
        )
    return targets


def encode_turns(
    tokenizer,
    processor,
    tokens_per_tile: int,
    image,
    turns: Sequence[tuple[str, str, bool]],
    family: str = "",
    index: int = -1,
    scene=None,
    lookups=None,
) -> Encoded:
    """A multi-turn conversation about one image: (question, answer, thinking) per turn, image in the first.

    The first turn is exactly `ChatTokenizer.build_example`; each later turn appends
    `\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n` (+ the empty think block when thinking is
    off) and its answer. Loss on every answer and its `<|im_end|>`. One ViT pass then serves several answers,
    which is where a training step spends most of its time.
    """
    pixels = processor([image])
    image_tokens = tokens_of_images(pixels.tiles_per_image, tokens_per_tile)
    (q, a, think), rest = turns[0], turns[1:]
    first = tokenizer.build_example(q, a, image_tokens, thinking=think)
    ids, mask = list(first.input_ids), list(first.loss_mask)
    for q, a, think in rest:
        prompt = tokenizer.encode(
            "\n" + tokenizer.turn("user", q) + tokenizer.assistant_start(think)
        )
        target = tokenizer.encode(a) + [tokenizer.im_end_id]
        ids += prompt + target
        mask += [0] * len(prompt) + [1] * len(target)
    tokenizer.check_image_tokens(ids, image_tokens)
    lookups = lookups if lookups is not None else [None] * len(turns)
    evidence = _evidence(
        ids, mask, tokenizer, scene, tokens_per_tile, [(lk, t[2]) for lk, t in zip(lookups, turns)]
    )
    return Encoded(
        ids,
        mask,
        pixels.pixel_values,
        image_tokens,
        family,
        index,
        _grounding(scene, pixels.pixel_values.shape[0]),
        evidence,
        tuple(q for q, _, _ in turns),
    )


def square_average_weights(num_loss_tokens: int) -> float:
    """InternVL's square averaging: each of a sample's N loss tokens weighs N^-0.5 (between per-token and per-sample)."""
    if num_loss_tokens <= 0:
        raise ValueError("a training sample must have at least one loss token")
    return num_loss_tokens**-0.5


@dataclass
class Batch:
    """Packed rows. Position t of a row predicts `targets[:, t]` (the next token of the same sample)."""

    input_ids: torch.Tensor  # [B,L] long, pad_id on padding
    targets: (
        torch.Tensor
    )  # [B,L] long, IGNORE where no loss (prompt, padding, last token of a sample)
    weights: (
        torch.Tensor
    )  # [B,L] float, N^-0.5 on the loss positions of a sample with N of them, else 0
    position_ids: torch.Tensor  # [B,L] long, restarting at 0 for every sample
    segment_ids: torch.Tensor  # [B,L] long, 1.. per sample within a row, 0 on padding
    pixel_values: (
        torch.Tensor
    )  # [ΣN,3,S,S], the tiles in the order their <IMG_CONTEXT> tokens appear (row-major)
    image_tokens: list[int]  # per image, same order
    families: list[str]  # per sample, in packing order
    indices: list[int] = field(default_factory=list)  # stream positions of the samples
    grounding: torch.Tensor | None = (
        None  # [ΣN,8,8,F] cell targets of the tiles, when every sample has them
    )
    evidence: list[Evidence] = field(
        default_factory=list
    )  # every sample's, at its place in the rows

    @property
    def num_samples(self) -> int:
        return len(self.families)

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def weight_sum(self) -> float:
        return float(self.weights.sum())

    def attn_mask(self) -> torch.Tensor:
        """bool [B,1,L,L], True = may attend: same segment and causal. Padding (segment 0) attends to padding."""
        return packed_causal_mask(self.segment_ids)


def collate(rows: Sequence[Sequence[Encoded]], pad_id: int, pad_to: int | None = None) -> Batch:
    """Build a Batch from rows of samples (one list of Encoded per row), padded to the longest row or `pad_to`."""
    if not rows or any(not r for r in rows):
        raise ValueError("collate needs at least one non-empty row")
    L = max(sum(len(e) for e in row) for row in rows)
    if pad_to is not None:
        if pad_to < L:
            raise ValueError(f"a row of {L} tokens does not fit pad_to={pad_to}")
        L = pad_to
    B = len(rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.full((B, L), IGNORE, dtype=torch.long)
    weights = torch.zeros(B, L)
    position_ids = torch.zeros(B, L, dtype=torch.long)
    segment_ids = torch.zeros(B, L, dtype=torch.long)
    tiles, image_tokens, families, indices = [], [], [], []
    evidence: list[Evidence] = []
    for b, row in enumerate(rows):
        start = 0
        for seg, e in enumerate(row, start=1):
            n = len(e)
            ids = torch.tensor(e.input_ids, dtype=torch.long)
            mask = torch.tensor(e.loss_mask, dtype=torch.bool)
            input_ids[b, start : start + n] = ids
            position_ids[b, start : start + n] = torch.arange(n)
            segment_ids[b, start : start + n] = seg
            # position t predicts token t+1 of the same sample; the sample's last position predicts nothing
            shifted = torch.where(mask[1:], ids[1:], torch.full_like(ids[1:], IGNORE))  # [n-1]
            targets[b, start : start + n - 1] = shifted
            weights[b, start : start + n - 1] = mask[1:].float() * square_average_weights(
                e.num_loss_tokens
            )
            evidence.extend(entry.packed(b, start) for entry in e.evidence or [])
            tiles.append(e.pixel_values)
            image_tokens.extend(e.image_tokens)
            families.append(e.family)
            indices.append(e.index)
            start += n
    pixel_values = torch.cat(tiles) if tiles else torch.zeros(0)
    grounds = [e.grounding for row in rows for e in row]
    grounding = torch.cat(grounds) if all(g is not None for g in grounds) else None
    return Batch(
        input_ids,
        targets,
        weights,
        position_ids,
        segment_ids,
        pixel_values,
        image_tokens,
        families,
        indices,
        grounding,
        evidence,
    )


class Packer:
    """Turns an ordered stream of (position, Encoded) into packed Batches of at most `rows` × `row_tokens`.

    A batch closes when the next sample fits in no row; that sample opens the next batch. Each yielded
    item is `(batch, next_position)`: the stream position of the first sample *not* in this or an earlier
    batch, which is what a checkpoint stores to resume exactly.
    """

    def __init__(self, rows: int, row_tokens: int, pad_id: int):
        if rows < 1 or row_tokens < 1:
            raise ValueError(f"rows ({rows}) and row_tokens ({row_tokens}) must be positive")
        self.rows, self.row_tokens, self.pad_id = rows, row_tokens, pad_id

    def __call__(self, stream: Iterable[tuple[int, Encoded]]) -> Iterator[tuple[Batch, int]]:
        rows: list[list[Encoded]] = []
        used = 0  # tokens in the last row
        for position, e in stream:
            if len(e) > self.row_tokens:
                raise ValueError(
                    f"sample {e.index} has {len(e)} tokens, more than row_tokens={self.row_tokens}; raise row_tokens"
                )
            if rows and used + len(e) <= self.row_tokens:
                rows[-1].append(e)
                used += len(e)
                continue
            if len(rows) == self.rows:  # e fits nowhere: close the batch, e opens the next one
                yield collate(rows, self.pad_id), position
                rows = []
            rows.append([e])
            used = len(e)


class _IndexedStream(IterableDataset):
    """Encoded samples at positions start, start+1, … of one rank's stream (global index = pos·world + rank)."""

    def __init__(self, make: Callable[[int], Encoded], start: int, rank: int = 0, world: int = 1):
        self.make, self.start, self.rank, self.world = make, start, rank, world

    def __iter__(self) -> Iterator[tuple[int, Encoded]]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError("the sample stream is ordered; use at most one worker")
        pos = self.start
        while True:
            yield pos, self.make(pos * self.world + self.rank)
            pos += 1


def _identity(x: Any) -> Any:
    return x


def stream_batches(
    make: Callable[[int], Encoded],
    packer: Packer,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    workers: int = 1,
    prefetch: int = 32,
) -> Iterator[tuple[Batch, int]]:
    """Packed batches of `make(i)` from stream position `start`; rendering runs in `workers` (0 or 1) processes.

    `make` must be picklable when workers > 0 (a module-level function or a dataclass instance).
    """
    dataset = _IndexedStream(make, start, rank, world)
    if workers > 0:
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=1,
            prefetch_factor=prefetch,
            collate_fn=_identity,
            persistent_workers=False,
        )
        stream: Iterable[tuple[int, Encoded]] = loader
    else:
        stream = iter(dataset)
    return packer(stream)


def tokens_summary(batch: Batch) -> dict[str, float]:
    """Counts for logging: samples, real tokens, padding fraction, tiles, loss tokens."""
    total = batch.input_ids.numel()
    return {
        "samples": float(batch.num_samples),
        "tokens": float(batch.num_tokens),
        "pad_frac": 1.0 - batch.num_tokens / max(total, 1),
        "tiles": float(batch.pixel_values.shape[0]),
        "loss_tokens": float((batch.targets != IGNORE).sum()),
    }


@dataclass
class Curriculum:
    """The world's difficulty as a function of the global stream index: linear between (index, difficulty) points.

    A function of the index (not of the step) keeps the data a pure function of the position, so resume is exact.
    """

    points: tuple[tuple[int, float], ...] = ((0, 1.0),)

    def __post_init__(self) -> None:
        self.points = tuple((int(i), float(d)) for i, d in self.points)
        if not self.points or any(b[0] <= a[0] for a, b in zip(self.points, self.points[1:])):
            raise ValueError(
                f"curriculum points must be non-empty with increasing indices, got {self.points}"
            )
        if any(not 0.0 <= d <= 1.0 for _, d in self.points):
            raise ValueError(f"curriculum difficulties must lie in [0, 1], got {self.points}")

    def __call__(self, index: int) -> float:
        pts = self.points
        if index <= pts[0][0]:
            return pts[0][1]
        for (i0, d0), (i1, d1) in zip(pts, pts[1:]):
            if index < i1:
                return d0 + (d1 - d0) * (index - i0) / (i1 - i0)
        return pts[-1][1]


@dataclass
class WorldStream:
    """Global stream index → Encoded world sample (train split unless `split` says otherwise): picklable, so it
    runs in the data worker.

    `families` maps family → relative weight (None: the world's own uniform pick over FAMILIES). A sample whose
    family has a worked chain (reasoning) is asked in thinking mode with probability `thinking_prob`.
    """

    tokenizer: Any  # tessera.chat.ChatTokenizer
    config: Any  # tessera.config.ModelConfig (tiling settings and tokens per tile)
    families: dict[str, float] | None = None
    thinking_prob: float = 0.0
    curriculum: Curriculum = field(default_factory=Curriculum)
    seed: int = 0  # offset into the world's seeds, so stages can use disjoint scenes
    split: str = "train"  # the world's split ("eval" for held-out conversations, e.g. the router's tile labels)
    turns: int = 1  # questions per image: extra turns ask other families about the same scene
    grounding: bool = (
        False  # attach the tiles' dense grounding targets (tessera.world.grounding_targets)
    )
    chain_evidence: bool = False  # also ground the numbers a thinking chain reads off the image
    repeat: tuple[
        str, ...
    ] = ()  # families a conversation may ask more than once (about other things each time)
    # counts' evidence: one anchor token per counted thing plus a sink with an even share (Evidence.sink), instead
    # of every token of every thing
    count_sink: bool = False
    _processor: Any = field(default=None, repr=False, compare=False)

    def sample(self, index: int):
        """The world Sample and the thinking flag at `index` (no tokenisation; used by tests and reports)."""
        rng = random.Random(sub_seed(self.seed, index))
        family = None
        if self.families:
            names = sorted(self.families)
            family = rng.choices(names, weights=[self.families[n] for n in names])[0]
        s = make_sample(
            self.seed + index, family=family, split=self.split, difficulty=self.curriculum(index)
        )
        return s, s.thinking_answer is not None and rng.random() < self.thinking_prob

    def conversation(self, index: int):
        """(image, [(question, answer, thinking)], family of the first turn, scene, Lookup per turn) for a
        multi-turn sample.

        The first turn is `sample(index)`; the others are drawn (without repeating a family unless it is in
        `repeat`, never `describe`, never the same question twice) and asked about the same scene.
        """
        rng = random.Random(sub_seed(self.seed, index))
        names = sorted(self.families) if self.families else None
        if names:
            first = rng.choices(names, weights=[self.families[n] for n in names])[0]
        else:
            names, first = list(FAMILIES), None
        difficulty = self.curriculum(index)
        scene, task, first, _ = build(self.seed + index, first, self.split, difficulty)
        turns = [self._turn(rng, task, thinking_text)]
        lookups = [self._lookup(task.lookup)]
        others = [n for n in names if n not in (first, "describe")]
        others += [n for n in names if n in self.repeat for _ in range(self.turns - 1)]
        rng.shuffle(others)
        lv = level(difficulty)
        for name in others:
            if len(turns) >= self.turns:
                break
            extra = _FAMILY_FNS[name](rng, scene, lv)
            if extra is not None and all(extra.question != q for q, _, _ in turns):
                turns.append(self._turn(rng, extra, thinking_text))
                lookups.append(self._lookup(extra.lookup))
        return render(scene), turns, first, scene, lookups

    def _lookup(self, lookup):
        """The Lookup as this stream's losses read it: without chains unless `chain_evidence`; with `count_sink`
        a counted group's cells are its things' anchors (and it stays counted), else nothing is counted."""
        if not self.chain_evidence:
            lookup = dataclasses.replace(lookup, chain=())
        if not self.count_sink:
            return dataclasses.replace(lookup, counted=())
        cells = list(lookup.cells)
        for group, anchors in lookup.counted:
            cells[group] = anchors
        return dataclasses.replace(lookup, cells=tuple(cells))

    def _turn(self, rng: random.Random, task, thinking_text) -> tuple[str, str, bool]:
        think = task.think is not None and rng.random() < self.thinking_prob
        return (
            task.question,
            thinking_text(task.think, task.answer) if think else task.answer,
            think,
        )

    def __call__(self, index: int) -> Encoded:
        if self._processor is None:
            self._processor = ImageProcessor.from_config(self.config)
        if self.turns > 1:
            image, turns, family, scene, lookups = self.conversation(index)
            return encode_turns(
                self.tokenizer,
                self._processor,
                self.config.tokens_per_tile,
                image,
                turns,
                family,
                index,
                scene if self.grounding else None,
                lookups,
            )
        s, thinking = self.sample(index)
        answer = s.thinking_answer if thinking else s.answer
        return encode(
            self.tokenizer,
            self._processor,
            self.config.tokens_per_tile,
            s.image,
            s.question,
            answer,
            thinking=thinking,
            family=s.family,
            index=index,
            scene=s.scene if self.grounding else None,
            lookup=self._lookup(Lookup.from_meta(s.meta["lookup"])),
        )
