"""The world's scenes: a seeded layout on the patch-cell lattice, then deterministic Pillow rendering.

Geometry (chosen for the tiny preset: 112 px tiles, 14 px patches, 1/4 token = 2×2 patches, 1/16 = 4×4):
- A canvas is a whole tile grid, 112·cols × 112·rows px with cols·rows ≤ 6, so the processor's resize is the
  identity and every tile is an exact crop. Aspect ratios therefore span 6:1 … 1:6 and every grid occurs.
- Layout happens on 14 px *cells* (one cell = one ViT patch). Small text is drawn at a fixed offset inside
  its cell, two glyphs per cell at a 7 px pitch (Aileron 11 px: ink ≤ 7×8 px). A glyph never straddles a
  patch, so the patch embedding sees the same pixels for the same glyph wherever it is: the calibration found
  that position variance, not glyph size, is what stops a tiny ViT from learning to read in minutes; the
  world's probe (`tessera world probe --task number`) reads a lone 3-digit number at random cell-aligned
  positions (84 % of digits after 400 steps) and stays at chance (10 %) at random pixel positions.
- A shape's label is one cell (2 digits) right of the shape. A document is a panel of entries "colour mark +
  3-digit code" (■482) in one or two columns inside one tile; each entry is the top row of its own 1/4 token
  (2×2 cells, even cell coordinates), so the token that shows a key shows exactly its code: finding and
  reading an entry is one attention hop at 1/4. Keys are colour marks rather than letters so that finding an
  entry uses the colour words every other family teaches, and the only glyphs in the world are the digits.
  A 1/16 token (4×4 cells) mixes up to four entries at four different offsets, so at 1/16 the model must also
  pick one entry's glyphs out of a shared vector: what the compression squeezes. The
  thumbnail (the whole canvas squeezed to 112 px) shrinks the glyph pitch to ≤ 3.5 px or the ink height to
  ≤ 4 px and takes glyphs off the patch lattice. An oracle template reader that knows every digit's position
  still reads 83 % of them after a 2× horizontal squeeze, 61 % at 3×, 42 % at 4× (probe.template_reading): an
  upper bound; a tiny ViT learns to read the aligned glyphs of the tiles, not the smeared thumbnail.
- Shapes are 2–4 cells (28–56 px) and strongly coloured, so colour, shape, count and position survive both the
  thumbnail and 1/16 compression.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tessera.geometry import candidate_grids
from tessera.world.curriculum import Level

TILE = 112  # px, the tiny preset's tile
CELL = 14  # px, the tiny preset's patch
CELLS_PER_TILE = TILE // CELL  # 8
PITCH = 7  # px between small glyphs: two glyphs per patch cell
FONT_SIZE = (
    11  # Aileron 11 px: digits ink 6×8 px, legible at 1:1, smeared below 2 px in the thumbnail
)
MARGIN = 2  # px between a shape and the border of its cell block

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 155, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 195, 25),
    "purple": (135, 60, 175),
    "orange": (240, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "cream": (245, 238, 218),
    "grey": (226, 226, 226),
    "pale blue": (220, 232, 245),
    "pale green": (222, 240, 222),
    "pale pink": (245, 225, 230),
}
PATTERNS = ("plain", "stripes", "dots", "gradient")
INKS = ((20, 20, 20), (25, 30, 85))  # near-black and dark-blue text; both far from KEY_INK
DOC_KEYS = tuple(
    COLOURS
)  # entry keys: colour marks (a document has at most 6 entries, one per colour)
KEY_INK = (
    190,
    20,
    20,
)  # letter keys (if DOC_KEYS is set to letters, e.g. for probing) are drawn red
ENTRY_CELLS = 2  # an entry is 4 glyph slots: the key and up to 3 code digits
MAX_ENTRY_ROWS = (
    3  # entry rows at local cell rows 2, 4, 6 at most: a document holds ≤ 6 entries in two columns
)
PAPER = (253, 253, 250)
TILE_WEIGHTS = {
    1: 3,
    2: 3,
    3: 3,
    4: 2,
    5: 1,
    6: 2,
}  # how often each tile count is drawn (split over its grids)


@dataclass(frozen=True)
class Shape:
    """A coloured shape on an s×s cell block at cell (x, y), labelled in the cell right of its middle row."""

    kind: str
    colour: str
    x: int
    y: int
    size: int
    label: str
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def label_cell(self) -> tuple[int, int]:
        return self.x + self.size, self.y + (self.size - 1) // 2

    @property
    def centre(self) -> tuple[float, float]:
        """Centre in px."""
        return (self.x + self.size / 2) * CELL, (self.y + self.size / 2) * CELL


@dataclass(frozen=True)
class Document:
    """A panel of entries `key + code` (a colour mark then e.g. 482), `columns` entries side by side, one entry
    row every other cell row.

    Entry i starts at cell (x + 2·(i mod columns), y + 2·(i div columns)) with x and y even: each entry is the
    top row of its own 1/4 token (2×2 cells), so the one token that shows a key shows its code and nothing
    else, while a 1/16 token (4×4 cells) mixes up to four entries.
    """

    x: int
    y: int
    columns: int
    keys: tuple[str, ...]
    codes: tuple[str, ...]

    @property
    def width(self) -> int:
        """Text-area width in cells."""
        return ENTRY_CELLS * self.columns

    @property
    def height(self) -> int:
        """Text-area height in cells (entry rows with one blank cell row between them)."""
        return 2 * (-(-len(self.keys) // self.columns)) - 1

    def cell(self, i: int) -> tuple[int, int]:
        return self.x + ENTRY_CELLS * (i % self.columns), self.y + 2 * (i // self.columns)

    def code_for(self, key: str) -> str:
        return self.codes[self.keys.index(key)]


@dataclass(frozen=True)
class Scene:
    """Everything drawn in one image, in cell coordinates; rendering is a pure function of this."""

    cols: int
    rows: int
    background: str
    pattern: str
    ink: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    document: Document | None

    @property
    def size(self) -> tuple[int, int]:
        return self.cols * TILE, self.rows * TILE

    def tile_of(self, cx: int, cy: int) -> int:
        """Row-major index of the tile holding cell (cx, cy), as the processor orders tiles."""
        return (cy // CELLS_PER_TILE) * self.cols + cx // CELLS_PER_TILE

    def count(self, kind: str | None = None, colour: str | None = None) -> int:
        return sum(
            (kind is None or s.kind == kind) and (colour is None or s.colour == colour)
            for s in self.shapes
        )

    def find(self, name: str) -> Shape:
        for s in self.shapes:
            if s.name == name:
                return s
        raise KeyError(f"no {name} in the scene")

    def text_tiles(self) -> list[int]:
        """Tiles that contain small text (labels, document entries): the ones reading questions need at 1/4."""
        tiles = {self.tile_of(*s.label_cell) for s in self.shapes}
        if self.document is not None:
            tiles.add(self.tile_of(self.document.x, self.document.y))
        return sorted(tiles)

    def shape_tiles(self, shape: Shape) -> list[int]:
        return sorted(
            {
                self.tile_of(shape.x + i, shape.y + j)
                for i in range(shape.size)
                for j in range(shape.size)
            }
        )


# ---- layout ---------------------------------------------------------------------------------------


class _Occupancy:
    """Which cells are taken; footprints are checked with a ring of free cells around them (the ring is clipped
    at the canvas edge). `spots` answers for every position at once from a 2-D prefix sum."""

    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.taken = np.zeros((height, width), dtype=np.int32)  # [rows, cols]

    def spots(self, w: int, h: int, ring: int, xs=None, ys=None) -> list[tuple[int, int]]:
        """Every (x, y) (from xs × ys, default all) where a w×h footprint fits inside the canvas with `ring`
        free cells around it, in row-major order."""
        if w > self.w or h > self.h:
            return []
        # prefix sums of the grid padded by the ring (outside the canvas counts as free):
        # p[j, i] = taken cells in padded rows < j and padded cols < i, shape [H+2r+1, W+2r+1]
        p = np.zeros((self.h + 2 * ring + 1, self.w + 2 * ring + 1), dtype=np.int32)
        p[1 + ring : 1 + ring + self.h, 1 + ring : 1 + ring + self.w] = self.taken
        p = p.cumsum(0).cumsum(1)
        bh, bw = (
            h + 2 * ring,
            w + 2 * ring,
        )  # footprint plus ring, in padded coordinates starting at (y, x)
        ny, nx = self.h - h + 1, self.w - w + 1
        window = (
            p[bh : bh + ny, bw : bw + nx]
            - p[:ny, bw : bw + nx]
            - p[bh : bh + ny, :nx]
            + p[:ny, :nx]
        )  # [ny, nx]
        ok = window == 0
        if xs is not None:
            keep = np.zeros(nx, dtype=bool)
            keep[[x for x in xs if 0 <= x < nx]] = True
            ok &= keep[None, :]
        if ys is not None:
            keep = np.zeros(ny, dtype=bool)
            keep[[y for y in ys if 0 <= y < ny]] = True
            ok &= keep[:, None]
        ys_ok, xs_ok = np.nonzero(ok)  # row-major order
        return list(zip(xs_ok.tolist(), ys_ok.tolist()))

    def take(self, x: int, y: int, w: int, h: int) -> None:
        self.taken[max(0, y) : max(0, y + h), max(0, x) : max(0, x + w)] = 1


def choose_grid(rng: random.Random, max_tiles: int) -> tuple[int, int]:
    """A (cols, rows) grid with cols·rows ≤ max_tiles, drawn with TILE_WEIGHTS per tile count."""
    grids = [g for g in candidate_grids(1, max_tiles)]
    weights = [
        TILE_WEIGHTS[c * r] / sum(1 for g in grids if g[0] * g[1] == c * r) for c, r in grids
    ]
    return rng.choices(grids, weights)[0]


def _place_document(rng: random.Random, occ: _Occupancy, lv: Level) -> Document | None:
    n = rng.randint(lv.min_entries, lv.max_entries)
    columns = 2 if n > MAX_ENTRY_ROWS else rng.choice((1, 2)) if lv.max_columns > 1 else 1
    width, height = ENTRY_CELLS * columns, 2 * (-(-n // columns)) - 1
    tiles_x, tiles_y = occ.w // CELLS_PER_TILE, occ.h // CELLS_PER_TILE
    if lv.slots:  # near the top-left corner of a random tile
        tx, ty = rng.randrange(tiles_x), rng.randrange(tiles_y)
        spots = occ.spots(
            width, height, 1, xs=(tx * CELLS_PER_TILE + 2,), ys=(ty * CELLS_PER_TILE + 2,)
        )
    else:  # token-aligned (even cells), the whole ring inside the canvas, the text area inside one tile
        candidates = occ.spots(
            width, height, 1, xs=range(2, occ.w - width, 2), ys=range(2, occ.h - height, 2)
        )
        spots = [
            (x, y)
            for x, y in candidates
            if x // CELLS_PER_TILE == (x + width - 1) // CELLS_PER_TILE
            and y // CELLS_PER_TILE == (y + height - 1) // CELLS_PER_TILE
        ]
    if not spots:
        return None
    x, y = rng.choice(spots)
    occ.take(x - 1, y - 1, width + 2, height + 2)
    keys = tuple(rng.sample(DOC_KEYS, n))
    codes = tuple(
        "".join(rng.choice("0123456789") for _ in range(lv.code_digits)) for _ in range(n)
    )
    return Document(x, y, columns, keys, codes)


def _label(rng: random.Random, digits: int, used: set[str]) -> str:
    """A label not yet used in the scene (1 digit: 1–9; 2 digits: 10–99)."""
    while True:
        label = str(rng.randint(1, 9)) if digits == 1 else str(rng.randint(10, 10**digits - 1))
        if label not in used:
            used.add(label)
            return label


def _jitter(
    rng: random.Random, rgb: tuple[int, int, int], amount: int = 12
) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def layout(rng: random.Random, lv: Level, document: bool, min_shapes: int = 1) -> Scene:
    """A random scene at level `lv`; `document` forces a document panel (the document family needs one) and
    `min_shapes` raises the level's minimum number of shapes (the spatial family needs two). Shapes that do not
    fit are dropped, so a caller checks what it needs."""
    cols, rows = choose_grid(rng, lv.max_tiles)
    occ = _Occupancy(cols * CELLS_PER_TILE, rows * CELLS_PER_TILE)
    doc = _place_document(rng, occ, lv) if document else None
    if document and doc is None:
        raise RuntimeError(
            "a document always fits an empty canvas; the layout constants are inconsistent"
        )
    pairs = [(k, c) for k in SHAPES for c in COLOURS]
    rng.shuffle(pairs)
    shapes: list[Shape] = []
    kinds: dict[str, int] = {}
    labels: set[str] = set()
    lo = max(lv.min_objects, min_shapes)
    for kind, colour in pairs[: rng.randint(lo, max(lo, lv.max_objects))]:
        if kinds.get(kind, 0) >= lv.max_same_kind:
            continue
        size = rng.choice(lv.shape_sizes)
        w = size + 1  # the shape block plus its label cell
        if lv.slots:
            spots = occ.spots(w, size, 0, xs=range(0, occ.w, 4), ys=range(0, occ.h, 4))
        else:
            spots = occ.spots(w, size, 1)
        if not spots:
            continue
        x, y = rng.choice(spots)
        occ.take(x, y, w, size)
        label = _label(rng, lv.label_digits, labels)
        shapes.append(Shape(kind, colour, x, y, size, label, _jitter(rng, COLOURS[colour])))
        kinds[kind] = kinds.get(kind, 0) + 1
    shapes.sort(
        key=lambda s: (s.y, s.x)
    )  # reading order, so descriptions list shapes deterministically
    return Scene(
        cols,
        rows,
        rng.choice(list(BACKGROUNDS)),
        rng.choice(PATTERNS),
        rng.choice(INKS),
        tuple(shapes),
        doc,
    )


# ---- rendering ------------------------------------------------------------------------------------


@cache
def font() -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font (Aileron), so rendering never depends on installed fonts."""
    f = ImageFont.load_default(size=FONT_SIZE)
    if not isinstance(f, ImageFont.FreeTypeFont):
        raise RuntimeError(
            "Pillow was built without FreeType; the world needs ImageFont.load_default(size=...)"
        )
    return f


def _glyphs(
    draw: ImageDraw.ImageDraw, cx: int, cy: int, text: str, ink: tuple[int, int, int]
) -> None:
    """Draw `text` from cell (cx, cy), glyph k in slot k (7 px wide), ink vertically centred in the cell."""
    f = font()
    top = (CELL - 8) // 2 - f.getbbox("0")[1]  # digits' ink is 8 px tall at 11 px
    for k, ch in enumerate(text):
        if ch != " ":
            draw.text((cx * CELL + k * PITCH, cy * CELL + top), ch, font=f, fill=ink)


def _key(draw: ImageDraw.ImageDraw, cx: int, cy: int, key: str) -> None:
    """A document key in the first glyph slot of cell (cx, cy): a colour mark (5×8 px, where a glyph's ink
    would be) for a colour key, else the letter in KEY_INK."""
    if key in COLOURS:
        x0, y0 = cx * CELL + 1, cy * CELL + (CELL - 8) // 2
        draw.rectangle([x0, y0, x0 + 4, y0 + 7], fill=COLOURS[key])
    else:
        _glyphs(draw, cx, cy, key, KEY_INK)


def _background(draw: ImageDraw.ImageDraw, scene: Scene) -> None:
    w, h = scene.size
    base = BACKGROUNDS[scene.background]
    shade = tuple(max(0, c - 14) for c in base)
    if (
        scene.pattern == "stripes"
    ):  # faint horizontal stripes at a 9 px period, out of phase with the cells
        for y in range(4, h, 9):
            draw.line([(0, y), (w - 1, y)], fill=shade)
    elif scene.pattern == "dots":
        for y in range(5, h, 10):
            for x in range(5, w, 10):
                draw.point((x, y), fill=shade)
    elif scene.pattern == "gradient":  # darkens by up to 24 levels from top to bottom
        for y in range(h):
            draw.line(
                [(0, y), (w - 1, y)],
                fill=tuple(max(0, c - (24 * y) // max(1, h - 1)) for c in base),
            )


def _shape(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    x0, y0 = s.x * CELL + MARGIN, s.y * CELL + MARGIN
    x1, y1 = (s.x + s.size) * CELL - MARGIN - 1, (s.y + s.size) * CELL - MARGIN - 1
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    edge = tuple(c // 2 for c in s.rgb)
    if s.kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=s.rgb, outline=edge)
    elif s.kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=s.rgb, outline=edge)
    elif s.kind == "triangle":
        draw.polygon([(mx, y0), (x1, y1), (x0, y1)], fill=s.rgb, outline=edge)
    elif s.kind == "diamond":
        draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=s.rgb, outline=edge)
    else:
        raise ValueError(f"unknown shape kind {s.kind!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of size (112·cols, 112·rows); a pure function of `scene`."""
    image = Image.new("RGB", scene.size, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    _background(draw, scene)
    for s in scene.shapes:
        _shape(draw, s)
        lx, ly = s.label_cell
        _glyphs(draw, lx, ly, s.label, scene.ink)
    doc = scene.document
    if doc is not None:
        x0, y0 = doc.x * CELL - 4, doc.y * CELL - 3
        x1, y1 = (doc.x + doc.width) * CELL + 3, (doc.y + doc.height) * CELL + 2
        draw.rectangle([x0, y0, x1, y1], fill=PAPER, outline=(150, 150, 150))
        for i, (key, code) in enumerate(zip(doc.keys, doc.codes)):
            cx, cy = doc.cell(i)
            _key(draw, cx, cy, key)
            _glyphs(draw, cx, cy, " " + code, scene.ink)
    return image
