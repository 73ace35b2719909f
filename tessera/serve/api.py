"""The OpenAI-compatible HTTP API (FastAPI): /v1/chat/completions, /v1/models, /health, /metrics.

Every error leaves as an OpenAI-style body `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx
status, and the server keeps serving. Bodies are parsed by hand (not by FastAPI's dependency injection) so
that invalid JSON and schema errors are 400s that name the offending parameter, as OpenAI's are.
With an API key, every route but /health needs `Authorization: Bearer <key>`, and /health tells
callers without the key only its status (not the engine's counters, the vision workers' endpoints or
PIDs).

Limits on a request body (see docs/log/2026-12-02-serving.md): at most
`ServeOptions.max_body_bytes` bytes (413), `Content-Type` application/json (or none; anything else
is 415), JSON nested at most `MAX_JSON_DEPTH` deep (400). An unexpected error is a 500 body like any
other, so the connection stays usable.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.serve.language_server import Generation, LanguageServer
from tessera.serve.schema import (
    APIError,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    message_body,
    parse_request,
    usage,
)

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 32  # nesting of arrays/objects in a request body (a chat request needs 6)


def build_app(server: LanguageServer, api_key: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(
        title="Tessera", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = server
    model_name = server.options.model_name

    def error_response(err: APIError, extra: dict[str, str] | None = None) -> JSONResponse:
        server.metrics.record_error(err.status)
        headers = {"Retry-After": "1"} if err.status in (429, 503) else {}
        if err.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        if err.code == "request_too_large":  # the rest of the body is unread: the connection ends
            headers = {"Connection": "close"}
        headers = {**headers, **(extra or {})}
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def authorised(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        err_ = APIError(err.status_code, str(err.detail), code=code)
        return error_response(err_, dict(err.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        return error_response(APIError(500, f"internal error: {type(err).__name__}: {err}"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            if not authorised(request):
                return error_response(
                    APIError(
                        401,
                        "invalid or missing API key (expected 'Authorization: Bearer <key>')",
                        code="invalid_api_key",
                    )
                )
        try:
            return await call_next(request)
        except Exception as e:  # answered here: Starlette's last resort drops the connection
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health")
    async def health(request: Request):
        status = server.status()
        alive = server.alive()
        v = status["vision"]
        body = {
            "status": "ok" if alive else "engine_down",
            "engine": {"running": status["engine"].running, "waiting": status["engine"].waiting},
            "vision": v,
        }
        if alive and v.get("workers_total", 0) and v.get("workers_alive", 0) < v["workers_total"]:
            body["status"] = "degraded"
        if not authorised(request):
            body = {"status": body["status"]}  # endpoints and PIDs are for the key's holders
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            server.metrics.render(server.status()), media_type="text/plain; version=0.0.4"
        )

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "tessera",
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        data = await read_json(request, server.options.max_body_bytes)
        req = parse_request(data)
        if req.model is not None and req.model != model_name:
            raise APIError(
                404,
                f"the model '{req.model}' does not exist; this server serves '{model_name}'",
                param="model",
                code="model_not_found",
            )
        prepared = await server.prepare(req)
        gen = server.generate(prepared, req)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(gen, req, model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await _complete(gen, req, model_name)

    return app


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON, within the size, media type and depth limits (413 / 415 / 400)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise APIError(
            415,
            f"the request body must be application/json, not {ctype!r}",
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(
            413,
            f"the request body has {declared} bytes, over the {max_bytes} allowed",
            code="request_too_large",
        )
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise APIError(
                413,
                f"the request body is larger than the {max_bytes} bytes allowed",
                code="request_too_large",
            )
    try:
        data, too_deep = json.loads(raw), False
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(
            400, f"the request body is not valid JSON: {e}", code="invalid_json"
        ) from None
    except RecursionError:  # the decoder's own guard (about 1000 levels)
        data, too_deep = None, True
    if too_deep or json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise APIError(
            400,
            f"the request body nests arrays/objects deeper than {MAX_JSON_DEPTH}",
            code="invalid_json",
        )
    return data


def json_depth(data: Any, limit: int) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), iteratively; stops counting past `limit`."""
    deepest = 0
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


async def _complete(gen: Generation, req: ChatCompletionRequest, model: str) -> dict:
    n = len(gen.ids)
    texts, reasonings, reasons = [""] * n, [""] * n, [None] * n
    async with contextlib.aclosing(gen.events()) as events:
        async for ev in events:
            if ev.finish_reason == "error":
                raise APIError(500, f"generation failed: {ev.error}", code="generation_error")
            texts[ev.index] += ev.delta.content
            reasonings[ev.index] += ev.delta.reasoning
            if ev.finish_reason:
                reasons[ev.index] = ev.finish_reason
    choices = [
        {
            "index": i,
            "message": message_body(
                texts[i], reasonings[i].strip() if gen.prepared.thinking else None
            ),
            "finish_reason": reasons[i],
            "logprobs": None,
        }
        for i in range(n)
    ]
    p = gen.prepared
    return completion_body(
        completion_id(),
        model,
        choices,
        usage(
            len(p.prompt_ids), sum(gen.completion_tokens), p.visual_tokens, p.visual_tokens_saved
        ),
    )


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(
    gen: Generation, req: ChatCompletionRequest, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk per choice, content deltas, a finish chunk per choice, [usage], [DONE]."""
    cid, created = completion_id(), int(time.time())

    def chunk(choices, use=None):
        return _data(chunk_body(cid, model, created, choices, use, with_usage_field=include_usage))

    for i in range(len(gen.ids)):
        yield chunk(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    async with contextlib.aclosing(gen.events()) as events:
        async for ev in events:
            if ev.finish_reason == "error":
                yield _data(
                    APIError(500, f"generation failed: {ev.error}", code="generation_error").body()
                )
                break
            delta = {}
            if ev.delta.reasoning:
                delta["reasoning_content"] = ev.delta.reasoning
            if ev.delta.content:
                delta["content"] = ev.delta.content
            if delta:
                yield chunk(
                    [{"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": None}]
                )
            if ev.finish_reason:
                yield chunk(
                    [
                        {
                            "index": ev.index,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": ev.finish_reason,
                        }
                    ]
                )
    if include_usage:
        p = gen.prepared
        yield _data(
            chunk_body(
                cid,
                model,
                created,
                [],
                usage(
                    len(p.prompt_ids),
                    sum(gen.completion_tokens),
                    p.visual_tokens,
                    p.visual_tokens_saved,
                ),
                True,
            )
        )
    yield "data: [DONE]\n\n"
