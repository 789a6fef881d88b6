"""Every client mistake is a 4xx in OpenAI's error shape, never a 500."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import MODEL

MSG = [{"role": "user", "content": "hi"}]


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] is None or isinstance(err["code"], str)
    return err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 5),
        ("temperature", -0.1),
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("max_completion_tokens", 0),
        ("n", 0),
        ("n", 1000),
        ("top_p", 0),
        ("top_p", 1.5),
        ("presence_penalty", 3),
        ("frequency_penalty", -3),
        ("top_logprobs", 50),
        ("top_k", -5),
        ("min_p", 2),
        ("repetition_penalty", 0),
        ("min_tokens", 3),
        ("min_tokens", -1),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("seed", "abc"),
        ("messages", []),
        ("messages", [{"role": "user"}]),
        ("messages", [{"role": "wizard", "content": "hi"}]),
    ],
)
def test_invalid_chat_values_name_the_field(http: httpx.Client, field: str, value: object) -> None:
    body = {"model": MODEL, "messages": MSG, "max_tokens": 2, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    err = _error(http.post("/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] is not None and err["param"].split(".")[0] == field, err


@pytest.mark.parametrize(
    ("field", "value"),
    [("functions", [{"name": "f"}]), ("web_search_options", {}), ("modalities", ["audio"]), ("bogus_field", 1)],
)
def test_unsupported_fields_are_refused_by_name(http: httpx.Client, field: str, value: object) -> None:
    err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSG, field: value}), 400)
    assert err["param"] == field
    assert field in err["message"]
    assert err["code"] == "unsupported_parameter"


def test_unsupported_content_part_is_refused(http: httpx.Client) -> None:
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": msg}), 400)
    assert err["param"].startswith("messages")


def test_a_tool_message_must_answer_an_earlier_call(http: httpx.Client) -> None:
    msg = [{"role": "tool", "content": "42", "tool_call_id": "x"}]  # as OpenAI: no call "x" before it
    err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": msg}), 400)
    assert err["param"] == "messages.tool_call_id" and "'x'" in err["message"]


def test_top_logprobs_needs_logprobs(http: httpx.Client) -> None:
    err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSG, "top_logprobs": 2}), 400)
    assert err["param"] == "top_logprobs"


def test_stream_options_need_stream(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": MSG, "stream_options": {"include_usage": True}}
    assert _error(http.post("/v1/chat/completions", json=body), 400)["param"] == "stream_options"


def test_malformed_json(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    err = _error(r, 400)
    assert "JSON" in err["message"]
    _error(http.post("/v1/chat/completions", content=b""), 400)
    _error(http.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)


def test_missing_fields(http: httpx.Client) -> None:
    err = _error(http.post("/v1/chat/completions", json={"model": MODEL}), 400)
    assert err["param"] == "messages" and "Missing" in err["message"]
    err = _error(http.post("/v1/chat/completions", json={"messages": MSG}), 400)
    assert err["param"] == "model"
    err = _error(http.post("/v1/completions", json={"model": MODEL}), 400)
    assert err["param"] == "prompt"


def test_unknown_model_is_404(http: httpx.Client, client: openai.OpenAI) -> None:
    err = _error(http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MSG}), 404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    _error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    _error(http.get("/v1/models/gpt-9"), 404)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MSG)


def test_context_length_exceeded(http: httpx.Client, client: openai.OpenAI) -> None:
    limit = client.models.retrieve(MODEL).model_extra["max_model_len"]
    huge = "hello " * (limit + 100)
    err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": huge}]}), 400)
    assert err["code"] == "context_length_exceeded"
    assert str(limit) in err["message"]
    # a prompt that fits, with max_tokens that does not
    err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": limit}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    err = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": huge}), 400)
    assert err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=limit)
    assert e.value.code == "context_length_exceeded"


def test_completion_errors(http: httpx.Client) -> None:
    for body in (
        {"prompt": "x", "logprobs": 6},
        {"prompt": "x", "suffix": "y"},
        {"prompt": "x", "best_of": 3},
        {"prompt": []},
        {"prompt": [[]]},
        {"prompt": [10**9]},
        {"prompt": "x", "temperature": 5},
    ):
        _error(http.post("/v1/completions", json={"model": MODEL, **body}), 400)


def test_unknown_route_and_method(http: httpx.Client) -> None:
    _error(http.get("/v1/nothing-here"), 404)
    _error(http.put("/v1/chat/completions"), 405)


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSG, temperature=5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MSG, n=0, stream=True)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("field", "value", "extra"),
    [("seed", 2**64, {}), ("seed", -(2**63) - 1, {}), ("seed", 10**30, {}), ("seed", 2**63 - 1, {"n": 2}),
     ("top_k", 2**64, {}), ("max_tokens", 2**40, {}), ("priority", 2**63, {}), ("min_tokens", 2**64, {})],
)
def test_out_of_range_numbers_are_400s_naming_the_field(http: httpx.Client, route: str, stream: bool, field: str,
                                                         value: int, extra: dict) -> None:
    """Numbers an engine cannot take are refused before anything runs, so a stream never starts
    (a 200 followed by an error event would hide the fault from the client)."""
    body = {"model": MODEL, field: value, "stream": stream, **extra,
            **({"messages": MSG} if route.endswith("chat/completions") else {"prompt": "Hi"})}
    r = http.post(route, json=body)
    err = _error(r, 400)
    assert err["param"] == field, err


@pytest.mark.parametrize("body", [{"prompt": ""}, {"prompt": "", "echo": True},
                                  {"prompt": ["", "a"], "repetition_penalty": 0.5, "max_tokens": 2}])
def test_an_empty_prompt_is_a_400(http: httpx.Client, body: dict) -> None:
    # found by the fuzzer: it reached the Transformers engine and failed there (500)
    err = _error(http.post("/v1/completions", json={"model": MODEL, **body}), 400)
    assert err["param"] == "prompt"
