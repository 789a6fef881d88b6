"""The one place that frames Server-Sent Events: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`
(chat, completions), or named events without `[DONE]` (`event: response.created\\ndata: {json}`,
the Responses API's framing: an item `(name, json)` of the iterator is a named event).

`stream` takes an async iterator of JSON strings (one per event). If the iterator raises after
the response has started, the client gets one `data: {"error": {...}}` event in OpenAI's error
shape and the stream ends without `[DONE]`, so a client can tell a failed stream from a complete
one. When the client disconnects, sse-starlette cancels the iterator; its `finally` blocks
abort the engine request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from server.errors import APIError, EngineError

log = logging.getLogger(__name__)

DONE = "[DONE]"
# keep idle proxies from closing a stream while a long prompt is prefilled
PING_SECONDS = 15


def _event(data: str, name: str | None = None) -> ServerSentEvent:
    return ServerSentEvent(data=data, event=name, sep="\n")


async def _frames(events: AsyncIterator[str] | AsyncIterator[tuple[str, str]], done: bool) -> AsyncIterator[ServerSentEvent]:
    try:
        async for item in events:
            yield _event(item[1], item[0]) if isinstance(item, tuple) else _event(item)
    except APIError as e:
        if e.status_code >= 500:
            log.error("stream failed: %s", e.message)
        yield _event(json.dumps(e.to_dict()))
        return
    except Exception as e:
        log.exception("stream failed")
        yield _event(json.dumps(EngineError(f"Internal server error: {type(e).__name__}: {e}").to_dict()))
        return
    if done:
        yield _event(DONE)


def stream(events: AsyncIterator[str] | AsyncIterator[tuple[str, str]], headers: dict[str, str] | None = None,
           on_close: Callable[[], None] | None = None, done: bool = True) -> EventSourceResponse:
    """`on_close` runs after the response, however it ended (also if `events` never started);
    `done`: end with `data: [DONE]` (not in the Responses API)."""
    return EventSourceResponse(
        _frames(events, done),
        sep="\n",
        ping=PING_SECONDS,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        background=BackgroundTask(on_close) if on_close is not None else None,
    )
