"""docs/fields.json against the world (no server): every field OpenAI's SDK and vLLM define has a
row (on chat, completions, responses, conversations, embeddings, batches and file uploads; for
responses also every input item kind, tool kind, tool_choice kind and include value), the README's
table is what fields.json renders, and our schemas accept exactly the rows that are implemented or
hints and refuse the refused ones (each row's `sample` is validated here; the same samples go over
HTTP in tests/conformance/test_field_fates.py). File uploads are a multipart form with no pydantic
schema: their rows are held to the form fields `server.api.files` takes."""

from __future__ import annotations

import importlib.util
import json
import re
import typing
from typing import Any

import pytest
import typing_extensions
from pydantic import ValidationError

from server.api import files as files_api
from server.errors import APIError, invalid_request_from
from server.protocol.batches import BatchCreate, OutputExpiresAfter
from server.protocol.chat import (
    CHAT_ROLES,
    REFUSED_PARTS,
    TEXT_PARTS,
    ChatCompletionRequest,
    ChatMessage,
)
from server.protocol.common import _Request
from server.protocol.completions import CompletionRequest
from server.protocol.embeddings import EmbeddingRequest
from server.protocol.responses import (
    INCLUDABLE,
    KINDS,
    REFUSED_INCLUDE,
    REFUSED_TOOLS,
    TEXT_PART,
    CreateConversation,
    CreateResponse,
    FunctionTool,
)
from tests.server_process import ROOT

ROWS: list[dict[str, Any]] = json.loads((ROOT / "docs" / "fields.json").read_text())
SCHEMAS: dict[str, type[_Request]] = {"chat": ChatCompletionRequest, "completions": CompletionRequest,
                                      "responses": CreateResponse, "conversations": CreateConversation,
                                      "embeddings": EmbeddingRequest, "batches": BatchCreate}
# routes whose body is a multipart form, not a schema: the form field names they take
FORMS: dict[str, set[str]] = {"files": files_api.FIELDS}
MINIMAL: dict[str, dict[str, Any]] = {
    "chat": {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1},
    "completions": {"prompt": "Once upon a time", "max_tokens": 1},
    "responses": {"input": "Say hi.", "max_output_tokens": 1},
    "conversations": {},
    "embeddings": {"input": "Say hi."},
    "batches": {"input_file_id": "file-abc123", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
}
EMBEDDING_MODEL = "all-minilm-l6-v2"  # the conformance servers' embedding model (embeddings rows go to it)
NO_MODEL = {"conversations", "batches"}  # routes whose requests name no model
# routes whose rows carry no sample: tests/conformance/test_field_fates.py sends every sample over
# HTTP, and a batch's hint would need an uploaded input file to be a 200 (its PATHS has no batches);
# what these routes refuse is a value (endpoint, purpose), a 400 that is not unsupported_parameter
UNSAMPLED = {"batches", *FORMS}
# refused rows whose refusal does not name them yet (a server bug, not the table's): strict, so a
# fix shows up as XPASS and its entry goes
MISNAMED: dict[tuple[str, str], str] = {}


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
    """A request for `route` with `fields` set (stream_options need stream; conversations take no
    model)."""
    model = EMBEDDING_MODEL if route == "embeddings" else model
    out = {**({} if route in NO_MODEL else {"model": model}), **MINIMAL[route], **fields}
    if "stream_options" in fields:
        out["stream"] = True
    return out


def sample_body(route: str, row: dict[str, Any], model: str) -> dict[str, Any]:
    return body(route, model, **{top(row["field"]): row["sample"]})


def cases(fate: str) -> list[Any]:
    """(route, row) for every row of `fate` with a sample, as pytest params (MISNAMED ones xfail)."""
    out = []
    for route in SCHEMAS:
        for r in sampled(route, fate):
            known = MISNAMED.get((route, r["field"]))
            marks = [pytest.mark.xfail(reason=known, strict=True)] if known else []
            out.append(pytest.param(route, r, id=f"{route}:{r['field']}", marks=marks))
    return out


def _literals(alias: Any, key: str = "type") -> set[str]:
    """The values of `key` that the members of an SDK union (TypedDicts, Literals) allow."""
    found: set[str] = set()
    for member in typing.get_args(alias) or (alias,):
        if typing.get_origin(member) is typing.Literal:
            found |= {str(v) for v in typing.get_args(member)}
        elif isinstance(member, type):
            hint = typing.get_type_hints(member).get(key)
            while hint is not None and typing.get_origin(hint) is not typing.Literal and typing.get_args(hint):
                hint = typing.get_args(hint)[0]  # Required[...], Optional[...]
            found |= {str(v) for v in typing.get_args(hint) if v is not None} if hint is not None else set()
    return found


def _fields_table() -> Any:
    spec = importlib.util.spec_from_file_location("fields_table", ROOT / "docs" / "fields_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ (a) coverage


def test_every_openai_field_has_a_row() -> None:
    from openai.types import batch_create_params as batches
    from openai.types import completion_create_params as completions
    from openai.types import embedding_create_params as embeddings
    from openai.types import file_create_params as files
    from openai.types.chat import completion_create_params as chat
    from openai.types.conversations import conversation_create_params as conversations
    from openai.types.responses import response_create_params as responses

    for route, params in (("chat", chat.CompletionCreateParamsBase), ("completions", completions.CompletionCreateParamsBase),
                          ("responses", responses.ResponseCreateParamsBase),
                          ("conversations", conversations.ConversationCreateParams),
                          ("embeddings", embeddings.EmbeddingCreateParams),
                          ("batches", batches.BatchCreateParams), ("files", files.FileCreateParams)):
        missing = set(params.__annotations__) - {r["field"] for r in rows(route)}
        assert not missing, f"OpenAI's {route} fields without a row in docs/fields.json: {sorted(missing)}"


def test_every_openai_responses_kind_has_a_row() -> None:
    """Input item kinds, content part kinds, tool kinds, tool_choice kinds and include values."""
    from openai.types.responses import response_create_params as params
    from openai.types.responses import response_includable, response_input_param, tool_param
    from openai.types.responses.response_input_message_content_list_param import (
        ResponseInputContentParam,
    )

    fields = {r["field"] for r in rows("responses")}
    expected = {
        "input[].type": _literals(response_input_param.ResponseInputItemParam),
        "input[].content[].type": _literals(ResponseInputContentParam),
        "tools[].type": _literals(tool_param.ToolParam),
        "tool_choice.type": _literals(params.ToolChoice) - {"none", "auto", "required"},
        "include[]": set(typing.get_args(response_includable.ResponseIncludable)),
    }
    for prefix, values in expected.items():
        assert values, prefix
        missing = {v for v in values if f"{prefix}={v}" not in fields}
        assert not missing, f"OpenAI's {prefix} values without a row in docs/fields.json: {sorted(missing)}"


def test_batch_and_file_rows_are_the_sdks_fields() -> None:
    """Only OpenAI defines these requests: their rows are exactly its fields, nested ones included."""
    from openai.types import batch_create_params as batches
    from openai.types import file_create_params as files

    for route, params in (("batches", batches.BatchCreateParams), ("files", files.FileCreateParams)):
        expected: set[str] = set()
        for name, hint in typing.get_type_hints(params).items():
            expected.add(name)
            for member in typing.get_args(hint) or (hint,):  # Optional[...]
                if typing_extensions.is_typeddict(member):  # the SDK's TypedDicts are typing_extensions'
                    expected |= {f"{name}.{kid}" for kid in member.__annotations__}
        assert {r["field"] for r in rows(route)} == expected, route


def test_every_vllm_field_has_a_row() -> None:
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletion
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as VllmResponses
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest as VllmEmbeddings

    for route, schema in (("chat", VllmChat), ("completions", VllmCompletion), ("responses", VllmResponses),
                          ("embeddings", VllmEmbeddings)):
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
        assert r["routes"] and set(r["routes"]) <= {*SCHEMAS, *FORMS} and set(r["sources"]) <= {"openai", "vllm"}, r
        assert "note" in r or "with" in r, r
        assert not ("sample" in r and set(r["routes"]) & UNSAMPLED), f"{r['field']}: see UNSAMPLED"
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


def test_batch_schema_takes_every_row() -> None:
    """A batch with every implemented field validates; its nested rows are OutputExpiresAfter's fields."""
    implemented = {r["field"] for r in rows("batches", "implemented")}
    assert implemented == {r["field"] for r in rows("batches")}
    full = {**MINIMAL["batches"], "metadata": {"team": "search"},
            "output_expires_after": {"anchor": "created_at", "seconds": 3600}}
    assert set(full) == {r["field"] for r in rows("batches", top_level=True)}
    assert _validate("batches", full) is None
    assert {f for f in implemented if top(f) == "output_expires_after" and f != "output_expires_after"} == {
        f"output_expires_after.{name}" for name in OutputExpiresAfter.model_fields}


@pytest.mark.parametrize("route", list(FORMS))
def test_form_takes_what_the_table_says(route: str) -> None:
    """A multipart route (no schema; a form field it does not take is a 400 naming it): the form
    fields it takes (`expires_after[anchor]` is row `expires_after.anchor`) are its rows that are
    not refused."""
    taken = {re.sub(r"\[(\w+)\]", r".\1", f) for f in FORMS[route]}
    assert {top(f) for f in FORMS[route]} == {r["field"] for r in rows(route, top_level=True)}
    assert taken <= {r["field"] for r in rows(route)}, "form fields without a row"
    for r in rows(route):
        accepted = r["field"] in taken or any(f.startswith(r["field"] + ".") for f in taken)
        assert accepted == (r["fate"] != "refused"), r["field"]


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


def test_items_tools_and_includes_match_the_table() -> None:
    """The Responses schema's own lists (kinds, parts, tools, includes, refused fields) against the rows."""
    fates = {r["field"]: r["fate"] for r in rows("responses")}
    for kind in KINDS:
        assert fates[f"input[].type={kind}"] == "implemented", kind
    for kind in TEXT_PART:
        assert fates[f"input[].content[].type={kind}"] == "implemented", kind
    for kind in REFUSED_TOOLS:
        assert fates[f"tools[].type={kind}"] == "refused", kind
    assert fates["tools[].type=function"] == "implemented"
    for name in FunctionTool.REFUSED:
        assert fates[f"tools[].{name}"] == "refused", name
    for value, what in INCLUDABLE.items():
        assert fates[f"include[]={value}"] == ("implemented" if what == "implemented" else "hint"), value
    for value in REFUSED_INCLUDE:
        assert fates[f"include[]={value}"] == "refused", value
    for name in CreateResponse.REFUSED:
        assert fates[name] == "refused", name
    for name in CreateResponse.SAMPLING:
        assert fates[name] in ("implemented", "hint"), name
    refused_kinds = {f.split("=", 1)[1] for f, fate in fates.items() if f.startswith("input[].type=") and fate == "refused"}
    assert not refused_kinds & set(KINDS)


def _validate(route: str, data: dict[str, Any]) -> APIError | None:
    try:
        SCHEMAS[route].model_validate(data)
    except APIError as e:
        return e
    except ValidationError as e:
        return invalid_request_from(e.errors())
    return None


REFUSED_CASES = cases("refused")
HINT_CASES = cases("hint")


@pytest.mark.parametrize(("route", "row"), REFUSED_CASES)
def test_refused_sample_is_refused_by_name(route: str, row: dict[str, Any]) -> None:
    err = _validate(route, sample_body(route, row, "m"))
    assert err is not None, f"{row['field']}: its sample was accepted"
    assert err.status_code == 400 and err.code == "unsupported_parameter", err.to_dict()
    assert err.param is not None and err.param.split(".")[0] == top(row["field"]), err.to_dict()
    assert named(row["field"]) in err.param + err.message, err.to_dict()


@pytest.mark.parametrize(("route", "row"), HINT_CASES)
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
