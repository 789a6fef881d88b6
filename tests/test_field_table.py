"""docs/fields.json against the world (no server): every field OpenAI's SDK and vLLM define has a
row, the README's table is what fields.json renders, and our schemas accept exactly the rows that
are implemented or hints and refuse the refused ones (each row's `sample` is validated here; the
same samples go over HTTP in tests/conformance/test_field_fates.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from typing import Any

import pytest
from pydantic import ValidationError

from server.errors import APIError, invalid_request_from
from server.protocol.chat import (
    CHAT_ROLES,
    REFUSED_PARTS,
    TEXT_PARTS,
    ChatCompletionRequest,
    ChatMessage,
)
from server.protocol.common import SamplingFields
from server.protocol.completions import CompletionRequest
from tests.server_process import ROOT

ROWS: list[dict[str, Any]] = json.loads((ROOT / "docs" / "fields.json").read_text())
SCHEMAS: dict[str, type[SamplingFields]] = {"chat": ChatCompletionRequest, "completions": CompletionRequest}
MINIMAL: dict[str, dict[str, Any]] = {
    "chat": {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1},
    "completions": {"prompt": "Once upon a time", "max_tokens": 1},
}


def top(field: str) -> str:
    """The request field a row lives in: `messages[].role=tool` -> `messages`."""
    return re.split(r"[.\[=]", field, maxsplit=1)[0]


def named(field: str) -> str:
    """The word a refusal must name (in its param or message): the row's last name (`tool_call_id`,
    `tool` for `messages[].role=tool`)."""
    words = [w for w in re.split(r"[.=\[\]]+", field) if w and not w.startswith("<")]
    return words[-1]


def rows(route: str, *fates: str, top_level: bool | None = None) -> list[dict[str, Any]]:
    return [r for r in ROWS if route in r["routes"] and (not fates or r["fate"] in fates)
            and (top_level is None or (top(r["field"]) == r["field"]) == top_level)]


def sampled(route: str, fate: str) -> list[dict[str, Any]]:
    return [r for r in rows(route, fate) if "sample" in r]


def body(route: str, model: str, **fields: Any) -> dict[str, Any]:
    """A request for `route` with `fields` set (stream_options need stream)."""
    out = {"model": model, **MINIMAL[route], **fields}
    if "stream_options" in fields:
        out["stream"] = True
    return out


def sample_body(route: str, row: dict[str, Any], model: str) -> dict[str, Any]:
    return body(route, model, **{top(row["field"]): row["sample"]})


def ids(cases: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{route}:{row['field']}" for route, row in cases]


def _fields_table() -> Any:
    spec = importlib.util.spec_from_file_location("fields_table", ROOT / "docs" / "fields_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ (a) coverage


def test_every_openai_field_has_a_row() -> None:
    from openai.types import completion_create_params as completions
    from openai.types.chat import completion_create_params as chat

    for route, params in (("chat", chat.CompletionCreateParamsBase), ("completions", completions.CompletionCreateParamsBase)):
        missing = set(params.__annotations__) - {r["field"] for r in rows(route)}
        assert not missing, f"OpenAI's {route} fields without a row in docs/fields.json: {sorted(missing)}"


def test_every_vllm_field_has_a_row() -> None:
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletion

    for route, schema in (("chat", VllmChat), ("completions", VllmCompletion)):
        missing = set(schema.model_fields) - {r["field"] for r in rows(route)}
        assert not missing, f"vLLM's {route} fields without a row in docs/fields.json: {sorted(missing)}"


# ------------------------------------------------------------------------------ (b) the README


def test_readme_table_is_rendered_from_fields_json() -> None:
    table = _fields_table()
    readme = (ROOT / "README.md").read_text()
    assert table.replace(readme, table.render(ROWS)) == readme, "README.md is stale: run python docs/fields_table.py"


def test_rows_are_well_formed() -> None:
    keys = {"field", "routes", "sources", "fate", "note", "with", "sample"}
    for r in ROWS:
        assert set(r) <= keys and r["fate"] in ("implemented", "hint", "refused"), r
        assert r["routes"] and set(r["routes"]) <= set(SCHEMAS) and set(r["sources"]) <= {"openai", "vllm"}, r
        assert "note" in r or "with" in r, r
    seen = [(r["field"], route) for r in ROWS for route in r["routes"]]
    assert len(seen) == len(set(seen)), "a field has two rows for one route"


# ------------------------------------------------------------------------------ (c) our schemas


@pytest.mark.parametrize("route", list(SCHEMAS))
def test_schema_accepts_what_the_table_says(route: str) -> None:
    schema = SCHEMAS[route]
    refused = schema.REFUSED
    accepted = set(schema.model_fields) | set(refused)
    assert not accepted - {r["field"] for r in rows(route, top_level=True)}, "accepted fields without a row"
    for r in rows(route, top_level=True):
        if r["fate"] == "refused":
            # refused by name, or by value (response_format, modalities): then its sample shows it
            assert r["field"] in refused or "sample" in r, r["field"]
        else:
            assert r["field"] in schema.model_fields and r["field"] not in refused, r["field"]
        if r["fate"] != "implemented":
            assert "sample" in r, f"{r['field']}: refused and hint rows need a sample"


def test_messages_and_parts_match_the_table() -> None:
    chat = {r["field"]: r["fate"] for r in rows("chat")}
    for name in [*ChatMessage.model_fields, *ChatMessage.REFUSED]:
        assert chat.get(f"messages[].{name}") in ("implemented", "hint", "refused"), name
    for name in ChatMessage.REFUSED:
        assert chat[f"messages[].{name}"] == "refused", name
    for role in CHAT_ROLES:
        assert chat[f"messages[].role={role}"] == "implemented"
    for kind in TEXT_PARTS:
        assert chat[f"messages[].content[].type={kind}"] == "implemented", kind
    for kind in REFUSED_PARTS:
        assert chat[f"messages[].content[].type={kind}"] == "refused", kind


def _validate(route: str, data: dict[str, Any]) -> APIError | None:
    try:
        SCHEMAS[route].model_validate(data)
    except APIError as e:
        return e
    except ValidationError as e:
        return invalid_request_from(e.errors())
    return None


REFUSED_CASES = [(route, r) for route in SCHEMAS for r in sampled(route, "refused")]
HINT_CASES = [(route, r) for route in SCHEMAS for r in sampled(route, "hint")]


@pytest.mark.parametrize(("route", "row"), REFUSED_CASES, ids=ids(REFUSED_CASES))
def test_refused_sample_is_refused_by_name(route: str, row: dict[str, Any]) -> None:
    err = _validate(route, sample_body(route, row, "m"))
    assert err is not None, f"{row['field']}: its sample was accepted"
    assert err.status_code == 400 and err.code == "unsupported_parameter", err.to_dict()
    assert err.param is not None and err.param.split(".")[0] == top(row["field"]), err.to_dict()
    assert named(row["field"]) in err.param + err.message, err.to_dict()


@pytest.mark.parametrize(("route", "row"), HINT_CASES, ids=ids(HINT_CASES))
def test_hint_sample_is_accepted(route: str, row: dict[str, Any]) -> None:
    err = _validate(route, sample_body(route, row, "m"))
    assert err is None, err.to_dict()


def test_message_fields_reach_the_template() -> None:
    msg = ChatMessage.model_validate({"role": "assistant", "reasoning_content": "Hm.", "task": "chat", "content": [
        {"type": "input_text", "text": "Par"}, {"type": "output_text", "text": "is", "prompt_cache_breakpoint": {"mode": "explicit"}}]})
    assert msg.for_template() == {"role": "assistant", "content": "Paris", "reasoning": "Hm.",
                                  "reasoning_content": "Hm.", "task": "chat"}
    both = ChatMessage.model_validate({"role": "assistant", "content": "x", "reasoning": "new", "reasoning_content": "old"})
    assert both.reasoning == "new"  # as vLLM: reasoning wins over its old name
