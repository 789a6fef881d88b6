"""Structured outputs and tool calls through the client libraries people build agents with.

Each test drives a library the way its docs show, against the live session server (both
engines): langchain-openai's `ChatOpenAI`, instructor (TOOLS and JSON_SCHEMA modes), pydantic-ai's
`Agent` over `OpenAIChatModel`, the `openai` SDK's own `parse` / `stream` helpers, and the
openai-agents SDK with its default model (the Responses API) running agents to a final output. Decoding is grammar-constrained, so even the 135M
model's JSON and tool arguments must parse and validate against the schema the library sent.
The schemas bound every string and list, so an answer at temperature 0 ends well inside the
token budget. No retries anywhere: one request per test, and a bad answer fails it.

instructor is installed with `--no-deps` (the Makefile): every release caps `jiter<0.15` and
`rich<15`, below what openai 3.x installs, and it runs with the newer ones.
"""

from __future__ import annotations

import json
import operator
from enum import Enum
from functools import reduce
from typing import Annotated, Literal

import instructor
import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

from tests.conftest import MODEL
from tests.server_process import ServerProcess

MAX_TOKENS = 200
TIMEOUT = 120


class Species(str, Enum):
    cat = "cat"
    dog = "dog"
    parrot = "parrot"


class Pet(BaseModel):
    """A pet, described in a few words."""

    name: str = Field(max_length=20)
    species: Species
    age: int = Field(ge=0, le=30)
    toys: list[Annotated[str, Field(max_length=15)]] = Field(max_length=3)


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


PET_PROMPT = "Describe a pet: a cat named Tom, 3 years old, who plays with a ball."
PET_JSON_PROMPT = (
    PET_PROMPT + ' Answer in JSON with the keys "name" (string), "species" (one of "cat", "dog",'
    ' "parrot"), "age" (integer) and "toys" (list of strings).'
)
WEATHER_PROMPT = "What is the weather in Paris, in celsius?"


def _langchain(server: ServerProcess) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="none", temperature=0,
                      max_tokens=MAX_TOKENS, timeout=TIMEOUT, max_retries=0)


def _agent(server: ServerProcess, output_type: object) -> Agent:
    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=server.base_url, api_key="none"))
    settings = ModelSettings(temperature=0, max_tokens=MAX_TOKENS, timeout=TIMEOUT, max_retries=0)
    return Agent(model, output_type=output_type, model_settings=settings, retries=0)


def _sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="none", timeout=TIMEOUT, max_retries=0)


# langchain-openai


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(server: ServerProcess, method: str) -> None:
    """json_schema: `response_format` json_schema (strict) through the SDK's `parse`;
    function_calling: one tool named after the schema, forced by a named `tool_choice`."""
    pet = _langchain(server).with_structured_output(Pet, method=method).invoke(PET_PROMPT)
    assert isinstance(pet, Pet)


def test_langchain_structured_output_json_mode(server: ServerProcess) -> None:
    """json_mode sends only `{"type": "json_object"}`: the schema lives in the prompt alone, so the
    server guarantees a JSON object, not a Pet. The library parses it, then validates: a Pet,
    or a validation error it reports beside the raw message."""
    out = _langchain(server).with_structured_output(Pet, method="json_mode", include_raw=True).invoke(
        PET_JSON_PROMPT)
    raw = out["raw"]
    assert isinstance(raw, AIMessage) and raw.response_metadata["finish_reason"] == "stop"
    assert isinstance(json.loads(raw.content), dict)
    if out["parsed"] is not None:
        assert isinstance(out["parsed"], Pet) and out["parsing_error"] is None
    else:
        assert "validation error" in str(out["parsing_error"])


def test_langchain_bind_tools_named(server: ServerProcess) -> None:
    msg = _langchain(server).bind_tools([GetWeather], tool_choice="GetWeather").invoke(WEATHER_PROMPT)
    assert isinstance(msg, AIMessage) and msg.response_metadata["finish_reason"] == "tool_calls"
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "GetWeather"
    assert msg.tool_calls[0]["id"]
    GetWeather.model_validate(msg.tool_calls[0]["args"])


def test_langchain_bind_tools_required_streamed(server: ServerProcess) -> None:
    """`tool_choice="any"` becomes "required"; the streamed deltas (id and name first, then
    argument fragments, by index) add up to a tool call whose arguments validate."""
    llm = _langchain(server).bind_tools([GetWeather], tool_choice="any")
    chunks = list(llm.stream(WEATHER_PROMPT))
    msg = reduce(operator.add, chunks)
    assert isinstance(msg, AIMessageChunk) and not msg.invalid_tool_calls
    assert len(msg.tool_calls) >= 1
    for call in msg.tool_calls:
        assert call["name"] == "GetWeather" and call["id"]
        GetWeather.model_validate(call["args"])
    assert msg.response_metadata["finish_reason"] == "tool_calls"


def test_langchain_tool_result_in_history(server: ServerProcess) -> None:
    """An assistant turn with `tool_calls` and its `tool` message render into the prompt; with
    `tool_choice="none"` the answer is text."""
    history = [
        HumanMessage(WEATHER_PROMPT),
        AIMessage("", tool_calls=[{"name": "GetWeather", "args": {"city": "Paris", "unit": "celsius"},
                                   "id": "call_weather_1", "type": "tool_call"}]),
        ToolMessage('{"temperature": 21, "sky": "sunny"}', tool_call_id="call_weather_1"),
    ]
    msg = _langchain(server).bind_tools([GetWeather], tool_choice="none").invoke(history)
    assert isinstance(msg, AIMessage) and msg.tool_calls == []
    assert isinstance(msg.content, str) and msg.content.strip()
    assert msg.response_metadata["finish_reason"] in ("stop", "length")


# pydantic-ai


async def test_pydantic_ai_tool_output(server: ServerProcess) -> None:
    """The default output mode: a `final_result` output tool the model is required to call."""
    result = await _agent(server, Pet).run(PET_PROMPT)
    assert isinstance(result.output, Pet)


async def test_pydantic_ai_native_output(server: ServerProcess) -> None:
    """NativeOutput: `response_format` json_schema, the answer is the message content."""
    result = await _agent(server, NativeOutput(Pet)).run(PET_PROMPT)
    assert isinstance(result.output, Pet)


async def test_pydantic_ai_tool_output_streamed(server: ServerProcess) -> None:
    """run_stream: the output tool's arguments arrive as streamed deltas (with usage last)."""
    agent = _agent(server, Pet)
    async with agent.run_stream(PET_PROMPT) as result:
        pet = await result.get_output()
    assert isinstance(pet, Pet)
    assert result.usage.output_tokens > 0


# the openai SDK's helpers


def test_sdk_parse_response_format(server: ServerProcess) -> None:
    completion = _sdk(server).chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": PET_PROMPT}], response_format=Pet,
        temperature=0, max_completion_tokens=MAX_TOKENS)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Pet) and message.refusal is None


def test_sdk_parse_strict_tool(server: ServerProcess) -> None:
    completion = _sdk(server).chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": WEATHER_PROMPT}],
        tools=[openai.pydantic_function_tool(GetWeather)], tool_choice="required",
        temperature=0, max_completion_tokens=MAX_TOKENS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id
        assert isinstance(call.function.parsed_arguments, GetWeather)


def test_sdk_stream_strict_tool(server: ServerProcess) -> None:
    """The SDK's stream helper accumulates tool-call deltas and parses each call when it ends."""
    done = []
    with _sdk(server).chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": WEATHER_PROMPT}],
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
        parallel_tool_calls=False, temperature=0, max_completion_tokens=MAX_TOKENS,
        stream_options={"include_usage": True},
    ) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.done":
                done.append(event)
        completion = stream.get_final_completion()
    assert len(done) == 1 and done[0].name == "GetWeather"
    assert isinstance(done[0].parsed_arguments, GetWeather)
    calls = completion.choices[0].message.tool_calls
    assert calls and len(calls) == 1 and isinstance(calls[0].function.parsed_arguments, GetWeather)
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage is not None and completion.usage.completion_tokens > 0


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA], ids=["tools", "json_schema"])
def test_instructor_response_model(server: ServerProcess, mode: instructor.Mode) -> None:
    client = instructor.from_openai(_sdk(server), mode=mode)
    pet = client.chat.completions.create(model=MODEL, response_model=Pet, max_retries=0, temperature=0,
                                         max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PET_PROMPT}])
    assert isinstance(pet, Pet)


# ------------------------------------------------------------------------------ openai-agents (Responses API)


def _agents_model(server: ServerProcess) -> object:
    from agents import OpenAIResponsesModel, set_tracing_disabled

    set_tracing_disabled(True)  # no traces to OpenAI's servers
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=TIMEOUT)
    return OpenAIResponsesModel(model=MODEL, openai_client=client)


async def test_openai_agents_structured_final_output(server: ServerProcess) -> None:
    from agents import Agent, ModelSettings, Runner

    agent = Agent(name="pets", instructions="Describe a pet.", model=_agents_model(server), output_type=Pet,
                  model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS))
    result = await Runner.run(agent, "Tell me about a cat named Tom.", max_turns=1)
    assert isinstance(result.final_output, Pet)


async def test_openai_agents_runs_a_tool_to_a_final_output(server: ServerProcess) -> None:
    from agents import Agent, ModelSettings, Runner, function_tool

    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        asked.append(city)
        return f"Sunny and 21 C in {city}."

    agent = Agent(name="weather", instructions="Use the tool to answer.", model=_agents_model(server),
                  tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS, tool_choice="required",
                                               parallel_tool_calls=False))
    result = await Runner.run(agent, "What is the weather in Paris?", max_turns=2)
    assert len(asked) == 1 and result.final_output == f"Sunny and 21 C in {asked[0]}."
