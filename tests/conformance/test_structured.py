"""Structured outputs on every engine: `response_format` (json_object, json_schema) and vLLM's
`structured_outputs` (json, regex, choice, grammar) give answers that parse and validate, alone,
sampled with several seeds, and in a batch with free requests; what cannot be enforced is a 400
that names it, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import MODEL

# nested objects, arrays, enums, required fields, bounded numbers; strings and lists bounded so a
# 135M model sampled at temperature 1 still ends inside max_tokens
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "height", "role", "tags", "address"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
MAX_TOKENS = 160


def _valid(choice: Any) -> dict:
    """A constrained answer ends with "stop" (the schemas are bounded to fit max_tokens) and
    parses and validates."""
    finish, text = choice.finish_reason, choice.message.content
    assert finish == "stop", (finish, text)
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    return value


def test_json_schema_greedy_and_sampled(client: openai.OpenAI) -> None:
    _valid(client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=MAX_TOKENS,
                                          response_format=SCHEMA_FORMAT).choices[0])
    # several seeds in one request: n samples, each its own answer
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1, seed=7, n=3, max_tokens=MAX_TOKENS,
                                       response_format=SCHEMA_FORMAT)
    for choice in r.choices:
        _valid(choice)


def test_json_object_is_an_object(client: openai.OpenAI) -> None:
    finished = 0
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give a JSON object."}],
                                           temperature=1, seed=seed, max_tokens=200,
                                           response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
            finished += 1
        else:  # an object with no bound on its size can be cut by max_tokens: said so
            assert r.choices[0].finish_reason == "length"
    assert finished


async def test_a_batch_mixes_constrained_and_free_requests(aclient: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> tuple[bool, Any]:
        constrained = i % 2 == 0
        extra = {"response_format": SCHEMA_FORMAT} if constrained else {}
        r = await aclient.chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX_TOKENS, seed=i,
                                                  temperature=0 if i < 4 else 1, **extra)
        return constrained, r.choices[0]

    results = await asyncio.gather(*(one(i) for i in range(8)))
    for constrained, choice in results:
        if constrained:
            _valid(choice)
        else:
            assert choice.message.content  # free text, untouched by its neighbours' grammars


def test_streamed_json_concatenates_to_the_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=MAX_TOKENS,
                                            response_format=SCHEMA_FORMAT, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads("".join(pieces)), PERSON)


def test_vllm_structured_outputs_on_both_routes(client: openai.OpenAI) -> None:
    choice = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=5, temperature=1,
                                       seed=3, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].text in ("yes", "no")
    code = client.completions.create(model=MODEL, prompt="A code:", max_tokens=12, temperature=1, seed=3,
                                     extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", code.choices[0].text)
    grammar = 'root ::= "The answer is " ("red" | "green") "."'
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0,
                                       extra_body={"structured_outputs": {"grammar": grammar}})
    assert r.choices[0].message.content in ("The answer is red.", "The answer is green.")
    # response_format on completions, as vLLM takes it
    r2 = client.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=MAX_TOKENS, temperature=0,
                                   extra_body={"response_format": SCHEMA_FORMAT})
    assert r2.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r2.choices[0].text), PERSON)


@pytest.mark.parametrize(("schema", "param"), [
    ({"type": "object", "not": {"required": ["a"]}}, "response_format.json_schema.schema.not"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "response_format.json_schema.schema.uniqueItems"),
    ({"type": "string", "format": "color"}, "response_format.json_schema.schema.format"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "response_format.json_schema.schema.oneOf"),
    ({"type": "object", "properties": {"a": {"type": "strng"}}}, "response_format.json_schema.schema"),
])
def test_what_cannot_be_enforced_is_a_400_naming_it(http: httpx.Client, schema: dict, param: str) -> None:
    r = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": ASK, "max_tokens": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert http.get("/health").json()["status"] == "ready"


def test_bad_grammars_and_conflicts_are_400s(http: httpx.Client) -> None:
    def post(route: str, **body: object) -> httpx.Response:
        return http.post(route, json={"model": MODEL, "max_tokens": 5, **body})

    for so, param in (({"regex": "[0-9"}, "structured_outputs.regex"),
                      ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar"),
                      ({"regex": "a", "choice": ["b"]}, "structured_outputs")):
        r = post("/v1/completions", prompt="x", structured_outputs=so)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # a stop string could cut the JSON short and still say "stop": refused
    r = post("/v1/chat/completions", messages=ASK, stop=["}"], response_format={"type": "json_object"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = post("/v1/chat/completions", messages=ASK, response_format={"type": "json_object"},
             structured_outputs={"regex": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"
    # and the server serves a structured request right after
    ok = post("/v1/chat/completions", messages=ASK, response_format={"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}},
        max_tokens=20, temperature=0)
    assert ok.status_code == 200 and isinstance(json.loads(ok.json()["choices"][0]["message"]["content"])["n"], int)
