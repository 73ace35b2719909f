"""Dense grounding targets: what every patch cell of a scene shows, for an auxiliary loss on the visual tokens.

A question supervises one or three answer tokens; the scene knows exactly which glyph sits in every glyph slot
and which shape covers every cell. Training the visual tokens to say so (a linear probe on each 1/4 token,
tessera.train.grounding_losses) gives the ViT and the projector a signal at every token of every tile, the way
InternVL's pre-training leans on OCR and grounding data, so the language model finds reading and object
features already in place when it learns to look things up.

Per cell, `FIELDS` integer targets (0 = nothing):
  glyph0, glyph1  the two glyph slots: 1–10 the digits 0–9, 11–16 a document's colour mark (DOC_KEYS order)
  object          1 + kind·6 + colour for a cell covered by a shape's block (SHAPES × COLOURS order)
  anchor          1 on the top-left cell of each shape (one per shape: what counting needs)
  column, row     1 + the cell's column / row on a view of the whole canvas (the thumbnail's 8×8 grid, or the only
                  tile of a one-tile image); IGNORE on the tiles of a multi-tile image, whose tokens cannot know
                  which tile they are in. Spatial questions compare two shapes' places: the values an attention
                  head fetches from the whole-canvas view must say where they were.
"""

from __future__ import annotations

import numpy as np

from tessera.world.scenes import CELL, CELLS_PER_TILE, COLOURS, DOC_KEYS, SHAPES, Scene

FIELDS = ("glyph0", "glyph1", "object", "anchor", "column", "row")
_COLUMN, _ROW = FIELDS.index("column"), FIELDS.index("row")
NUM_CLASSES = 1 + len(SHAPES) * len(COLOURS)  # the widest field (object): 25
IGNORE = -100
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
_KIND_INDEX = {k: i for i, k in enumerate(SHAPES)}


def _glyph_class(ch: str) -> int:
    if ch.isdigit():
        return 1 + int(ch)
    raise ValueError(f"the world writes digits only, not {ch!r}")


def cell_targets(scene: Scene) -> np.ndarray:
    """int64 [rows·8, cols·8, len(FIELDS)]: the targets of every cell of the canvas (row-major cells)."""
    h, w = scene.rows * CELLS_PER_TILE, scene.cols * CELLS_PER_TILE
    out = np.zeros((h, w, len(FIELDS)), dtype=np.int64)
    for s in scene.shapes:
        out[s.y : s.y + s.size, s.x : s.x + s.size, 2] = (
            1 + _KIND_INDEX[s.kind] * len(COLOURS) + _COLOUR_INDEX[s.colour]
        )
        out[s.y, s.x, 3] = 1
        lx, ly = s.label_cell
        for k, ch in enumerate(
            s.label
        ):  # a label's glyph k sits in slot k of the label cell (scenes._glyphs)
            out[ly, lx, k] = _glyph_class(ch)
    doc = scene.document
    if doc is not None:
        for i, (key, code) in enumerate(zip(doc.keys, doc.codes)):
            cx, cy = doc.cell(i)
            out[cy, cx, 0] = 11 + DOC_KEYS.index(
                key
            )  # the mark in slot 0, then the code's glyphs in slots 1, 2, 3
            for k, ch in enumerate(code, start=1):
                out[cy, cx + k // 2, k % 2] = _glyph_class(ch)
    return out


def _place(view: np.ndarray) -> np.ndarray:
    """Write every cell's 1 + column and 1 + row into a whole-canvas view [8, 8, F] (in place; returned)."""
    c = view.shape[0]
    view[..., _COLUMN] = 1 + np.arange(c)[None, :]
    view[..., _ROW] = 1 + np.arange(c)[:, None]
    return view


def thumbnail_targets(scene: Scene) -> np.ndarray:
    """int64 [8, 8, len(FIELDS)] for the thumbnail (the whole canvas squeezed into one tile): each shape's
    object class and anchor on the thumbnail cell holding its centre (a shape shrinks to about one cell there),
    nothing elsewhere; glyphs are smeared below legibility, so their slots are IGNORE. Two shapes whose centres
    share a thumbnail cell make that cell IGNORE. This is the one view where every shape of a multi-tile image
    appears once and in place, which is what counting and spatial questions need."""
    c = CELLS_PER_TILE
    out = np.zeros((c, c, len(FIELDS)), dtype=np.int64)
    out[..., :2] = IGNORE
    w, h = scene.size
    seen: set[tuple[int, int]] = set()
    for s in scene.shapes:
        cx, cy = s.centre
        tx, ty = min(c - 1, int(cx * c / w)), min(c - 1, int(cy * c / h))
        if (tx, ty) in seen:
            out[ty, tx, 2:] = IGNORE
            continue
        seen.add((tx, ty))
        out[ty, tx, 2] = 1 + _KIND_INDEX[s.kind] * len(COLOURS) + _COLOUR_INDEX[s.colour]
        out[ty, tx, 3] = 1
    return _place(out)


def tile_targets(scene: Scene, thumbnail: bool) -> np.ndarray:
    """int64 [N, 8, 8, len(FIELDS)] in the processor's tile order: row-major tiles, then the thumbnail
    (`thumbnail_targets`)."""
    cells = cell_targets(scene)  # [rows·8, cols·8, F]
    c = CELLS_PER_TILE
    tiles = cells.reshape(scene.rows, c, scene.cols, c, len(FIELDS)).transpose(
        0, 2, 1, 3, 4
    )  # [rows, cols, 8, 8, F]
    tiles = tiles.reshape(
        scene.rows * scene.cols, c, c, len(FIELDS)
    )  # [N, 8, 8, F], row-major tiles
    if len(tiles) == 1:
        _place(tiles[0])  # the only tile is the whole canvas
    else:
        tiles[..., [_COLUMN, _ROW]] = IGNORE
    if thumbnail:
        tiles = np.concatenate([tiles, thumbnail_targets(scene)[None]])
    return tiles


def tokens_per_side(tokens_per_tile: int) -> int:
    """Side of a tile's square grid of 1/4 tokens; each token covers an equal block of the tile's patch cells."""
    per_side = int(round(tokens_per_tile**0.5))
    if per_side * per_side != tokens_per_tile or CELLS_PER_TILE % per_side:
        raise ValueError(
            f"{tokens_per_tile} tokens per tile do not tile an {CELLS_PER_TILE}×{CELLS_PER_TILE} patch grid"
        )
    return per_side


def thumbnail_token_of_cell(scene: Scene, x: int, y: int, tokens_per_tile: int) -> int | None:
    """Ordinal, among the image's visual tokens, of the thumbnail's 1/4 token that shows the centre of canvas cell
    (x, y); None for a one-tile image, which has no thumbnail (the processor adds one only to several tiles)."""
    tiles = scene.cols * scene.rows
    if tiles == 1:
        return None
    per_side = tokens_per_side(tokens_per_tile)
    w, h = scene.size
    tx = min(
        per_side - 1, int((x + 0.5) * CELL * per_side / w)
    )  # the canvas squeezed onto per_side × per_side
    ty = min(per_side - 1, int((y + 0.5) * CELL * per_side / h))
    return tiles * tokens_per_tile + ty * per_side + tx


def place_of_cells(scene: Scene, cells) -> tuple[int, int]:
    """(column, row) of the centre of `cells` (a shape's block) on the whole-canvas view's 8×8 grid: the place a
    spatial answer compares (the thumbnail's cell when there are several tiles, the only tile's cell otherwise)."""
    w, h = scene.size
    cx = sum(x + 0.5 for x, _ in cells) / len(cells) * CELL  # px on the canvas
    cy = sum(y + 0.5 for _, y in cells) / len(cells) * CELL
    return min(CELLS_PER_TILE - 1, int(cx * CELLS_PER_TILE / w)), min(
        CELLS_PER_TILE - 1, int(cy * CELLS_PER_TILE / h)
    )


def token_of_cell(scene: Scene, x: int, y: int, tokens_per_tile: int) -> int:
    """Ordinal, among the image's visual tokens in prompt order, of the 1/4 token that shows cell (x, y) of a tile
    (pixel_shuffle v2: token (i, j) of a tile holds the k×k patch block whose top-left is (i·k, j·k), row-major)."""
    per_side = tokens_per_side(tokens_per_tile)
    k = CELLS_PER_TILE // per_side
    lx, ly = x % CELLS_PER_TILE, y % CELLS_PER_TILE
    return scene.tile_of(x, y) * tokens_per_tile + (ly // k) * per_side + lx // k
