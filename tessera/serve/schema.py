"""OpenAI chat-completions request/response shapes, validation, and OpenAI-style error bodies.

Only what Tessera serves is modelled; unknown top-level fields are ignored (as OpenAI-compatible servers do)
so clients that send e.g. `user` or `logit_bias: null` keep working. Tessera's own extras (sent by the
official client through `extra_body`): `thinking` (or vLLM/Qwen3's `chat_template_kwargs.enable_thinking`),
`routing` (one of tessera.routing.MODES; "question" routes on the last user message's text and needs a
model with a question-aware router), `visual_token_budget` (max visual tokens over the request's images) and
`max_tiles` (tiling limit per image, at most the model's), `ignore_eos` (benchmarks: run to max_tokens).

Types are as strict as OpenAI's: integers must be JSON integers (not 3.0, "5" or true), booleans
JSON booleans, numbers JSON numbers. A `seed` is a 64-bit integer (signed or unsigned:
-2^63 <= seed < 2^64). At most `MAX_STOPS` stop strings of at most `MAX_STOP_CHARS` characters each.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from tessera.routing import MODES


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "service_unavailable",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


# ---- request --------------------------------------------------------------------------------------------

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 1024  # per stop string; the hold-back check is linear in it (serve/detok.py)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a 64-bit generator seed holds, signed or unsigned


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _not_empty_list(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("content must not be an empty list")
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="ignore")
    enable_thinking: StrictBool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    n: StrictInt = Field(default=1, ge=1, le=16)
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: StrictStr | list[StrictStr] | None = None
    # Tessera extras
    thinking: StrictBool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    routing: Literal[MODES] | None = None  # type: ignore[valid-type]
    visual_token_budget: StrictInt | None = Field(default=None, ge=1)
    max_tiles: StrictInt | None = Field(default=None, ge=1)
    ignore_eos: StrictBool = False  # generate exactly max_tokens (benchmarks; as vLLM's extra)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOPS} non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string has at most {MAX_STOP_CHARS} characters")
        return stops

    @property
    def thinking_enabled(self) -> bool:
        if self.thinking is not None:
            return self.thinking
        if (
            self.chat_template_kwargs is not None
            and self.chat_template_kwargs.enable_thinking is not None
        ):
            return self.chat_template_kwargs.enable_thinking
        return False

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(data: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its parameter."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        # of a union's alternatives, the deepest error names the parameter best (a list
        # content's part, not "content should be a string")
        err = max(e.errors(), key=lambda er: len(er["loc"]))
        param = _param_path(err) or None
        missing = err["type"] == "missing"
        message = (
            f"missing required parameter '{param}'"
            if missing
            else f"invalid '{param}': {err['msg']}"
        )
        raise APIError(
            400,
            message,
            param=param,
            code="missing_required_parameter" if missing else "invalid_value",
        ) from None


def _param_path(err: dict) -> str:
    """A pydantic error location as OpenAI's dotted parameter path, without union branch labels
    (`str`, `list[...]`) and discriminator tags; a part whose `type` is unknown is reported at its
    `type`."""
    out: list[str] = []
    tagged = False  # the segment after the next index is a discriminated union's tag
    skip_tag = False
    for seg in err["loc"]:
        if isinstance(seg, int):
            out.append(str(seg))
            skip_tag, tagged = tagged, False
            continue
        if skip_tag:
            skip_tag = False
            continue
        if "[" in seg or seg in ("str", "int", "float", "bool", "none"):
            tagged = tagged or seg.startswith("list[tagged-union[")
            continue
        out.append(seg)
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        out.append("type")
    return ".".join(out)


# ---- responses ------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, visual: int = 0, visual_saved: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"image_tokens": visual, "image_tokens_saved": visual_saved},
    }


def message_body(text: str, reasoning: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning is not None:
        body["reasoning_content"] = reasoning
    return body


def completion_body(
    cid: str, model: str, choices: list[dict[str, Any]], use: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chunk_body(
    cid: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    use: dict[str, Any] | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if with_usage_field:
        body["usage"] = use
    return body
