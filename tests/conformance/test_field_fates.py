"""Every field fate of docs/fields.json over HTTP, on each engine: each refused row's sample is a
400 naming the field, each hint row's sample a 200 (alone, and all of a route's hints at once;
chat, completions, responses and conversations); `metadata` and `safety_identifier` land in the
request log; stored chat completions are a 404 that says they are not stored."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL
from tests.server_process import LOG_DIR, ServerProcess
from tests.test_field_table import (
    HINT_CASES,
    REFUSED_CASES,
    body,
    named,
    rows,
    sample_body,
    top,
)

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses",
         "conversations": "/v1/conversations", "embeddings": "/v1/embeddings"}


def _ok(r: httpx.Response) -> None:
    """A 200; a stream that ended whole: `data: [DONE]`, or (the Responses API's named events) a
    last event that is the response's end."""
    assert r.status_code == 200, r.text
    if r.headers["content-type"].startswith("text/event-stream"):
        named_events = [line[len("event: "):] for line in r.text.splitlines() if line.startswith("event: ")]
        if named_events:
            assert named_events[-1] in ("response.completed", "response.incomplete"), r.text[-200:]
        else:
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]


@pytest.mark.parametrize(("route", "row"), REFUSED_CASES)
def test_refused_field_is_a_400_naming_it(http: httpx.Client, route: str, row: dict[str, Any]) -> None:
    r = http.post(PATHS[route], json=sample_body(route, row, MODEL))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "unsupported_parameter", err
    assert err["param"].split(".")[0] == top(row["field"]), err
    assert named(row["field"]) in err["param"] + err["message"], err


@pytest.mark.parametrize(("route", "row"), HINT_CASES)
def test_hint_is_accepted(http: httpx.Client, route: str, row: dict[str, Any]) -> None:
    _ok(http.post(PATHS[route], json=sample_body(route, row, MODEL)))


def _db(server: ServerProcess) -> str:
    return str(LOG_DIR / f"{server.name}-{server.port}.requests.db")  # as tests/server_process.py names it


def _logged(http: httpx.Client, server: ServerProcess, request_id: str) -> sqlite3.Row:
    http.get("/v1/usage")  # returns once the request log has written what just ended
    deadline = time.monotonic() + 10
    while True:
        with sqlite3.connect(_db(server)) as db:
            db.row_factory = sqlite3.Row
            found = db.execute("SELECT * FROM llm_requests WHERE request_id = ?", (request_id,)).fetchone()
        if found is not None or time.monotonic() > deadline:
            assert found is not None, f"no request-log row for {request_id}"
            return found
        time.sleep(0.2)


@pytest.mark.parametrize("route", [route for route in PATHS if rows(route, "hint")])
def test_all_hints_at_once_and_the_log_keeps_metadata(http: httpx.Client, server: ServerProcess, route: str) -> None:
    hints: dict[str, Any] = {}
    for row in rows(route, "hint"):
        hints.setdefault(top(row["field"]), row["sample"])  # a parent's sample before its children's
    hints.setdefault("metadata", {"team": "search"})  # implemented (not a hint) on responses
    hints.setdefault("safety_identifier", "user-7f3a9c")
    request_id = f"fates-{route}-{uuid.uuid4().hex[:8]}"
    _ok(http.post(PATHS[route], json=body(route, MODEL, **hints), headers={"x-request-id": request_id}))
    logged = _logged(http, server, request_id)
    assert json.loads(logged["metadata"]) == hints["metadata"]
    assert logged["safety_identifier"] == hints["safety_identifier"]


def test_stored_chat_completions_are_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="not store"):
        client.chat.completions.retrieve("chatcmpl-123")
    with pytest.raises(openai.NotFoundError, match="not store"):
        client.chat.completions.list()
