"""The DvD wire format between the language server and the vision servers (ZeroMQ multipart messages).

Every message is `[MAGIC, kind, header JSON, *blobs]`:

  language → vision (DEALER → ROUTER)
    b"encode"  {"id", "routing": {"mode", "budget"}, "max_tiles"[, "question_dim"]}
                                                 blobs: one encoded image file each[, the question]
    b"ping"    {"id"}
  vision → language
    b"features" {"id", "dim", "dtype": "bfloat16", "images": [ImageMeta...]}  blobs: per image, rows×dim bf16
    b"error"    {"id", "status", "message", "param"}                        (status: HTTP-like 400 / 413 / 500)
    b"pong"     {"id", "stats": {...}}

Features travel one way, in bfloat16 (half the bytes of float32; what the paper sends), row-major
[rows, dim], little-endian as the machine stores them. The tokens-per-tile list of each image travels in its
header so the language server can build the prompt (`<IMG_CONTEXT>` × sum) without touching the tensor.
A question-routed request (`RoutingPolicy.needs_question`) also carries its question's embedding (the mean
token embedding of the last user message's text, computed by the language server, which has the LLM's token
embeddings) as a last blob of `question_dim` float32 numbers, little-endian; the vision server checks that
`question_dim` is its model's language hidden size.
Malformed messages raise `ProtocolError` naming what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tessera.routing import RoutingPolicy

MAGIC = b"TSV1"


class ProtocolError(ValueError):
    """A message that does not follow the wire format."""


@dataclass
class ImageMeta:
    """What the language server needs to know about one encoded image."""

    tokens_per_tile: list[int]
    grid: tuple[int, int]  # (cols, rows) of the tiling, thumbnail not counted
    full_tokens: int  # visual tokens had every tile stayed at 1/4 (for "visual tokens saved")
    cache_hit: bool = False

    @property
    def rows(self) -> int:
        return sum(self.tokens_per_tile)

    @property
    def compressed_tiles(self) -> int:
        full_per_tile = self.full_tokens // max(len(self.tokens_per_tile), 1)
        return sum(1 for t in self.tokens_per_tile if t < full_per_tile)


@dataclass
class EncodedImage:
    meta: ImageMeta
    features: torch.Tensor  # [rows, D]


@dataclass
class Message:
    kind: str
    header: dict[str, Any]
    blobs: list[bytes] = field(default_factory=list)


def pack(
    kind: str, header: dict[str, Any], blobs: list[bytes] | tuple[bytes, ...] = ()
) -> list[bytes]:
    return [MAGIC, kind.encode(), json.dumps(header).encode(), *blobs]


def unpack(frames: list[bytes]) -> Message:
    if len(frames) < 3 or frames[0] != MAGIC:
        raise ProtocolError(
            f"not a tessera vision message ({len(frames)} frames, magic {frames[0][:8]!r})"
            if frames
            else "empty message"
        )
    try:
        header = json.loads(frames[2])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict) or "id" not in header:
        raise ProtocolError("header must be an object with an 'id'")
    return Message(frames[1].decode(errors="replace"), header, [bytes(b) for b in frames[3:]])


# ---- requests -------------------------------------------------------------------------------------------


def question_to_bytes(question: torch.Tensor) -> bytes:
    """A question embedding [Dl] → float32 bytes, little-endian."""
    if question.dim() != 1:
        raise ProtocolError(f"a question embedding is one vector [Dl], got {tuple(question.shape)}")
    return question.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()


def bytes_to_question(blob: bytes, dim: int) -> torch.Tensor:
    """float32 bytes → [dim] float32, checking the length and that every number is finite."""
    if len(blob) != 4 * dim:
        raise ProtocolError(
            f"question blob has {len(blob)} bytes, expected question_dim {dim} × 4 (float32)"
        )
    out = torch.frombuffer(bytearray(blob), dtype=torch.float32) if dim else torch.empty(0)
    if not bool(torch.isfinite(out).all()):
        raise ProtocolError("the question embedding holds a NaN or infinite number")
    return out  # [dim]


def encode_request(
    request_id: str,
    images: list[bytes],
    routing: RoutingPolicy,
    max_tiles: int | None = None,
    question: torch.Tensor | None = None,
) -> list[bytes]:
    """The wire carries the routing's mode and budget; the vision server applies its model's thresholds.
    `question` [Dl] (question routing) goes as a last float32 blob."""
    wire = {"mode": routing.mode, "budget": routing.budget}
    header: dict[str, Any] = {"id": request_id, "routing": wire, "max_tiles": max_tiles}
    blobs = list(images)
    if question is not None:
        header["question_dim"] = int(question.numel())
        blobs.append(question_to_bytes(question))
    return pack("encode", header, blobs)


def parse_encode_request(
    msg: Message, question_dim: int | None = None
) -> tuple[list[bytes], RoutingPolicy, int | None, torch.Tensor | None]:
    """→ (images, routing, max_tiles, question [Dl] or None). `question_dim`: the vision model's language
    hidden size, which a question embedding must have."""
    r = msg.header.get("routing") or {}
    try:
        routing = RoutingPolicy(mode=r.get("mode", "full"), budget=r.get("budget"))
    except ValueError as e:
        raise ProtocolError(str(e)) from None
    blobs, question = list(msg.blobs), None
    dim = msg.header.get("question_dim")
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ProtocolError(f"question_dim must be a positive integer, got {dim!r}")
        if question_dim is not None and dim != question_dim:
            raise ProtocolError(
                f"the question embedding has {dim} numbers but this vision model's language hidden "
                f"size is {question_dim}: language and vision servers must run the same model"
            )
        if not blobs:
            raise ProtocolError("question_dim is set but the request has no question blob")
        question = bytes_to_question(blobs.pop(), dim)
    elif routing.needs_question:
        raise ProtocolError(
            f"routing {routing.mode!r} needs the question's embedding (question_dim and its blob)"
        )
    if not blobs:
        raise ProtocolError("an encode request needs at least one image")
    return blobs, routing, msg.header.get("max_tiles"), question


# ---- replies --------------------------------------------------------------------------------------------


def features_to_bytes(features: torch.Tensor) -> bytes:
    """[rows, D] → bfloat16 bytes, row-major."""
    return (
        features.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    )


def bytes_to_features(blob: bytes, rows: int, dim: int) -> torch.Tensor:
    """bfloat16 bytes → [rows, D] bfloat16 (the caller casts to the LLM's dtype)."""
    if len(blob) != rows * dim * 2:
        raise ProtocolError(
            f"feature blob has {len(blob)} bytes, expected rows {rows} × dim {dim} × 2"
        )
    if rows == 0:
        return torch.empty(0, dim, dtype=torch.bfloat16)
    return torch.frombuffer(bytearray(blob), dtype=torch.bfloat16).view(rows, dim)  # [rows, D]


def features_reply(request_id: str, images: list[EncodedImage]) -> list[bytes]:
    dims = {im.features.shape[1] for im in images}
    if len(dims) != 1:
        raise ProtocolError(f"images of one reply must share the feature dim, got {sorted(dims)}")
    for im in images:
        if im.features.shape[0] != im.meta.rows:
            raise ProtocolError(
                f"image has {im.features.shape[0]} feature rows but its tiles sum to {im.meta.rows}"
            )
    header = {
        "id": request_id,
        "dim": dims.pop(),
        "dtype": "bfloat16",
        "images": [{**asdict(im.meta), "grid": list(im.meta.grid)} for im in images],
    }
    return pack("features", header, [features_to_bytes(im.features) for im in images])


def parse_features(msg: Message) -> list[EncodedImage]:
    h = msg.header
    if h.get("dtype") != "bfloat16":
        raise ProtocolError(f"unsupported feature dtype {h.get('dtype')!r}")
    metas = h.get("images")
    if not isinstance(metas, list) or len(metas) != len(msg.blobs):
        raise ProtocolError(
            f"{len(msg.blobs)} feature blobs for {len(metas) if isinstance(metas, list) else '?'} images"
        )
    out = []
    for m, blob in zip(metas, msg.blobs):
        try:
            meta = ImageMeta(
                tokens_per_tile=[int(t) for t in m["tokens_per_tile"]],
                grid=tuple(m["grid"]),
                full_tokens=int(m["full_tokens"]),
                cache_hit=bool(m.get("cache_hit", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad image metadata {m!r}: {e}") from None
        out.append(EncodedImage(meta, bytes_to_features(blob, meta.rows, int(h["dim"]))))
    return out


def error_reply(
    request_id: str, status: int, message: str, param: str | None = None
) -> list[bytes]:
    return pack("error", {"id": request_id, "status": status, "message": message, "param": param})
