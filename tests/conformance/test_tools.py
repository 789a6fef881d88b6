"""Tool calls on every engine, through the SDK: `required`, a named function and `auto`, whole
and streamed (OpenAI's delta shape, joined by index), parallel calls and `parallel_tool_calls:
false`, and a round trip (a call, its result as a tool message, then an answer). The default
model's template knows no tools, so this is the fallback format end to end; every call parses and
validates against its function's parameters."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import jsonschema
import openai

from tests.conformance.test_field_fates import _logged
from tests.conftest import MODEL
from tests.server_process import ServerProcess

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"]}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                      "parameters": TIME, "strict": False}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 120


def _check_calls(calls: list[Any]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


def test_required_and_named_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=MAX_TOKENS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls)
    named = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=MAX_TOKENS, temperature=1, seed=5)
    calls = named.choices[0].message.tool_calls
    assert named.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["get_time"]
    _check_calls(calls)


def test_sampled_calls_with_several_seeds_and_parallel_false(client: openai.OpenAI) -> None:
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=1, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(r.choices[0].message.tool_calls) == 1  # exactly one call
        _check_calls(r.choices[0].message.tool_calls)


def test_streamed_calls_arrive_as_openai_streams_them(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:  # a call's first delta: index, id, type and name
                    assert delta.id and delta.id.startswith("call_") and delta.type == "function"
                    assert delta.function.name in SCHEMAS
                    calls[delta.index] = {"name": delta.function.name, "arguments": delta.function.arguments or ""}
                else:  # then only arguments, joined by index
                    assert delta.id is None and delta.function.name is None
                    calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and calls
    whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=MAX_TOKENS, temperature=0)
    # the same greedy answer, streamed or whole
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    for c in calls.values():
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


def test_auto_answers_in_text_or_in_valid_calls(client: openai.OpenAI) -> None:
    # a conversation that has called the tool twice before; "response" banned so the 135M model
    # does not imitate the <tool_response> turns instead: greedy, it calls
    def call(city: str, i: int) -> list[dict[str, Any]]:
        return [{"role": "user", "content": f"What is the weather in {city}?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": f"call_{i}", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}]},
                {"role": "tool", "tool_call_id": f"call_{i}", "content": "sunny, 21 C"}]
    messages = [*call("Rome", 1), *call("Oslo", 2), *ASK]
    response = {"7639": -100}  # "response" (as in <tool_response>) in the default model's vocabulary
    seen_call = False
    for temperature, seed in ((0, None), (1, 1), (1, 2), (1, 3)):
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="auto",
                                           max_tokens=MAX_TOKENS, temperature=temperature, seed=seed,
                                           logit_bias=response)
        choice = r.choices[0]
        if choice.message.tool_calls:
            seen_call = True
            assert choice.finish_reason == "tool_calls"
            _check_calls(choice.message.tool_calls)
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content
    assert seen_call


def test_a_round_trip_and_parallel_calls(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=MAX_TOKENS, temperature=0)
    message = first.choices[0].message
    results = [{"role": "tool", "tool_call_id": c.id, "content": "sunny, 21 C"} for c in message.tool_calls]
    history = [*ASK, message.model_dump(exclude_none=True), *results]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=30, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason in ("stop", "length")
    # parallel: two calls asked for in one turn may come back as two calls (the grammar allows
    # several, each valid); with a budget for two, at least the first is complete
    two = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Paris and the time in Tokyo?"}], tools=TOOLS,
        tool_choice="required", parallel_tool_calls=True, max_tokens=2 * MAX_TOKENS, temperature=0)
    _check_calls(two.choices[0].message.tool_calls)


def test_tool_fields_refused_or_checked(http: httpx.Client) -> None:
    def post(**body: object) -> httpx.Response:
        return http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 5, **body})

    cases = [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.type.custom"),
        ({"tools": TOOLS, "structured_outputs": {"regex": "a"}}, "tools"),
        ({"tools": TOOLS, "messages": [*ASK, {"role": "assistant", "content": "Sure"}], "echo": True,
          "add_generation_prompt": False, "continue_final_message": True}, "echo"),
        ({"tools": TOOLS, "allowed_token_ids": [5]}, "allowed_token_ids"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
         "tools.function.parameters.not"),
    ]
    for body, param in cases:
        r = post(**body)
        assert r.status_code == 400, (body, r.text)
        if param is not None:
            assert r.json()["error"]["param"] == param, r.text
    # a tool message needs the id of the call it answers
    r = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 5,
                                                "messages": [*ASK, {"role": "tool", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.tool_call_id"


def test_the_log_and_metrics_count_constrained_requests_and_calls(http: httpx.Client, server: ServerProcess) -> None:
    request_id = f"tools-{uuid.uuid4().hex[:8]}"
    r = http.post("/v1/chat/completions", headers={"x-request-id": request_id}, json={
        "model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": MAX_TOKENS,
        "temperature": 0})
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    row = _logged(http, server, request_id)
    assert row["constrained"] == "tools" and row["tool_calls"] == len(calls) > 0
    metrics = http.get("/metrics").text
    assert f'llm_tool_calls_total{{model="{MODEL}"}}' in metrics
    assert any(line.startswith("llm_constrained_requests_total{") and 'kind="tools"' in line
               for line in metrics.splitlines())


def test_a_json_response_format_beside_tools_is_that_json_or_calls(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}}, "required": ["answer"],
              "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=MAX_TOKENS, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_calls(choice.message.tool_calls)
    else:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_tokenize_renders_tools_as_chat_completions_do(http: httpx.Client) -> None:
    plain = http.post("/tokenize", json={"model": MODEL, "messages": ASK, "return_token_strs": True}).json()
    with_tools = http.post("/tokenize", json={"model": MODEL, "messages": ASK, "tools": TOOLS,
                                              "return_token_strs": True}).json()
    # the default template knows no tools: the fallback describes them in a system turn
    assert with_tools["count"] > plain["count"] and "get_weather" in "".join(with_tools["token_strs"])
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 1,
                                                   "return_token_ids": True}).json()
    assert chat["prompt_token_ids"] == with_tools["tokens"]
