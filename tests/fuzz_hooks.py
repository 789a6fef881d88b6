"""Loaded into schemathesis's own process by tests/test_fuzz.py (`SCHEMATHESIS_HOOKS`): generated
requests name the served model, and two checks that schemathesis cannot make from the document
alone."""

from __future__ import annotations

import json
import os
from typing import Any

import jsonschema
import schemathesis

MODEL = os.environ.get("LLM_SERVICE_TEST_FUZZ_MODEL", "smollm2-135m-instruct")
EMBED = "all-minilm-l6-v2"  # the embedding model the fuzzed server serves beside MODEL
ERROR_KEYS = {"message", "type", "param", "code"}
CHUNKS = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/completions": "Completion",
          "/v1/responses": "ResponseStreamEvent"}
# how a Responses stream ends (it has no [DONE])
LAST_EVENTS = ("response.completed", "response.incomplete", "response.failed", "error")


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    """Reach the engine: with a random model name every request is only a 404."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = EMBED if case.operation.path == "/v1/embeddings" else MODEL


@schemathesis.check
def error_shape(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                case: schemathesis.Case) -> bool | None:
    """Every 4xx and 5xx is OpenAI's error object, whatever its route documents."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not OpenAI's error shape: {body!r:.300}"
    assert set(body["error"]) == ERROR_KEYS, f"error keys: {sorted(body['error'])}"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], "no error message"
    return True


@schemathesis.check
def stream_chunks(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                  case: schemathesis.Case) -> bool | None:
    """A stream's events are chunks of the documented schema (JSON inside SSE `data`, which the
    document's JSON Schema only annotates), and a complete stream ends with [DONE]."""
    media = response.headers.get("content-type", [""])[0]
    if response.status_code != 200 or not media.startswith("text/event-stream"):
        return None
    raw = case.operation.schema.raw_schema
    chunk = jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{CHUNKS[case.operation.path]}", "components": raw["components"]})
    frames = [line[6:] for line in response.content.decode().splitlines() if line.startswith("data: ")]
    if case.operation.path == "/v1/responses":
        assert frames and json.loads(frames[-1])["type"] in LAST_EVENTS, f"the stream ends with {frames[-1:]}"
        frames.append("[DONE]")
    assert frames and frames[-1] == "[DONE]", f"the stream does not end with [DONE]: {frames[-1:]}"
    for frame in frames[:-1]:
        errors = sorted(chunk.iter_errors(json.loads(frame)), key=str)
        assert not errors, f"a chunk does not fit {CHUNKS[case.operation.path]}: {errors[0].message}"
    return True
