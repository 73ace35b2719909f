"""OpenAI messages → Tessera's chat template, and image URLs → bytes.

A conversation is rendered in the model's template (internvl2_5 / ChatML, tessera.chat): optional system
turn, then the user/assistant turns, ending at the assistant's turn (plus the empty think block when thinking
is off). Images of a user message are placed before its text, as InternVL's template does; when a
conversation carries more than one image they are numbered `Image-1: ...` across the whole conversation.
A single user message renders exactly like `ChatTokenizer.build_prompt`.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from tessera.serve.schema import APIError, ChatCompletionRequest, ImagePart, TextPart

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)$",
    re.S,
)


@dataclass
class ImageRef:
    """Where an image came from: the decoded bytes of a data: URL, or a remote URL to fetch."""

    index: int  # position over the whole conversation
    param: str  # e.g. messages.0.content.1.image_url.url
    data: bytes | None = None
    url: str | None = None


@dataclass
class Conversation:
    system: str | None
    turns: list[tuple[str, str, list[int]]]  # (role, text, indices of this turn's images)
    images: list[ImageRef]


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    m = _DATA_URL.match(url)
    if m is None or not m.group("b64"):
        raise APIError(
            400,
            "image data URLs must look like data:image/png;base64,<data>",
            param=param,
            code="invalid_image_url",
        )
    if m.group("mime") and not m.group("mime").startswith("image/"):
        raise APIError(
            400,
            f"data URL has media type {m.group('mime')!r}, expected image/*",
            param=param,
            code="invalid_image_url",
        )
    payload = m.group("data")
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(
            413, f"image is larger than {max_bytes} bytes", param=param, code="image_too_large"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(
            400, f"image data is not valid base64 ({e})", param=param, code="invalid_base64"
        ) from None
    if not data:
        raise APIError(400, "image data is empty", param=param, code="invalid_image")
    return data


def read_conversation(
    req: ChatCompletionRequest, max_images: int, max_image_bytes: int, allow_remote: bool
) -> Conversation:
    """Split the messages into system text, turns and image references (validating every URL)."""
    system_parts: list[str] = []
    turns: list[tuple[str, str, list[int]]] = []
    images: list[ImageRef] = []
    for mi, msg in enumerate(req.messages):
        content = msg.content
        texts: list[str] = []
        mine: list[int] = []
        if isinstance(content, str):
            texts.append(content)
        elif content is not None:
            for pi, part in enumerate(content):
                if isinstance(part, TextPart):
                    texts.append(part.text)
                    continue
                assert isinstance(part, ImagePart)
                param = f"messages.{mi}.content.{pi}.image_url.url"
                if msg.role != "user":
                    raise APIError(
                        400,
                        f"images are only accepted in user messages, not {msg.role}",
                        param=param,
                    )
                url = part.image_url.url
                if url.startswith("data:"):
                    ref = ImageRef(
                        len(images), param, data=decode_data_url(url, param, max_image_bytes)
                    )
                elif url.startswith(("http://", "https://")):
                    if not allow_remote:
                        raise APIError(
                            400,
                            "remote image URLs are disabled on this server; send the image as a "
                            "data: URL (or start the server with --allow-remote-images)",
                            param=param,
                            code="remote_images_disabled",
                        )
                    ref = ImageRef(len(images), param, url=url)
                else:
                    raise APIError(
                        400,
                        "image_url.url must be a data: URL (or http(s) when enabled)",
                        param=param,
                        code="invalid_image_url",
                    )
                images.append(ref)
                mine.append(ref.index)
                if len(images) > max_images:
                    raise APIError(
                        400,
                        f"at most {max_images} images per request",
                        param=param,
                        code="too_many_images",
                    )
        text = "\n".join(texts)
        if msg.role in ("system", "developer"):
            system_parts.append(text)
        else:
            turns.append((msg.role, text, mine))
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "the last message must come from the user", param="messages")
    return Conversation("\n".join(system_parts) if system_parts else None, turns, images)


def render_prompt(
    tokenizer, conv: Conversation, image_tokens: list[int], thinking: bool
) -> list[int]:
    """Token ids of the conversation in the chat template; image i carries image_tokens[i] <IMG_CONTEXT>."""
    if len(image_tokens) != len(conv.images):
        raise ValueError(f"{len(image_tokens)} token counts for {len(conv.images)} images")
    # earlier assistant answers go back without their think blocks
    turns = [
        (
            role,
            tokenizer.final_answer(body) if role == "assistant" and "</think>" in body else body,
            mine,
        )
        for role, body, mine in conv.turns
    ]
    ids = tokenizer.encode(tokenizer.render(turns, image_tokens, thinking, conv.system))
    tokenizer.check_image_tokens(ids, image_tokens)
    return ids
