"""/openapi.json describes every route's real bodies: a valid OpenAPI 3.1 document whose request
schemas take what the openai SDK sends and whose response schemas take what the server answers
(the real tokenizer, a fake engine). tests/test_fuzz.py holds a live server to it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.openapi import ROUTES
from server.tokenizer import Tokenizer
from tests.fake_engine import FakeEngine
from tests.test_app_unit import CHAT, MODEL, UNIT, _client, tokenizer  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return create_app(UNIT).openapi()


@pytest.fixture
def client(tokenizer: Tokenizer) -> Iterator[TestClient]:  # noqa: F811
    yield from _client(tokenizer, FakeEngine([100, 101, 102, 103], ["a", "b", "c", "d"]))


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def _request_schema(doc: dict[str, Any], method: str, path: str) -> jsonschema.Draft202012Validator:
    return _validator(doc, doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"])


def _check(doc: dict[str, Any], method: str, path: str, r: httpx.Response) -> None:
    """The response's status is documented, and its body fits the documented schema."""
    responses = doc["paths"][path][method]["responses"]
    assert str(r.status_code) in responses, f"{method.upper()} {path}: undocumented {r.status_code}"
    media = r.headers["content-type"].split(";")[0]
    schema = responses[str(r.status_code)]["content"][media]["schema"]
    if media == "text/event-stream" and "event" in schema["properties"]:  # named events (Responses)
        lines = r.text.splitlines()
        names = [line[7:] for line in lines if line.startswith("event: ")]
        frames = [line[6:] for line in lines if line.startswith("data: ")]
        event = _validator(doc, schema)
        data = _validator(doc, schema["properties"]["data"]["contentSchema"])
        assert len(names) == len(frames) and names[-1] in ("response.completed", "response.incomplete")
        for name, frame in zip(names, frames, strict=True):
            event.validate({"event": name, "data": frame})
            data.validate(json.loads(frame))
    elif media == "text/event-stream":
        frames = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert frames[-1] == "[DONE]"
        event = _validator(doc, schema)
        done, json_data = schema["properties"]["data"]["anyOf"]
        assert done == {"const": "[DONE]"}
        chunk = _validator(doc, json_data["contentSchema"])
        for frame in frames:
            event.validate({"data": frame, "event": "message"})
            if frame != "[DONE]":
                chunk.validate(json.loads(frame))
    else:
        _validator(doc, schema).validate(r.json())


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    from openapi_spec_validator import validate

    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_every_route_is_described(doc: dict[str, Any]) -> None:
    app = create_app(UNIT)
    served = {(m.lower(), r.path_format) for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema
              for m in r.methods}
    assert served == set(ROUTES)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            takes_body = method == "post" and not path.endswith("/cancel")  # cancel: a POST with no body
            assert ("requestBody" in op) == takes_body, f"{method} {path}"
            assert "422" not in op["responses"]  # validation errors are 400s in OpenAI's shape
            for status, response in op["responses"].items():
                assert response["content"], f"{method} {path} {status}"
            if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
                assert op["security"] == [{"bearer": []}, {}]  # no keys here: a key is optional


def test_examples_fit_their_schemas(doc: dict[str, Any]) -> None:
    for item in doc["paths"].values():
        if "application/json" in item.get("post", {}).get("requestBody", {}).get("content", {}):  # not multipart
            media = item["post"]["requestBody"]["content"]["application/json"]
            _validator(doc, media["schema"]).validate(media["example"])
    assert doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
        "example"]["model"] == MODEL  # the server's own model


def _sdk_bodies() -> list[tuple[str, dict[str, Any]]]:
    """What the openai SDK puts on the wire for realistic calls."""
    sent: list[tuple[str, dict[str, Any]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, json.loads(request.content)))
        return httpx.Response(500, json={"error": {"message": "recorded", "type": "x", "param": None, "code": None}})

    sdk = openai.OpenAI(base_url="http://test/v1", api_key="sk-x", max_retries=0,
                        http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    calls = [
        lambda: sdk.chat.completions.create(
            model=MODEL, messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Name a colour."}], "name": "ann"},
                {"role": "assistant", "content": "Blue.", "refusal": None},
                {"role": "user", "content": "Another?"}],
            max_completion_tokens=16, temperature=0.7, top_p=0.9, n=2, seed=7, stop=["\n\n"],
            presence_penalty=0.1, frequency_penalty=0.1, logit_bias={"42": -5}, logprobs=True, top_logprobs=3,
            stream=True, stream_options={"include_usage": True}, user="u-1", metadata={"team": "a"},
            response_format={"type": "text"}, store=False, service_tier="auto", reasoning_effort="low",
            prompt_cache_key="k", safety_identifier="s", extra_body={"top_k": 20, "min_p": 0.05,
                                                                      "repetition_penalty": 1.1}),
        lambda: sdk.completions.create(model=MODEL, prompt=["Once", "Twice"], max_tokens=8, echo=True, logprobs=2,
                                       best_of=1, suffix=None, extra_body={"return_token_ids": True}),
        lambda: sdk.completions.create(model=MODEL, prompt=[[1, 2, 3]], max_tokens=4),
        lambda: sdk.responses.create(
            model=MODEL, instructions="Be brief.", max_output_tokens=16, temperature=0.5, top_p=0.9,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                   {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                   {"type": "function_call_output", "call_id": "c1", "output": "Sunny"}],
            tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True}],
            tool_choice="auto", parallel_tool_calls=False, include=["message.output_text.logprobs"], top_logprobs=2,
            text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
            store=True, metadata={"team": "a"}, user="u-1", truncation="auto", reasoning={"effort": "low"},
            stream=True, stream_options={"include_obfuscation": False}),
        lambda: sdk.conversations.create(items=[{"type": "message", "role": "user", "content": "Hi"}],
                                         metadata={"topic": "x"}),
        lambda: sdk.embeddings.create(model=MODEL, input=["a", "b"], dimensions=384, user="u-1"),
    ]
    for call in calls:
        with pytest.raises(openai.InternalServerError):
            call()
    return sent


def test_the_sdks_requests_fit_the_request_schemas(doc: dict[str, Any]) -> None:
    bodies = _sdk_bodies()
    assert [p for p, _ in bodies] == ["/v1/chat/completions", "/v1/completions", "/v1/completions", "/v1/responses",
                                      "/v1/conversations", "/v1/embeddings"]
    for path, body in bodies:
        _request_schema(doc, "post", path).validate(body)
    chat = _request_schema(doc, "post", "/v1/chat/completions")
    assert not chat.is_valid({"model": MODEL, "messages": []})  # and they are not vacuous
    assert not chat.is_valid({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "nope": 1})
    assert not chat.is_valid({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0})


def test_answers_fit_the_response_schemas(doc: dict[str, Any], client: TestClient) -> None:
    chat = ("post", "/v1/chat/completions")
    cmpl = ("post", "/v1/completions")
    for (method, path), body in [
        (chat, CHAT),
        (chat, {**CHAT, "n": 2, "return_token_ids": True, "echo": True}),
        (chat, {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}),
        (chat, {**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}}),
        (cmpl, {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 3, "return_token_ids": True}),
        (cmpl, {"model": MODEL, "prompt": "a", "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}}),
        (("post", "/tokenize"), {"prompt": "hello", "return_token_strs": True}),
        (("post", "/tokenize"), {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        (("post", "/detokenize"), {"tokens": [100, 101]}),
        (("post", "/v1/responses"), {"model": MODEL, "input": "hi", "max_output_tokens": 3, "metadata": {"a": "b"}}),
        (("post", "/v1/responses"), {"model": MODEL, "input": "hi", "max_output_tokens": 3, "stream": True}),
        (("post", "/v1/responses"), {"model": MODEL, "input": "hi", "max_output_tokens": 3, "store": False}),
        (("post", "/v1/conversations"), {"items": [{"role": "user", "content": "hi"}], "metadata": {"a": "b"}}),
        (("post", "/v1/responses"), {"model": MODEL}),
        (("post", "/v1/responses"), {"model": MODEL, "input": "hi", "previous_response_id": "resp_nowhere"}),
        # errors: OpenAI's shape, each status documented for its route
        (chat, {**CHAT, "n": 0}),
        (chat, {**CHAT, "model": "nope"}),
        (chat, {**CHAT, "tools": [{"type": "function"}]}),
        (cmpl, {"model": MODEL}),
        (("post", "/tokenize"), {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
    ]:
        with client.stream(method.upper(), path, json=body) as r:
            r.read()
        _check(doc, method, path, r)
    upload = client.post("/v1/files", files={"file": ("a.jsonl", b'{"custom_id": "a"}\n')}, data={"purpose": "batch"})
    _check(doc, "post", "/v1/files", upload)
    _check(doc, "post", "/v1/files", client.post("/v1/files", files={"file": ("a", b"x")}, data={"purpose": "nope"}))
    batch = client.post("/v1/batches", json={"input_file_id": upload.json()["id"], "endpoint": "/v1/completions",
                                             "completion_window": "24h"})
    _check(doc, "post", "/v1/batches", batch)
    _check(doc, "post", "/v1/batches/{batch_id}/cancel", client.post(f"/v1/batches/{batch.json()['id']}/cancel"))
    for path, route in [("/v1/files", None), ("/v1/batches", None), ("/v1/batches?limit=0", "/v1/batches"),
                        (f"/v1/batches/{batch.json()['id']}", "/v1/batches/{batch_id}"),
                        ("/v1/files/file-nope", "/v1/files/{file_id}")]:
        _check(doc, "get", route or path, client.get(path))
    for path in ("/v1/conversations", "/v1/conversations?limit=0", "/v1/responses/resp_nowhere",
                 "/v1/conversations/conv_nowhere/items"):
        r = client.get(path)
        route = {"/v1/responses/resp_nowhere": "/v1/responses/{response_id}",
                 "/v1/conversations/conv_nowhere/items": "/v1/conversations/{conversation_id}/items"}.get(
            path, path.split("?")[0])
        _check(doc, "get", route, r)
    for path in ("/v1/models", f"/v1/models/{MODEL}", "/v1/models/nope", "/v1/usage", "/v1/usage?start=x",
                 "/health", "/ready", "/live", "/", "/v1/admin/models", f"/v1/admin/models/{MODEL}",
                 "/v1/admin/models/nope", "/v1/admin/system"):
        r = client.get(path)
        template = {"/v1/models/": "/v1/models/{model_id}", "/v1/admin/models/": "/v1/admin/models/{name}"}
        route = next((t for p, t in template.items() if path.startswith(p)), path.split("?")[0])
        _check(doc, "get", route, r)
    declare = _request_schema(doc, "post", "/v1/admin/models")
    lazy = {"name": "lazy", "source": "default", "preload": False, "settings": {"max_num_seqs": 2}}
    assert declare.is_valid(lazy) and not declare.is_valid({"name": " x"})
    assert not declare.is_valid({**lazy, "settings": {"port": 1}})  # a server setting, not a model's
    for declaration in (lazy, lazy, {"name": "bad", "settings": {"max_num_seqs": 0}}, {"name": " x"}):
        _check(doc, "post", "/v1/admin/models", client.post("/v1/admin/models", json=declaration))
    _check(doc, "delete", "/v1/admin/models/{name}", client.delete("/v1/admin/models/lazy"))


def test_with_keys_a_key_is_required_and_docs_can_require_one(tokenizer: Tokenizer) -> None:  # noqa: F811
    key = {"Authorization": "Bearer sk-docs-12345"}
    open_docs = replace(UNIT, api_key=("sk-docs-12345",))
    for c in _client(tokenizer, FakeEngine([1], ["a"]), open_docs):
        doc = c.get("/openapi.json").json()
        assert doc["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
        assert "security" not in doc["paths"]["/health"]["get"]
        assert c.get("/docs").status_code == 200
        _check(doc, "get", "/v1/models", c.get("/v1/models"))  # the documented 401
    for c in _client(tokenizer, FakeEngine([1], ["a"]), replace(open_docs, docs_require_key=True)):
        for path in ("/openapi.json", "/docs", "/redoc"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            assert c.get(path, headers=key).status_code == 200
        assert c.get("/live").status_code == 200


def test_the_flag_reaches_the_settings() -> None:
    from server.__main__ import build_parser, parse_serve

    def settings(argv: list[str], environ: dict[str, str]) -> Settings:
        args, _ = parse_serve(*build_parser(), ["serve", *argv], environ)
        return Settings.from_mapping(vars(args))

    assert settings(["--docs-require-key"], {}).docs_require_key
    assert settings([], {"LLM_SERVICE_DOCS_REQUIRE_KEY": "1"}).docs_require_key
    assert not settings([], {}).docs_require_key
