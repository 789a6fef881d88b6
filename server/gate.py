"""Every HTTP request passes the gate first: a request id, the key check, rate-limit headers on
the response, and the one place it is accounted for (metrics and the request log).

What the rest of the server learns about a request on its way (the model that served it, its
tokens, why it finished) goes into its `Access` record, a typed object the gate creates and the
pipeline fills in; the gate turns it into a metrics sample and a request-log row when the
response has gone out, however it ended.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import batches
from server.auth import Key
from server.errors import AuthenticationError
from server.store import Row, utcnow

if TYPE_CHECKING:
    from server.app import ServerState

# route labels for metrics: the paths we serve, never raw client paths (unbounded cardinality)
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/conversations",
          "/v1/files", "/v1/batches", "/v1/models", "/v1/usage", "/v1/admin/models",
          "/v1/admin/system", "/tokenize", "/detokenize", "/health", "/ready", "/live", "/metrics", "/",
          "/chat")
# paths behind the keys (when keys are configured) besides everything under /v1/
KEYED = ("/tokenize", "/detokenize")
# ...and the paths whose requests go into the request log
LOGGED = KEYED
# the API's description and its pages: open, unless --docs-require-key
DOCS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def route_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/admin/models/"):
        return "/v1/admin/models/{model}"
    if path.startswith("/v1/chat/completions/"):
        return "/v1/chat/completions/{id}"
    for base in ("/v1/responses/", "/v1/conversations/", "/v1/files/", "/v1/batches/"):
        if path.startswith(base):
            return base + "{id}" + ("/items" if "/items" in path else "/input_items" if path.endswith("/input_items")
                                    else "/cancel" if path.endswith("/cancel")
                                    else "/content" if path.endswith("/content") else "")
    if path.startswith("/chat/assets/"):
        return "/chat/assets/{name}"
    return path if path in ROUTES else "other"


@dataclass
class Access:
    """One request's record: written by the gate and the pipeline, read once by `Gate._account`."""

    request_id: str
    arrived: datetime
    key: Key | None = None
    model: str = ""  # the model that served it ("" until one is chosen: unknown names are not labels)
    engine: str | None = None
    alias: str | None = None  # the name the client asked for, when it was an alias
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    queued_ms: float | None = None  # how long it waited for a slot of its model's engine
    finish_reason: str | None = None
    prompt: str | None = None  # kept only with --log-content
    answer: str | None = None
    metadata: str | None = None  # the client's `metadata` (JSON), a hint kept for the operator
    safety_identifier: str | None = None
    constrained: str | None = None  # what the answer had to match: json, regex, grammar, structural_tag, tools
    tool_calls: int | None = None  # tool calls in the answers
    # a background response: the gate leaves its accounting to the work that outlives the request
    deferred: bool = False
    batch_id: str | None = None  # a batch's line, run by this server's batch runner


def access(request: Request) -> Access:
    """The record of the request being served (the gate put it there)."""
    record: Access = request.scope["state"]["access"]
    return record


class Gate:
    """ASGI middleware: `x-request-id` (the client's when it sent a sane one), keys on `/v1/*` and
    `/tokenize`, `/detokenize` (and `/metrics`, the docs, when so set), a limited key's rate-limit headers on
    every response, and the accounting."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        record = Access(request_id=given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex, arrived=utcnow())
        scope.setdefault("state", {})["access"] = record
        path: str = scope["path"]
        status = 500
        started = time.monotonic()
        try:
            runner = state.batch_runner
            if runner is not None and runner.trusted(headers.get(batches.HEADER)):
                # a batch's line, sent by this process's runner: it runs as the batch's owner
                record.batch_id = headers.get(batches.BATCH_HEADER)
                owner = batches.owner_of(headers.get(batches.OWNER_HEADER))
                record.key = state.keys.named(owner) if owner else None
                if state.keys.enabled and record.key is None:
                    e = AuthenticationError(f"The key {owner!r} that created this batch is no longer configured.")
                    status = e.status_code
                    await JSONResponse(e.to_dict(), status_code=status)(scope, receive, send)
                    return
            elif (path.startswith("/v1/") or path in KEYED
                    or (path == "/metrics" and state.settings.metrics_require_key)
                    or (path in DOCS and state.settings.docs_require_key)):
                try:
                    record.key = state.keys.authenticate(headers.get("authorization"))
                except AuthenticationError as e:
                    status = e.status_code
                    response = JSONResponse(e.to_dict(), status_code=status, headers={
                        "x-request-id": record.request_id, "www-authenticate": "Bearer"})
                    await response(scope, receive, send)
                    return

            async def send_with_headers(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    out = MutableHeaders(scope=message)
                    out["x-request-id"] = record.request_id
                    # which model served it: an alias's chosen variant, for A/B comparisons
                    if record.model:
                        out["x-llm-model"] = record.model
                    for name, value in (await state.key_limits.headers(record.key)).items():
                        if name not in out:
                            out[name] = value
                await send(message)

            await self.app(scope, receive, send_with_headers)
        finally:
            if not record.deferred or status >= 400:
                account(state, record, path, status, time.monotonic() - started)


def account(state: ServerState, record: Access, path: str, status: int, seconds: float) -> None:
    """A request's metrics sample and request-log row: once, when it has ended (for a background
    response, when its work has)."""
    route = route_label(path)
    state.metrics.requests.labels(route, record.model, str(status)).inc()
    if state.request_log is not None and (path.startswith("/v1/") or path in LOGGED):
        state.request_log.record(Row(
            time=record.arrived, request_id=record.request_id, route=route, status=status,
            latency_ms=seconds * 1000, key_name=record.key.name if record.key else None,
            model=record.model or None, engine=record.engine, alias=record.alias,
            prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
            ttft_ms=record.ttft_ms, queued_ms=record.queued_ms, finish_reason=record.finish_reason, prompt=record.prompt,
            answer=record.answer, metadata=record.metadata, safety_identifier=record.safety_identifier,
            constrained=record.constrained, tool_calls=record.tool_calls, batch_id=record.batch_id,
        ))
    if record.constrained is not None and 200 <= status < 300:
        state.metrics.constrained.labels(route, record.model, record.constrained).inc()
    if record.tool_calls:
        state.metrics.tool_calls.labels(record.model).inc(record.tool_calls)
