"""The Responses API and conversations on every engine, through the SDK: create, whole and
streamed (every event validated against the SDK's `ResponseStreamEvent` types, sequence numbers
and item ids checked), the `responses.stream` helper, chains of `previous_response_id` (with the
prefix cache's `cached_tokens`), conversations, a function-call round trip, `text.format`,
`max_output_tokens` giving `incomplete`, and background responses with polling, replay and cancel.
Storage across restarts, keys and PostgreSQL: tests/test_responses_store.py."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.conftest import MODEL

EVENT = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
           "required": ["city"], "additionalProperties": False}
TOOLS: list[Any] = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
                     "parameters": WEATHER, "strict": True}]
# long enough that a chain's earlier turns fill whole blocks of vLLM's prefix cache
STORY = " ".join(f"Fact {i}: the lighthouse keeper counted {i * 7} gulls on day {i}." for i in range(30))


def sse_events(http: httpx.Client, method: str, url: str, **kw: Any) -> list[dict[str, Any]]:
    """A Responses stream as (checked) events: each `event:` name is its data's `type`."""
    events = []
    with http.stream(method, url, **kw) as r:
        assert r.status_code == 200, r.read()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name
                events.append(data)
    return events


def check_events(events: list[dict[str, Any]], first: int = 0) -> Response:
    """OpenAI's schema for every event, increasing sequence numbers, items added before their
    deltas and closed with what the deltas built; returns the final response."""
    assert [e["sequence_number"] for e in events] == list(range(first, first + len(events)))
    for e in events:
        EVENT.validate_python(e)
    items: dict[str, dict[str, Any]] = {}
    built: dict[str, str] = {}
    for e in events:
        kind = e["type"]
        if kind == "response.output_item.added":
            items[e["item"]["id"]] = e["item"]
            built[e["item"]["id"]] = ""
        elif kind in ("response.output_text.delta", "response.function_call_arguments.delta"):
            assert e["item_id"] in items
            built[e["item_id"]] += e["delta"]
        elif kind == "response.output_text.done":
            assert e["text"] == built[e["item_id"]]
        elif kind == "response.function_call_arguments.done":
            assert e["arguments"] == built[e["item_id"]]
        elif kind == "response.output_item.done":
            assert e["item"]["id"] in items and e["item"]["status"] in ("completed", "incomplete")
    last = events[-1]
    assert last["type"] in ("response.completed", "response.incomplete"), last
    final = Response.model_validate(last["response"])
    assert [o.id for o in final.output] == list(items)
    return final


def test_create_whole_and_streamed(client: openai.OpenAI, http: httpx.Client) -> None:
    r = client.responses.create(model=MODEL, input="Say hello.", instructions="Be brief.", max_output_tokens=12,
                                temperature=0, metadata={"suite": "conformance"})
    assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete")
    assert r.output_text and r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.metadata == {"suite": "conformance"} and r.instructions == "Be brief."
    assert client.responses.retrieve(r.id).output_text == r.output_text  # stored by default
    events = sse_events(http, "POST", "/v1/responses", json={
        "model": MODEL, "input": "Say hello.", "instructions": "Be brief.", "max_output_tokens": 12,
        "temperature": 0, "stream": True})
    assert [e["type"] for e in events[:4]] == ["response.created", "response.in_progress",
                                               "response.output_item.added", "response.content_part.added"]
    final = check_events(events)
    assert final.output_text == r.output_text  # greedy: the same answer, whole or streamed
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_the_stream_helper_assembles_the_response(client: openai.OpenAI) -> None:
    # the grammar makes the answer short and complete (the helper wants `response.completed`)
    color = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
             "additionalProperties": False}
    text = []
    with client.responses.stream(model=MODEL, input="Name a color.", max_output_tokens=30, temperature=0,
                                 text={"format": {"type": "json_schema", "name": "color", "schema": color}}) as s:
        for event in s:
            if event.type == "response.output_text.delta":
                text.append(event.delta)
        final = s.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(text)
    assert json.loads(final.output_text)["color"] in ("red", "green", "blue")


def test_a_chain_of_three(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input=STORY + "\nHow many facts are there?", max_output_tokens=8,
                                    temperature=0)
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input="And on day 3?",
                                     max_output_tokens=8, temperature=0)
    third = client.responses.create(model=MODEL, previous_response_id=second.id, input="Thanks.",
                                    max_output_tokens=8, temperature=0)
    # each turn's prompt holds the turns before it
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    assert third.previous_response_id == second.id
    cached = [r.usage.input_tokens_details.cached_tokens for r in (second, third)]
    assert all(c > 0 for c in cached), cached  # the earlier turns come from the prefix cache
    items = client.responses.input_items.list(third.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "Thanks."


def test_conversations(client: openai.OpenAI) -> None:
    conv = client.conversations.create(metadata={"topic": "greetings"},
                                       items=[{"type": "message", "role": "user", "content": "My name is Ada."}])
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "greetings"}
    a = client.responses.create(model=MODEL, conversation=conv.id, input="Hello!", max_output_tokens=6, temperature=0)
    b = client.responses.create(model=MODEL, conversation={"id": conv.id}, input="Bye.", max_output_tokens=6,
                                temperature=0)
    assert b.usage.input_tokens > a.usage.input_tokens + a.usage.output_tokens - 1
    assert a.conversation.id == conv.id
    items = client.conversations.items.list(conv.id, order="asc")
    texts = [(i.role, i.content[0].text) for i in items.data]
    assert texts == [("user", "My name is Ada."), ("user", "Hello!"), ("assistant", a.output_text),
                     ("user", "Bye."), ("assistant", b.output_text)]
    page = client.conversations.items.list(conv.id, limit=2)  # newest first by default
    assert [i.id for i in page.data] == [items.data[4].id, items.data[3].id] and page.has_more
    assert client.conversations.items.retrieve(items.data[0].id, conversation_id=conv.id).id == items.data[0].id
    client.conversations.items.delete(items.data[0].id, conversation_id=conv.id)
    assert len(client.conversations.items.list(conv.id).data) == 4
    assert client.conversations.update(conv.id, metadata={"topic": "farewells"}).metadata == {"topic": "farewells"}
    listed = client.get("/conversations", cast_to=object, options={"params": {"limit": 100}})
    assert conv.id in [c["id"] for c in listed["data"]]  # type: ignore[index]
    assert client.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)


def test_a_function_call_round_trip(client: openai.OpenAI, http: httpx.Client) -> None:
    ask = "What is the weather in Paris?"
    r = client.responses.create(model=MODEL, input=ask, tools=TOOLS, tool_choice="required", max_output_tokens=60,
                                parallel_tool_calls=False,
                                temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    answer = client.responses.create(
        model=MODEL, previous_response_id=r.id, tools=TOOLS, max_output_tokens=20, temperature=0,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}])
    assert answer.status in ("completed", "incomplete") and answer.output
    events = sse_events(http, "POST", "/v1/responses", json={
        "model": MODEL, "input": ask, "tools": TOOLS, "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False,
        "max_output_tokens": 60, "temperature": 0, "stream": True})
    final = check_events(events)
    assert [o.type for o in final.output] == ["function_call"]
    assert any(e["type"] == "response.function_call_arguments.delta" for e in events)
    bad = http.post("/v1/responses", json={"model": MODEL, "input": [
        {"type": "function_call_output", "call_id": "call_nowhere", "output": "x"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"


def test_text_format_and_max_output_tokens(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="Invent a person.", max_output_tokens=60, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                 "strict": True}})
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), schema)
    cut = client.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=3, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3 and cut.output[0].status == "incomplete"


def _poll(client: openai.OpenAI, rid: str, seen: list[str]) -> Any:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = client.responses.retrieve(rid)
        if not seen or seen[-1] != r.status:
            seen.append(r.status)
        if r.status not in ("queued", "in_progress"):
            return r
        time.sleep(0.05)
    raise AssertionError(f"{rid} still {seen[-1]}")


def test_background_poll_replay_and_cancel(client: openai.OpenAI, http: httpx.Client) -> None:
    r = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=8, temperature=0, background=True)
    assert r.status == "queued" and r.background
    seen: list[str] = ["queued"]
    done = _poll(client, r.id, seen)
    assert done.status in ("completed", "incomplete") and done.output_text
    assert set(seen) <= {"queued", "in_progress", "completed", "incomplete"}
    events = sse_events(http, "GET", f"/v1/responses/{r.id}", params={"stream": "true"})
    assert check_events(events).output_text == done.output_text and events[0]["type"] == "response.created"
    later = sse_events(http, "GET", f"/v1/responses/{r.id}", params={"stream": "true", "starting_after": 2})
    assert later == events[3:]
    # a long answer (the grammar asks for 300 numbers), cancelled while it runs
    numbers = {"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"},
                                                      "minItems": 300}}, "required": ["n"]}
    long = client.responses.create(model=MODEL, input="Count.", max_output_tokens=2000, background=True,
                                   text={"format": {"type": "json_schema", "name": "n", "schema": numbers}})
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(long.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(r.id)  # completed: nothing to cancel
    assert client.responses.delete(long.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(long.id)
    # cancelled at once, wherever its work is (admitted, stored, or generating): each ends cancelled
    # and gives back its engine slot
    for _ in range(3):
        quick = client.responses.create(model=MODEL, input="Count.", max_output_tokens=2000, background=True)
        assert client.responses.cancel(quick.id).status == "cancelled"
        assert client.responses.retrieve(quick.id).status == "cancelled"
    # the slots come back as the aborts reach the engine (moments after the cancel answers)
    deadline = time.monotonic() + 15
    while True:
        running = [x for x in http.get("/metrics").text.splitlines() if x.startswith("llm_requests_running{")]
        if sum(float(x.rsplit(" ", 1)[1]) for x in running) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert running and sum(float(x.rsplit(" ", 1)[1]) for x in running) == 0


def test_refused_and_checked_fields(http: httpx.Client) -> None:
    for body, param in [
        ({"tools": [{"type": "web_search"}]}, "tools.type.web_search"),
        ({"include": ["file_search_call.results"]}, "include.file_search_call.results"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.type.item_reference"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input.content.input_image"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"previous_response_id": "resp_nowhere"}, "previous_response_id"),
        ({"conversation": "conv_nowhere"}, "conversation"),
        ({"background": True, "store": False}, "background"),
    ]:
        r = http.post("/v1/responses", json={"model": MODEL, "input": "Hi", **body})
        assert r.status_code in (400, 404), (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())
