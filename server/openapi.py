"""`/openapi.json`: every route's real request and response bodies, from the pydantic models in
`server/protocol/` that validate and build them.

The routes read their bodies themselves (`pipeline.parse` bounds the size before it validates),
so FastAPI sees no body to describe. `ROUTES` names, per route, the request model, the success
bodies and the errors it answers with (OpenAI's error shape); `document` adds them to what FastAPI
generates, and `install` serves the result. Response models are described as they are sent:
`Wire` omits a field that is None (unless OpenAI sends it as null), so such a field is optional
and never null, and every other field is required. A field a request model refuses (`REFUSED`)
is listed with the values that change nothing, which are accepted, and the reason for the 400
that any other value gets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from server.config import DEFAULT_EMBEDDING_MODEL_NAME, DEFAULT_MODEL_NAME
from server.gate import KEYED
from server.protocol.admin import (
    AdminModelList,
    ModelDeclaration,
    ModelStatus,
    SystemInfo,
    UsageReport,
)
from server.protocol.batches import (
    Batch,
    BatchCreate,
    BatchList,
    FileDeleted,
    FileList,
    FileObject,
    FileUpload,
)
from server.protocol.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from server.protocol.common import ErrorResponse, Wire, _Request
from server.protocol.completions import Completion, CompletionRequest
from server.protocol.embeddings import EmbeddingList, EmbeddingRequest
from server.protocol.models import ModelCard, ModelList
from server.protocol.ops import Liveness, Readiness, ServerInfo
from server.protocol.responses import (
    AddItems,
    ConversationDeleted,
    ConversationObject,
    CreateConversation,
    CreateResponse,
    ItemList,
    Response,
    ResponseDeleted,
    ResponseStreamEvent,
    StoredItem,
    UpdateConversation,
)
from server.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

REF = "#/components/schemas/{model}"
MODEL = "{model}"  # in an example: the server's first model

ERRORS = {
    400: "Invalid request: a bad value, a missing field, or a field this server does not serve "
         "(`param` names it); a prompt longer than the context.",
    401: "No API key, or not one of the server's (only when the server has keys).",
    403: "Not an admin key.",
    404: "No such model (`code: model_not_found`).",
    409: "A model by that name exists already.",
    413: "The body is larger than the server's --max-request-bytes.",
    429: "The key's rate limits, or the model's queue, are full; retry after `retry-after` seconds.",
    499: "The client closed the connection before the answer was ready (logged; nobody reads it).",
    500: "The engine failed while serving a valid request.",
    503: "The model is loading (`retry-after`) or unloading, or the server is shutting down.",
    507: "The model does not fit in the memory budget beside the models already loaded.",
}
GENERATE = (400, 401, 404, 413, 429, 499, 500, 503, 507)
TOKENIZE = (400, 401, 404, 413, 499, 503, 507)
STORED = (400, 401, 404, 503)  # 404: not stored, or another key's; 503: the database is down


@dataclass(frozen=True)
class Route:
    """What one route takes and answers."""

    summary: str
    ok: dict[int, tuple[type[BaseModel] | None, str]]  # status -> (body, when); None: bytes
    request: type[BaseModel] | None = None
    example: dict[str, Any] | None = None
    stream: type[BaseModel] | None = None  # `stream: true` answers 200 with SSE events of this
    errors: tuple[int, ...] = ()
    form: type[BaseModel] | None = None  # a multipart/form-data body (its fields by their aliases)


ROUTES: dict[tuple[str, str], Route] = {
    ("post", "/v1/chat/completions"): Route(
        "Create a chat completion", {200: (ChatCompletion, "The completion (`stream` false or absent).")},
        ChatCompletionRequest, {"model": MODEL, "max_completion_tokens": 8, "messages": [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "What is the capital of France?"}]},
        stream=ChatCompletionChunk, errors=GENERATE),
    ("post", "/v1/completions"): Route(
        "Create a text completion", {200: (Completion, "The completion (`stream` false or absent).")},
        CompletionRequest, {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8},
        stream=Completion, errors=GENERATE),
    ("post", "/v1/embeddings"): Route(
        "Create embeddings", {200: (EmbeddingList, "One vector per input, in order.")},
        EmbeddingRequest, {"model": DEFAULT_EMBEDDING_MODEL_NAME, "input": ["The capital of France is Paris.",
                                                                           "Paris is France's capital."]},
        errors=GENERATE),
    ("post", "/tokenize"): Route(
        "Tokenize a prompt or chat messages", {200: (TokenizeResponse, "The token ids.")},
        TokenizeRequest, {"model": MODEL, "prompt": "Hello, world!"}, errors=TOKENIZE),
    ("post", "/detokenize"): Route(
        "Token ids back to text", {200: (DetokenizeResponse, "The text.")},
        DetokenizeRequest, {"model": MODEL, "tokens": [19556, 28, 905, 17]}, errors=TOKENIZE),
    ("post", "/v1/responses"): Route(
        "Create a response",
        {200: (Response, "The response (`stream` false or absent); `background`: queued, poll GET.")},
        CreateResponse, {"model": MODEL, "max_output_tokens": 16, "instructions": "Answer in one sentence.",
                         "input": "What is the capital of France?"},
        stream=ResponseStreamEvent, errors=GENERATE),
    ("get", "/v1/responses/{response_id}"): Route(
        "Retrieve a stored response", {200: (Response, "The response; `stream=true`: a background response's "
                                                      "events (after `starting_after`).")}, errors=STORED),
    ("delete", "/v1/responses/{response_id}"): Route(
        "Delete a stored response", {200: (ResponseDeleted, "Deleted.")}, errors=STORED),
    ("post", "/v1/responses/{response_id}/cancel"): Route(
        "Cancel a background response", {200: (Response, "The response, cancelled.")}, errors=(*STORED, 409)),
    ("get", "/v1/responses/{response_id}/input_items"): Route(
        "A stored response's input items", {200: (ItemList, "A page of items.")}, errors=STORED),
    ("post", "/v1/conversations"): Route(
        "Create a conversation", {200: (ConversationObject, "The conversation.")}, CreateConversation,
        {"metadata": {"topic": "demo"}, "items": [{"type": "message", "role": "user", "content": "Hello!"}]},
        errors=(400, 401, 413, 503)),
    ("get", "/v1/conversations"): Route(
        "List your conversations (this server's extension)", {200: (ItemList, "A page of conversations, newest "
                                                                              "first.")}, errors=(400, 401, 503)),
    ("get", "/v1/conversations/{conversation_id}"): Route(
        "Retrieve a conversation", {200: (ConversationObject, "The conversation.")}, errors=STORED),
    ("post", "/v1/conversations/{conversation_id}"): Route(
        "Update a conversation's metadata", {200: (ConversationObject, "The conversation.")}, UpdateConversation,
        {"metadata": {"topic": "demo"}}, errors=(*STORED, 413)),
    ("delete", "/v1/conversations/{conversation_id}"): Route(
        "Delete a conversation", {200: (ConversationDeleted, "Deleted, with its items.")}, errors=STORED),
    ("get", "/v1/conversations/{conversation_id}/items"): Route(
        "A conversation's items", {200: (ItemList, "A page of items.")}, errors=STORED),
    ("post", "/v1/conversations/{conversation_id}/items"): Route(
        "Add items to a conversation", {200: (ItemList, "The items added.")}, AddItems,
        {"items": [{"type": "message", "role": "user", "content": "Hello!"}]}, errors=(*STORED, 413)),
    ("get", "/v1/conversations/{conversation_id}/items/{item_id}"): Route(
        "One item of a conversation", {200: (StoredItem, "The item.")}, errors=STORED),
    ("delete", "/v1/conversations/{conversation_id}/items/{item_id}"): Route(
        "Delete an item of a conversation", {200: (ConversationObject, "The conversation.")}, errors=STORED),
    ("post", "/v1/files"): Route(
        "Upload a file (batch input: JSON Lines)", {200: (FileObject, "The file.")},
        errors=(400, 401, 413, 503), form=FileUpload),
    ("get", "/v1/files"): Route("List your files", {200: (FileList, "A page of files.")}, errors=(400, 401, 404, 503)),
    ("get", "/v1/files/{file_id}"): Route("Retrieve a file", {200: (FileObject, "The file.")}, errors=STORED),
    ("get", "/v1/files/{file_id}/content"): Route(
        "A file's content", {200: (None, "The file's bytes.")}, errors=STORED),
    ("delete", "/v1/files/{file_id}"): Route("Delete a file", {200: (FileDeleted, "Deleted.")}, errors=STORED),
    ("post", "/v1/batches"): Route(
        "Create a batch", {200: (Batch, "The batch, validating.")}, BatchCreate,
        {"input_file_id": "file-abc123", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        errors=(400, 401, 413, 503)),
    ("get", "/v1/batches"): Route("List your batches", {200: (BatchList, "A page of batches, newest first.")},
                                  errors=(400, 401, 404, 503)),
    ("get", "/v1/batches/{batch_id}"): Route("Retrieve a batch", {200: (Batch, "The batch.")}, errors=STORED),
    ("post", "/v1/batches/{batch_id}/cancel"): Route(
        "Cancel a batch", {200: (Batch, "The batch, cancelling (or as it was, if it had ended).")}, errors=STORED),
    ("get", "/v1/models"): Route("List the models", {200: (ModelList, "Every name a request may use now.")},
                                 errors=(401,)),
    ("get", "/v1/models/{model_id}"): Route("Retrieve a model", {200: (ModelCard, "The model or alias.")},
                                            errors=(401, 404)),
    ("get", "/v1/usage"): Route("Usage per key and model", {200: (UsageReport, "Requests and tokens.")},
                                errors=(400, 401, 403)),
    ("get", "/v1/admin/models"): Route("Every model and alias", {200: (AdminModelList, "Models, aliases, memory.")},
                                       errors=(401, 403)),
    ("post", "/v1/admin/models"): Route(
        "Declare and load a model",
        {201: (ModelStatus, "Declared (`preload: false`): its first request loads it."),
         202: (ModelStatus, "Loading: poll GET /v1/admin/models/{name}.")},
        ModelDeclaration, {"name": "qwen2.5-0.5b", "source": "Qwen/Qwen2.5-0.5B-Instruct",
                           "settings": {"max_model_len": 4096}},
        errors=(400, 401, 403, 409, 413, 507)),
    ("get", "/v1/admin/models/{name}"): Route("One model's state", {200: (ModelStatus, "Its state.")},
                                              errors=(401, 403, 404)),
    ("delete", "/v1/admin/models/{name}"): Route(
        "Unload and forget a model",
        {200: (ModelStatus, "It was not loaded: gone at once (`state: removed`)."),
         202: (ModelStatus, "Unloading once its running requests finish.")},
        errors=(401, 403, 404)),
    ("get", "/v1/admin/system"): Route("CPU, memory, GPUs", {200: (SystemInfo, "The machine now.")},
                                       errors=(401, 403)),
    ("get", "/health"): Route("Health", {200: (Readiness, "Every preloaded model serves."),
                                         503: (Readiness, "Loading, failed, or shutting down (`detail`).")}),
    ("get", "/ready"): Route("Readiness", {200: (Readiness, "Every preloaded model serves."),
                                           503: (Readiness, "Loading, failed, or shutting down (`detail`).")}),
    ("get", "/live"): Route("Liveness", {200: (Liveness, "The process answers HTTP.")}),
    ("get", "/"): Route("What this server is", {200: (ServerInfo, "Its models and routes.")}),
}


class _Schema(GenerateJsonSchema):
    """Request models with their refused fields, response models as the JSON they send."""

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        out = super().model_schema(schema)
        cls = schema["cls"]
        if "properties" not in out:
            return out
        if issubclass(cls, _Request):
            _with_refused(out, cls)
        if issubclass(cls, Wire):
            _as_sent(out, cls)
        return out


def _with_refused(out: JsonSchemaValue, cls: type[_Request]) -> None:
    """A refused field is taken with a value that changes nothing (an SDK may send null), and
    refused with the reason otherwise."""
    for name, (noops, why) in cls.REFUSED.items():
        values: list[Any] = []
        for v in noops:  # JSON Schema's enum: 1 and 1.0 are one value, false and 0 are not
            if not any(v == w and isinstance(v, bool) == isinstance(w, bool) for w in values):
                values.append(v)
        shown = ", ".join(json.dumps(v) for v in values)
        out["properties"][name] = {"enum": values, "description": f"Refused (400) unless {shown}. {why}"}


def _as_sent(out: JsonSchemaValue, cls: type[Wire]) -> None:
    """A `Wire` model omits a field that is None (unless it is in KEEP_NULL): such a field is
    optional and never null; every other field (a default is sent too) is required."""
    required = []
    for name, info in cls.model_fields.items():
        prop = out["properties"][name]
        if info.default is None:
            prop.pop("default", None)
        if info.default is None and name not in cls.KEEP_NULL:
            branches = [s for s in prop.pop("anyOf", []) if s != {"type": "null"}]
            prop.update(branches[0] if len(branches) == 1 else {"anyOf": branches} if branches else {})
        else:
            required.append(name)
    out["required"] = required


def _sse(chunk: type[BaseModel]) -> dict[str, Any]:
    # OpenAPI 3.1 has no schema for the items of a stream: `schema` describes one event, as
    # OpenAPI 3.2's `itemSchema` does (and as schemathesis reads it)
    if chunk is ResponseStreamEvent:  # the Responses API's: named events, no [DONE]
        return {"schema": {
            "type": "object",
            "required": ["event", "data"],
            "description": "One Server-Sent Event (`stream: true`): `event` is the type of `data`, a "
                           "ResponseStreamEvent as JSON. The stream ends with `response.completed`, "
                           "`response.incomplete`, `response.failed` or `error`.",
            "properties": {"event": {"type": "string"},
                           "data": {"type": "string", "contentMediaType": "application/json",
                                    "contentSchema": {"$ref": REF.format(model=chunk.__name__)}}}}}
    return {"schema": {
        "type": "object",
        "required": ["data"],
        "description": f"One Server-Sent Event (`stream: true`): `data` is a {chunk.__name__} as JSON; after "
                       "the last one, `[DONE]`. A stream that fails midway sends one event in OpenAI's error "
                       "shape instead of `[DONE]`.",
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [{"$ref": REF.format(model=chunk.__name__)},
                                         {"$ref": REF.format(model="ErrorResponse")}]}}]}},
    }}


def _fill(value: Any, model: str) -> Any:
    if value == MODEL:
        return model
    if isinstance(value, dict):
        return {k: _fill(v, model) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, model) for v in value]
    return value


def document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's paths and parameters, with `ROUTES`' bodies and errors."""
    doc = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                      description=app.description, routes=app.routes)
    state = app.state.server
    model = next(iter(state.registry.entries), DEFAULT_MODEL_NAME)
    models: set[type[BaseModel]] = {ErrorResponse, *(r.request for r in ROUTES.values() if r.request),
              *(r.form for r in ROUTES.values() if r.form),
              *(r.stream for r in ROUTES.values() if r.stream),
              *(m for r in ROUTES.values() for m, _ in r.ok.values() if m is not None)}
    _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                 ref_template=REF, schema_generator=_Schema)

    def ref(m: type[BaseModel]) -> dict[str, Any]:
        return {"$ref": REF.format(model=m.__name__)}

    error = {"application/json": {"schema": ref(ErrorResponse)}}
    # with keys, /v1/* and /tokenize, /detokenize need one; without, a key is ignored
    keyed: list[dict[str, list[str]]] = [{"bearer": []}] if state.keys.enabled else [{"bearer": []}, {}]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            route = ROUTES.get((method, path))
            if route is None:
                continue
            op["summary"] = route.summary
            responses: dict[str, Any] = {}
            for status, (body, when) in route.ok.items():
                content: dict[str, Any] = ({"application/json": {"schema": ref(body)}} if body is not None else
                                           {"application/octet-stream": {"schema": {"type": "string",
                                                                                    "format": "binary"}}})
                if route.stream is not None and status == 200:
                    content["text/event-stream"] = _sse(route.stream)
                responses[str(status)] = {"description": when, "content": content}
            for status in route.errors:
                responses[str(status)] = {"description": ERRORS[status], "content": error}
            op["responses"] = responses  # FastAPI's 422 never happens: validation errors are 400s
            if route.request is not None:
                media: dict[str, Any] = {"schema": ref(route.request)}
                if route.example is not None:
                    media["example"] = _fill(route.example, model)
                op["requestBody"] = {"required": True, "content": {"application/json": media}}
            if route.form is not None:
                op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": ref(route.form)}}}
            if path.startswith("/v1/") or path in KEYED:
                op["security"] = keyed
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(defs["$defs"])
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "An API key (--api-key, --api-keys-file); the admin routes need an admin key."}}
    return doc


def install(app: FastAPI) -> None:
    """Serve `document(app)` at /openapi.json (and /docs), built once, on its first request."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
