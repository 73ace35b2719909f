"""Learnability probe: how much of the world's text a tile, a 1/4 token and a 1/16 token can carry.

Two parts.
1. Geometry (exact, instant): glyphs per 14 px patch, glyph slots and document entries per 1/4 token (2×2
   patches) and per 1/16 token (4×4 patches), glyph pitch and height in the thumbnail for every grid, and an
   oracle template reader (it knows where every digit is) at full resolution and after thumbnail-like squeezes.
   A 256-d token could in principle hold four entries (≈ 50 bits); what 1/16 costs is learnability: at 1/4 an
   entry *is* a token (attend, then read fixed slots), at 1/16 the reader must pick one entry out of a mixture
   in which its position varies (four offsets), the kind of position variance the calibration found blocking.
2. Training (minutes, one thread): a throw-away model shaped like the tiny preset's vision side (ViT patch 14,
   dim 192 → pixel shuffle → MLP → 256-d tokens) and a small reader (learned queries = the asked key and
   the digit position, cross-attending to the visual tokens) learns the document question "number after the
   K mark" on single-tile documents at random, token-aligned positions, with the world's curriculum (`hold`
   steps at one entry, then a ramp to full difficulty). Run with 16 tokens per tile (1/4, mlp1 shape) and with 4 (1/16,
   mlp2 shape); the held-out curves at full difficulty show what the 1/16 squeeze costs.
   `--task number --align cell|fixed|free` instead reads a lone 3-digit number placed on a random cell (the
   world's rule), a fixed cell, or at a random pixel position: the control for the patch-alignment design.
This probes the data, not the model: it does not use tessera.model, so it runs without a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
from PIL import Image, ImageDraw

from tessera.geometry import candidate_grids
from tessera.world.curriculum import level
from tessera.world.scenes import (
    CELL,
    CELLS_PER_TILE,
    DOC_KEYS,
    PITCH,
    TILE,
    Document,
    Scene,
    _Occupancy,
    _place_document,
    font,
    render,
)

CODE_DIGITS = level(1.0).code_digits
MEAN, STD = (
    np.array([0.485, 0.456, 0.406]),
    np.array([0.229, 0.224, 0.225]),
)  # ImageNet, as the processor uses


# ---- 1. geometry ----------------------------------------------------------------------------------


def geometry() -> dict:
    """Glyph and token arithmetic for the world's text at the tiny preset's geometry."""
    f = font()
    ink = [f.getbbox(ch) for ch in "0123456789"]
    w = max(b[2] - b[0] for b in ink)
    h = max(b[3] - b[1] for b in ink)
    glyph_slots = CELL // PITCH  # glyphs per patch (one text row per cell row)
    # glyph pitch × ink height (px) once the whole canvas is squeezed into the 112 px thumbnail
    thumb = {f"{c}x{r}": [round(PITCH / c, 2), round(h / r, 2)] for c, r in candidate_grids(2, 6)}
    return {
        "glyph_ink_px": [w, h],
        "glyph_pitch_px": PITCH,
        "patch_px": CELL,
        "glyphs_per_patch": glyph_slots,
        "glyph_boxes_fraction_of_patch": round(glyph_slots * w * h / CELL**2, 2),
        "glyph_slots_per_token_1_4": 4 * glyph_slots,
        "glyph_slots_per_token_1_16": 16 * glyph_slots,
        # entries sit at even cells, one per 1/4 token; a 1/16 token spans 2 entry rows × 2 entry columns
        "entries_per_token_1_4": 1,
        "max_entries_per_token_1_16": 4,
        "llm_token_dims_tiny": 256,
        "thumbnail_glyph_pitch_and_height_px": thumb,
    }


def _templates() -> dict[str, np.ndarray]:
    """Each glyph rendered alone in one 7×14 slot (black on white), as a float array."""
    out = {}
    for ch in "0123456789":
        doc = Document(2, 1, 1, (DOC_KEYS[0],), (ch * 3,))
        image = render(Scene(1, 1, "white", "plain", (0, 0, 0), (), doc)).convert("L")
        out[ch] = np.asarray(image, np.float32)[
            CELL : 2 * CELL, 2 * CELL + PITCH : 2 * CELL + 2 * PITCH
        ]
    return out


def template_reading(n: int = 40, squeeze: int = 1, seed: int = 0) -> float:
    """Fraction of document glyphs a nearest-template reader gets right after the tile is shrunk `squeeze`×
    horizontally and stretched back (what a `squeeze`-wide grid does to its thumbnail), at known positions."""
    tpl = _templates()
    keys, arrays = list(tpl), np.stack(list(tpl.values()))
    rng, right, total = random.Random(seed), 0, 0
    for _ in range(n):
        image, doc = _document_tile(rng)
        if squeeze > 1:
            image = image.resize((TILE // squeeze, TILE), Image.BICUBIC).resize(
                (TILE, TILE), Image.BICUBIC
            )
        g = np.asarray(image.convert("L"), np.float32)
        for i, (_key, code) in enumerate(zip(doc.keys, doc.codes)):
            cx, cy = doc.cell(i)
            for k, ch in enumerate(code, start=1):  # slot 0 holds the key
                x, y = cx * CELL + k * PITCH, cy * CELL
                patch = g[y : y + CELL, x : x + PITCH]
                guess = keys[int(np.argmin(((arrays - patch) ** 2).sum(axis=(1, 2))))]
                right += guess == ch
                total += 1
    return right / total


def _document_tile(rng: random.Random, difficulty: float = 1.0) -> tuple[Image.Image, Document]:
    """One 112 px tile holding only a document (at the curriculum's `difficulty`) at a token-aligned position."""
    occ = _Occupancy(CELLS_PER_TILE, CELLS_PER_TILE)
    doc = _place_document(rng, occ, level(difficulty))
    scene = Scene(
        1, 1, rng.choice(["white", "cream", "grey", "pale blue"]), "plain", (20, 20, 20), (), doc
    )
    return render(scene), doc


# ---- 2. training ----------------------------------------------------------------------------------


def _number_tile(rng: random.Random, align: str) -> tuple[Image.Image, str]:
    """One tile with a lone 3-digit number in the world's glyphs, placed on a fixed cell ("fixed"), a random cell
    ("cell", the world's rule) or a random pixel position ("free", the calibration's failing case)."""
    number = "".join(rng.choice("0123456789") for _ in range(CODE_DIGITS))
    image = Image.new(
        "RGB", (TILE, TILE), rng.choice([(250, 250, 250), (245, 238, 218), (226, 226, 226)])
    )
    draw = ImageDraw.Draw(image)
    width = -(-(CODE_DIGITS * PITCH) // CELL)  # cells
    if align == "fixed":
        x, y = 2 * CELL, 2 * CELL
    elif align == "cell":
        x, y = (
            rng.randrange(CELLS_PER_TILE - width + 1) * CELL,
            rng.randrange(CELLS_PER_TILE) * CELL,
        )
    elif align == "free":
        x, y = rng.randrange(TILE - width * CELL + 1), rng.randrange(TILE - CELL + 1)
    else:
        raise ValueError(f"align must be fixed, cell or free, got {align!r}")
    top = (CELL - 8) // 2 - font().getbbox("0")[1]
    for k, ch in enumerate(number):
        draw.text((x + k * PITCH, y + top), ch, font=font(), fill=(20, 20, 20))
    return image, number


def _batch(
    rng: random.Random, n: int, difficulty: float = 1.0, task: str = "document", align: str = "cell"
):
    import torch

    images, keys, codes = [], [], []
    for _ in range(n):
        if task == "document":
            image, doc = _document_tile(rng, difficulty)
            key = rng.choice(doc.keys)
            code = doc.code_for(key)
        else:  # one number, nothing to look up: the query key is constant
            (image, code), key = _number_tile(rng, align), DOC_KEYS[0]
        images.append((np.asarray(image, np.float32) / 255 - MEAN) / STD)
        keys.append(DOC_KEYS.index(key))
        codes.append([int(c) for c in code])
    x = torch.tensor(np.stack(images), dtype=torch.float32).permute(
        0, 3, 1, 2
    )  # [B,H,W,3] → [B,3,H,W]
    return x, torch.tensor(keys), torch.tensor(codes)


def _model(ratio: int, dim: int = 192, layers: int = 4, d_llm: int = 256):
    """ViT (patch 14) → pixel shuffle by `ratio` (2: 16 tokens, 4: 4 tokens) → MLP → reader queries → digits."""
    import torch
    from torch import nn

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            side = TILE // CELL
            self.patch = nn.Conv2d(3, dim, CELL, CELL)
            self.pos = nn.Parameter(torch.randn(1, side * side, dim) * 0.02)
            self.vit = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    dim, 3, 4 * dim, 0.0, "gelu", batch_first=True, norm_first=True
                ),
                layers,
                enable_nested_tensor=False,
            )
            c = dim * ratio * ratio
            if ratio == 2:  # mlp1 shape
                self.mlp = nn.Sequential(
                    nn.LayerNorm(c), nn.Linear(c, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm)
                )
            else:  # mlp2 shape
                self.mlp = nn.Sequential(
                    nn.LayerNorm(c),
                    nn.Linear(c, 2 * d_llm),
                    nn.GELU(),
                    nn.Linear(2 * d_llm, 2 * d_llm),
                    nn.GELU(),
                    nn.Linear(2 * d_llm, d_llm),
                )
            # token positions, keys and digit positions all at unit scale: the two queries of one code must differ
            # as much as queries for different keys, or the reader settles on reading a bag of digits
            self.tok_pos = nn.Parameter(torch.randn(1, (side // ratio) ** 2, d_llm))
            self.key = nn.Embedding(len(DOC_KEYS), d_llm)
            self.digit = nn.Parameter(torch.randn(1, CODE_DIGITS, d_llm))
            self.reader = nn.TransformerDecoder(
                nn.TransformerDecoderLayer(
                    d_llm, 4, 3 * d_llm, 0.0, "gelu", batch_first=True, norm_first=True
                ),
                2,
            )
            self.head = nn.Linear(d_llm, 10)
            self.ratio, self.side = ratio, side

        def forward(self, x, keys):
            B, r, s = x.shape[0], self.ratio, self.side
            h = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # [B,D,s,s] → [B,s·s,D]
            h = self.vit(h)
            h = h.view(B, s // r, r, s // r, r, dim).permute(
                0, 1, 3, 2, 4, 5
            )  # [B,s/r,s/r,r,r,D] blocks
            h = h.reshape(B, (s // r) ** 2, r * r * dim)  # [B,T,r²D], T = (s/r)² tokens, row-major
            tokens = self.mlp(h) + self.tok_pos  # [B,T,d_llm]
            q = self.key(keys)[:, None, :] + self.digit  # [B,K,d_llm]: one query per code digit
            return self.head(self.reader(q, tokens))  # [B,K,10]

    return Probe()


def schedule(step: int, hold: int, ramp: int) -> float:
    """Curriculum difficulty at `step`: 0 while the model learns to read one item, then linear to 1."""
    if step < hold:
        return 0.0
    return min(1.0, (step - hold) / ramp) if ramp > 0 else 1.0


def train(
    ratio: int,
    steps: int,
    batch: int = 32,
    lr: float = 2e-4,
    warmup: int = 50,
    seed: int = 0,
    hold: int = 0,
    ramp: int = 0,
    task: str = "document",
    align: str = "cell",
    eval_every: int = 50,
    log=None,
) -> list[dict]:
    """Train the probe at pixel-shuffle `ratio`; returns the learning curve on a fixed full-difficulty held-out
    batch. Curriculum: difficulty 0 for the first `hold` steps, then a linear ramp to 1 over `ramp` steps.
    task="number" reads a lone number placed by `align` instead (the alignment control; no curriculum)."""
    import torch

    log = log or (lambda line: print(line, flush=True))
    torch.manual_seed(seed)
    model = _model(ratio)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    rng, held_rng = random.Random(seed), random.Random(10**6 + seed)
    hx, hk, hc = _batch(held_rng, 256, 1.0, task, align)
    curve, start = [], time.time()
    for step in range(1, steps + 1):
        difficulty = schedule(step - 1, hold, ramp) if task == "document" else 1.0
        x, k, c = _batch(rng, batch, difficulty, task, align)
        logits = model(x, k)  # [B,K,10], K code digits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 10), c.reshape(-1)
        )  # [B·K,10] vs [B·K]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                pred = model(hx, hk).argmax(-1)  # [256,K]
            point = {
                "step": step,
                "difficulty": round(difficulty, 3),
                "loss": round(loss.item(), 4),
                "digit_acc": round((pred == hc).float().mean().item(), 4),
                "code_acc": round((pred == hc).all(-1).float().mean().item(), 4),
                "seconds": round(time.time() - start, 1),
            }
            curve.append(point)
            log(
                f"{task}/{align if task == 'number' else 'curriculum'} tokens/tile={(TILE // CELL // ratio) ** 2:2d} "
                f"{json.dumps(point)}"
            )
    return curve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=int, default=1000, help="training steps per run (0: geometry only)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument(
        "--hold", type=int, default=300, help="curriculum: steps at difficulty 0 (one entry) first"
    )
    parser.add_argument(
        "--ramp", type=int, default=400, help="curriculum: then difficulty 0 → 1 over so many steps"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="model init and data stream seed")
    parser.add_argument(
        "--tokens", choices=["16", "4", "both"], default="both", help="tokens per tile (16: 1/4)"
    )
    parser.add_argument(
        "--task",
        choices=["document", "number"],
        default="document",
        help="document: the document question, with the curriculum; "
        "number: a lone number (alignment control)",
    )
    parser.add_argument(
        "--align",
        choices=["cell", "fixed", "free"],
        default="cell",
        help="number placement (--task number)",
    )
    parser.add_argument("--json", default=None, help="write the results to this file")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    result = {
        "geometry": geometry(),
        "template_reading": {
            f"squeeze_{k}": round(template_reading(squeeze=k), 3) for k in (1, 2, 3)
        },
    }
    print(json.dumps(result, indent=1))
    if args.steps > 0:
        ratios = (
            {"16": 2, "4": 4}
            if args.tokens == "both"
            else {args.tokens: 2 if args.tokens == "16" else 4}
        )
        result["training"] = {
            t: train(
                r,
                args.steps,
                args.batch,
                args.lr,
                seed=args.seed,
                hold=args.hold,
                ramp=args.ramp,
                task=args.task,
                align=args.align,
            )
            for t, r in ratios.items()
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
