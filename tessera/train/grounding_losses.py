"""The dense grounding loss: linear probes read every cell's targets back (tessera.world.grounding_targets).

Two probes, because the two halves of the vision path learn at very different speeds (measured with a
vision-only probe, 200 steps at difficulty 0.5, lr ViT 1e-4 / connector 6e-4): a probe on the ViT's patch tokens
reaches 93–97 % on the glyph slots, while one on the projector's 1/4 tokens (four patches pixel-shuffled into one
vector through mlp1) is at 14–24 %; with both probes the ViT learns its glyphs first and the projector then only
has to carry them (58 % / 49 % at a connector lr of 3e-3). The patch probe teaches the ViT to see; the token probe
keeps what it sees linearly readable in the vectors the language model receives.

The probes belong to the training stage, not to the model: the model's checkpoints never contain them (the
trainer saves them beside the optimizer for an exact resume).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tessera.model.connector import pixel_shuffle
from tessera.model.llm import apply_rope
from tessera.world.curriculum import level
from tessera.world.grounding_targets import FIELDS, IGNORE, NUM_CLASSES
from tessera.world.scenes import CELLS_PER_TILE


class GroundingHead(nn.Module):
    """Linear map from one visual token [D] to logits for each of its cells' fields [k², F, C]."""

    def __init__(self, hidden_size: int, cells_per_token: int):
        super().__init__()
        self.cells_per_token = cells_per_token
        self.proj = nn.Linear(hidden_size, cells_per_token * len(FIELDS) * NUM_CLASSES)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t, _ = tokens.shape
        return self.proj(tokens).reshape(
            n, t, self.cells_per_token * len(FIELDS), NUM_CLASSES
        )  # [N, T, k²·F, C]


class PlaceHead(nn.Module):
    """Linear map from what the middle layer's heads fetched at an answer position (their concatenated outputs
    before o_proj, [H·hd]) to the (column, row) on the whole-canvas view's 8×8 grid of each of the (up to) two
    things a spatial answer compares: logits [2, 2, 8]."""

    GROUPS, AXES = 2, 2

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, self.GROUPS * self.AXES * CELLS_PER_TILE)
        # not zero (unlike the visual-token probes): the places are absent from the answer position at first, and a
        # zero probe passes no gradient back into the heads until it has found something to read
        nn.init.normal_(self.proj.weight, std=hidden_size**-0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).reshape(
            hidden.shape[0], self.GROUPS, self.AXES, CELLS_PER_TILE
        )  # [Q, 2, 2, 8]


class CountHead(nn.Module):
    """Linear map from what the middle layer's heads fetched at a counting answer's positions ([H·hd]) to how many
    things were counted: logits [MAX_COUNT + 1] (0 … the most shapes a scene holds)."""

    MAX_COUNT = level(1.0).max_objects

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, self.MAX_COUNT + 1)
        nn.init.normal_(self.proj.weight, std=hidden_size**-0.5)  # not zero: see PlaceHead
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)  # [Q, MAX_COUNT + 1]


class GroundingHeads(nn.Module):
    """The patch probe (one cell per ViT patch token), the token probe (k² cells per projected 1/4 token) and the
    probes on what the middle layer's heads fetched (`fetched_width` = the width of their concatenated outputs):
    the place probe (PlaceHead) when `place`, the count probe (CountHead) when `count`."""

    def __init__(
        self,
        vision_hidden: int,
        language_hidden: int,
        cells_per_token: int,
        fetched_width: int = 0,
        place: bool = False,
        count: bool = False,
    ):
        super().__init__()
        if (place or count) and not fetched_width:
            raise ValueError(
                "the place and count probes need the width of the middle layer's head outputs"
            )
        self.patch = GroundingHead(vision_hidden, 1)
        self.token = GroundingHead(language_hidden, cells_per_token)
        self.place = PlaceHead(fetched_width) if place else None
        self.count = CountHead(fetched_width) if count else None


def token_targets(cells: torch.Tensor, ratio: float) -> torch.Tensor:
    """Cell targets [N, h, w, F] → per-token targets [N, T, k²·F], grouped exactly as pixel_shuffle groups the
    patches into tokens (the same function moves both, so token t's targets are the cells its vector holds)."""
    grouped = pixel_shuffle(cells, ratio)  # [N, h·r, w·r, F·k²]
    return grouped.reshape(grouped.shape[0], -1, grouped.shape[-1])  # [N, T, k²·F]


def grounding_loss(
    head: GroundingHead,
    features: torch.Tensor,
    cells: torch.Tensor,
    ratio: float,
    name: str = "ground",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over the labelled (token, cell, field) slots of the batch: the mean over all of them plus
    the mean over those that show something; and per-field accuracy on the slots that show something.

    features: [N·T, D] the projector's output for N tiles at `ratio` (all at the same ratio); cells: [N, h, w, F].
    """
    targets = token_targets(cells, ratio)  # [N, T, k²·F]
    n, t, _ = targets.shape
    if features.shape[0] != n * t:
        raise ValueError(f"{features.shape[0]} visual tokens for {n} tiles of {t} tokens each")
    logits = head(features.reshape(n, t, -1).float())  # [N, T, k²·F, C]
    ce = F.cross_entropy(
        logits.reshape(-1, NUM_CLASSES), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    )  # [N·T·k²·F], 0 where ignored
    flat = targets.reshape(-1)
    valid = flat != IGNORE
    field = (
        (torch.arange(targets.shape[-1], device=flat.device) % len(FIELDS))
        .expand_as(targets)
        .reshape(-1)
    )
    # most slots are empty ("nothing" is learnt in a few steps) and a shape covers many more cells than a label
    # has glyphs: each field's shown slots get a mean of their own, so every field keeps a full-strength signal
    # however sparse it is
    loss = ce[valid].sum() / valid.sum().clamp(min=1)
    for f in range(len(FIELDS)):
        shown = (flat > 0) & (field == f)
        loss = loss + ce[shown].sum() / shown.sum().clamp(min=1) / len(FIELDS)
    metrics = {f"{name}/loss": float(loss.detach())}
    with torch.no_grad():
        pred = logits.argmax(-1)  # [N, T, k²·F]
        fields = torch.arange(targets.shape[-1]) % len(FIELDS)  # [k²·F]: the field of each slot
        for f, field_name in enumerate(FIELDS):
            shown = (targets > 0) & (fields == f)
            if bool(shown.any()):
                metrics[f"{name}/{field_name}"] = float(
                    (pred[shown] == targets[shown]).float().mean()
                )
    return loss, metrics


def two_level_grounding_loss(
    heads: GroundingHeads,
    grid: torch.Tensor,
    features: torch.Tensor,
    cells: torch.Tensor,
    ratio: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Patch probe on the ViT grid [N, h, w, Cv] plus token probe on the projected features [N·T, D] (at `ratio`).
    Metrics: `ground/<field>` for the tokens, `ground_patch/<field>` for the patches."""
    patch_loss, patch_metrics = grounding_loss(
        heads.patch, grid.reshape(-1, grid.shape[-1]), cells, 1.0, "ground_patch"
    )
    token_loss, metrics = grounding_loss(heads.token, features, cells, ratio)
    return patch_loss + token_loss, {**metrics, **patch_metrics}


def evidence_attention_loss(
    attn: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    evidence,
    heads: Sequence[int] = (0,),
    name: str = "evidence_attention",
) -> tuple[torch.Tensor, dict[str, float]]:
    """−log of the attention mass that the supervised heads of one layer put on the visual tokens showing an
    answer's evidence, averaged over heads and over the positions that predict answer tokens.

    A probe found the answer digits at chance even with a single document entry in view while the visual tokens
    already carried those digits (97 % for the token probe): the language model had not learnt where to look, and
    with attention spread over every token the value path gets no signal to learn from either. Telling heads
    where the evidence is breaks that symmetry; the rest of the model learns to use what they fetch.
    Head i looks up evidence group i mod (number of groups): with one group every head fetches the same thing
    (heads of different key/value groups then bring different projections of it); with two (a spatial question's
    two objects, a sum's two labels) they fetch one thing each, side by side.

    A counting answer (an entry with a `sink`) is different: its key groups hold one token per counted thing,
    and every supervised head should split its mass evenly between each of those tokens and the sink: the loss is
    KL(that uniform target ‖ the head's attention). Pulling all the mass onto the things (as above) makes a head's
    output the *average* of what it found, the same for one circle as for three: the model then detects and does
    not count (docs/log/2026-11-24-notes-5.md: 1 → 97 %, 2 → 36 %). With the sink in the share, n things take
    n / (n + 1) of the mass, and what the heads fetch says how many there are (none: all on the sink).

    attn: the layer's Qwen3Attention; x [B, T, D] its (normed) input, cos/sin [B, T, hd], mask the additive
    [B, 1, T, T] mask (None = causal); evidence: tessera.train.data.Evidence entries (row, queries, keys, sink);
    the mean mass on the targets is reported as metric `name`.
    """
    group = attn.num_heads // attn.num_kv_heads
    heads = list(heads)
    if not heads or not all(0 <= h < attn.num_heads for h in heads):
        raise ValueError(f"evidence heads {heads} must name heads of a layer with {attn.num_heads}")
    total, mass, count = x.new_zeros((), dtype=torch.float32), 0.0, 0
    for entry in evidence:
        b, queries, key_groups = entry.row, entry.queries, entry.keys
        s = max(queries) + 1  # keys a causal query can see
        q = attn.q_norm(
            attn.q_proj(x[b, queries]).view(len(queries), attn.num_heads, attn.head_dim)[:, heads]
        )  # [Q, H, hd]
        k = attn.k_norm(
            attn.k_proj(x[b, :s]).view(s, attn.num_kv_heads, attn.head_dim)
        )  # [S, KV, hd]
        k = k[:, [h // group for h in heads]]  # [S, H, hd], the key group of each supervised head
        q = apply_rope(q.transpose(0, 1)[None], cos[b, queries][None], sin[b, queries][None])[
            0
        ].float()  # [H, Q, hd]
        k = apply_rope(k.transpose(0, 1)[None], cos[b, :s][None], sin[b, :s][None])[
            0
        ].float()  # [H, S, hd]
        scores = q @ k.transpose(1, 2) / attn.head_dim**0.5  # [H, Q, S]
        if mask is not None:
            scores = scores + mask[b, 0][queries][:, :s].float()
        else:
            scores = scores.masked_fill(
                torch.arange(s)[None, :] > torch.tensor(queries)[:, None], float("-inf")
            )
        logp = torch.log_softmax(scores, dim=-1)  # [H, Q, S]
        if entry.sink is not None:  # every head: an even share for the sink and each counted thing
            shares = [entry.sink] + [k for keys in key_groups for k in keys]
            # KL(uniform over the n + 1 targets ‖ attention), summed over Q: the cross-entropy minus its floor log(n + 1)
            kl = -logp[:, :, shares].mean(-1) - math.log(len(shares))  # [H, Q]
            total = total + kl.sum() / len(heads)
            mass += float(logp[:, :, shares].detach().exp().sum()) / len(heads)
        else:
            for i in range(len(heads)):
                keys = key_groups[i % len(key_groups)]
                on_evidence = torch.logsumexp(
                    logp[i][:, keys], dim=-1
                )  # [Q] log attention mass on the evidence
                total = total - on_evidence.sum() / len(heads)
                mass += float(on_evidence.detach().exp().sum()) / len(heads)
        count += len(queries)
    if count == 0:
        return total, {}
    return total / count, {name: mass / count}


def place_loss(
    head: PlaceHead, hidden: torch.Tensor, evidence
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the place probe: at the positions predicting a spatial answer, the hidden state must say
    where each of the two compared things is (column and row on the whole-canvas view).

    Session 4's probe found the places in the visual tokens (98 / 95 %) but not at the answer position (object
    A's column 22 % vs 19 % for the majority class): the evidence heads fetched *what* the objects are, not
    *where*. This loss asks for where directly, from the heads' own outputs (a probe on the residual stream
    after the layer did not learn at any weight: docs/log/2026-11-24-notes-5.md).

    hidden: [B, T, H·hd] the middle layer's concatenated head outputs (the input of its o_proj); evidence: the
    batch's Evidence entries — those without places are skipped. Metric `place/acc`:
    share of the (position, group, axis) slots read right."""
    states, targets = [], []
    for entry in evidence:
        b, queries, places = entry.row, entry.queries, entry.places
        if not places:
            continue
        if len(places) > head.GROUPS:
            raise ValueError(
                f"the place probe reads {head.GROUPS} groups, the answer compares {len(places)}"
            )
        target = torch.full(
            (head.GROUPS, head.AXES), IGNORE, dtype=torch.long
        )  # [2 groups, 2 axes]
        target[: len(places)] = torch.tensor(places, dtype=torch.long)
        states.append(hidden[b, queries])  # [Q, D]
        targets.append(target.expand(len(queries), -1, -1))  # [Q, 2, 2]
    if not states:
        return hidden.new_zeros((), dtype=torch.float32), {}
    logits = head(torch.cat(states).float())  # [ΣQ, 2, 2, 8]
    target = torch.cat(targets)  # [ΣQ, 2, 2]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE
    )
    valid = target != IGNORE
    acc = float((logits.argmax(-1)[valid] == target[valid]).float().mean())
    return loss, {"place/loss": float(loss.detach()), "place/acc": acc}


def count_loss(
    head: CountHead, hidden: torch.Tensor, evidence
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the count probe: at the positions predicting a counting answer (the evidence entries with
    a sink, chains' counts included), what the middle layer's heads fetched must say how many things there are
    (the number of counted keys).

    The sink share of evidence_attention_loss puts the count into the heads' attention (n / (n + 1) of the mass
    on the things); a probe found it barely readable from their outputs after 400 steps (52 % vs 57 % for the
    majority), the values of a red circle and a blue square having little in common. This asks the value path
    for it directly, as the place probe does for where things are.

    hidden: [B, T, H·hd] the middle layer's concatenated head outputs; evidence: the batch's Evidence entries.
    Metric `count/acc`: share of the positions read right."""
    states, targets = [], []
    for entry in evidence:
        if entry.sink is None:
            continue
        n = sum(len(keys) for keys in entry.keys)
        if n > head.MAX_COUNT:
            raise ValueError(
                f"the count probe reads up to {head.MAX_COUNT} things, the answer counts {n}"
            )
        states.append(hidden[entry.row, entry.queries])  # [Q, D]
        targets.append(torch.full((len(entry.queries),), n, dtype=torch.long))
    if not states:
        return hidden.new_zeros((), dtype=torch.float32), {}
    logits = head(torch.cat(states).float())  # [ΣQ, MAX_COUNT + 1]
    target = torch.cat(targets)  # [ΣQ]
    loss = F.cross_entropy(logits, target)
    acc = float((logits.argmax(-1) == target).float().mean())
    return loss, {"count/loss": float(loss.detach()), "count/acc": acc}
