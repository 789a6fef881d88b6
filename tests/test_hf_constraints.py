"""Grammar constraints in the Transformers engine, on the real model: JSON schemas, regular
expressions, EBNF and Lark grammars and structural tags (as tool calls use) hold greedy and
sampled answers alike, and constrained and free sequences share one batch.

An answer that ends with "stop" must match its grammar in full; one cut off at max_tokens
("length") claims nothing, and must have used them all."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
from xgrammar.builtin_structural_tag import get_model_structural_tag
from xgrammar.openai_tool_call_schema import BuiltinToolParam, FunctionToolParam

from server import models
from server.config import Settings
from server.engines.base import Constraint, FinishReason, SamplingSpec
from server.engines.hf import HFEngine
from server.errors import InvalidRequest
from server.structured import is_lark
from server.tokenizer import Tokenizer

MAX_TOKENS = 200

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "floor": {"type": "integer", "minimum": 0, "maximum": 200}},
            "required": ["city", "floor"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
PERSON = [{"role": "user", "content": "Describe a person as JSON."}]

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS: list[FunctionToolParam | BuiltinToolParam | dict[Any, Any]] = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}}]


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[HFEngine]:
    settings = Settings(kv_cache_space=0.5, seed=0)
    path = models.resolve(settings)  # the default model, as the server serves it
    tokenizer = await asyncio.to_thread(Tokenizer, path)
    hf = await asyncio.to_thread(HFEngine.start, path, settings, tokenizer)
    try:
        yield hf
    finally:
        await hf.shutdown()


async def _answer(engine: HFEngine, prompt: list[int], spec: SamplingSpec, request_id: str,
                  ) -> tuple[str, FinishReason | None, int]:
    """The whole answer: text, finish reason, and how many tokens it took."""
    text, reason, tokens = "", None, 0
    async for event in engine.generate(prompt, spec, request_id):
        text += event.text
        tokens += len(event.token_ids)
        reason = event.finish_reason
    return text, reason, tokens


def _prompt(engine: HFEngine, content: str) -> list[int]:
    return engine.tokenizer.chat_prompt([{"role": "user", "content": content}])


def _claims_only_what_holds(answer: tuple[str, FinishReason | None, int], holds: bool, max_tokens: int) -> None:
    text, reason, tokens = answer
    assert reason in ("stop", "length"), answer
    if reason == "stop":
        assert holds, f"finished as 'stop' but does not match its grammar: {text!r}"
    else:
        assert tokens == max_tokens, answer


def _valid_json(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def _json(schema: dict[str, Any]) -> Constraint:
    return Constraint("json", json.dumps(schema))


async def test_json_schema_holds_greedy_and_sampled(engine: HFEngine) -> None:
    prompt = _prompt(engine, "Describe a person as JSON.")
    specs = [SamplingSpec(max_tokens=MAX_TOKENS, temperature=0, constraint=_json(SCHEMA))] + [
        SamplingSpec(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, constraint=_json(SCHEMA)) for seed in (1, 2, 3)
    ]
    answers = await asyncio.gather(*(_answer(engine, prompt, s, f"json-{i}") for i, s in enumerate(specs)))
    for text, reason, tokens in answers:
        _claims_only_what_holds((text, reason, tokens), _valid_json(text, SCHEMA), MAX_TOKENS)
    greedy = answers[0][0]
    assert answers[0][1] == "stop"
    # no whitespace of the model's choosing between tokens of JSON (vLLM's disable_any_whitespace)
    assert greedy == json.dumps(json.loads(greedy), separators=(",", ":"), ensure_ascii=False)
    assert sum(reason == "stop" for _, reason, _ in answers) >= 3  # a sampled one may ramble in a string


async def test_constrained_and_free_sequences_share_a_batch(engine: HFEngine) -> None:
    person, code = _prompt(engine, "Describe a person as JSON."), _prompt(engine, "Invent a short product code.")
    free_tokens = 24
    regex = "[0-9]{3}-[a-z]{2}"
    choice = 'root ::= "yes" | "no"'
    requests = [
        (person, SamplingSpec(max_tokens=MAX_TOKENS, temperature=0, constraint=_json(SCHEMA))),
        (person, SamplingSpec(max_tokens=MAX_TOKENS, temperature=0.8, seed=7, constraint=_json(SCHEMA))),
        (person, SamplingSpec(max_tokens=free_tokens, temperature=0)),
        (person, SamplingSpec(max_tokens=free_tokens, temperature=1.0, seed=7)),
        (code, SamplingSpec(max_tokens=MAX_TOKENS, temperature=0, constraint=Constraint("regex", regex))),
        (code, SamplingSpec(max_tokens=MAX_TOKENS, temperature=1.0, seed=3, constraint=Constraint("regex", regex))),
        (code, SamplingSpec(max_tokens=MAX_TOKENS, temperature=1.0, seed=4, constraint=Constraint("grammar", choice))),
        (code, SamplingSpec(max_tokens=free_tokens, temperature=1.0, seed=5, top_p=0.9)),
    ]
    answers = await asyncio.gather(*(_answer(engine, p, s, f"mix-{i}") for i, (p, s) in enumerate(requests)))
    for i in (0, 1):
        _claims_only_what_holds(answers[i], _valid_json(answers[i][0], SCHEMA), MAX_TOKENS)
    for i in (4, 5):
        assert answers[i][1] == "stop" and re.fullmatch(regex, answers[i][0]), answers[i]
    assert answers[6][1] == "stop" and answers[6][0] in ("yes", "no"), answers[6]
    # the free rows were not masked: they answer in prose, as long as they may
    for i in (2, 3, 7):
        text, reason, tokens = answers[i]
        assert text and not _valid_json(text, SCHEMA) and not re.fullmatch(regex, text)
        assert (reason, tokens) == ("length", free_tokens) or reason == "stop"
    assert answers[0][1] == "stop"


async def test_choice_grammars_in_ebnf_and_lark(engine: HFEngine) -> None:
    prompt = _prompt(engine, "Is Paris in France? Answer yes or no.")
    grammars = ['root ::= "yes" | "no"', 'start: "yes" | "no"']
    assert [is_lark(g) for g in grammars] == [False, True]
    specs = [SamplingSpec(max_tokens=MAX_TOKENS, temperature=t, seed=1, constraint=Constraint("grammar", g))
             for g in grammars for t in (0.0, 1.0)]
    answers = await asyncio.gather(*(_answer(engine, prompt, s, f"choice-{i}") for i, s in enumerate(specs)))
    for text, reason, _ in answers:
        # the EOS that ended the answer is not in its text, as for any answer
        assert reason == "stop" and text in ("yes", "no")


async def test_a_structural_tag_makes_a_tool_call(engine: HFEngine) -> None:
    tag = get_model_structural_tag("qwen_3", TOOLS, "required", reasoning="disabled", max_whitespace_cnt=1,
                                   parallel_tool_calls=False).model_dump_json()
    prompt = _prompt(engine, "What is the weather in Paris?")
    specs = [SamplingSpec(max_tokens=MAX_TOKENS, temperature=t, seed=2, constraint=Constraint("structural_tag", tag))
             for t in (0.0, 1.0)]
    answers = await asyncio.gather(*(_answer(engine, prompt, s, f"tool-{i}") for i, s in enumerate(specs)))
    for text, reason, tokens in answers:
        call = re.search(r'<tool_call>\n\{"name": "get_weather", "arguments": (.*)\}\n</tool_call>', text, re.DOTALL)
        holds = call is not None and _valid_json(call.group(1), WEATHER)
        _claims_only_what_holds((text, reason, tokens), holds, MAX_TOKENS)
    assert answers[0][1] == "stop"


async def test_a_grammar_that_does_not_compile_is_a_400(engine: HFEngine) -> None:
    spec = SamplingSpec(max_tokens=8, constraint=Constraint("grammar", "root ::= undefined_rule"))
    with pytest.raises(InvalidRequest, match="does not compile"):
        await _answer(engine, _prompt(engine, "Hi"), spec, "bad-grammar")
    # and the engine still serves
    assert (await _answer(engine, _prompt(engine, "Hi"), SamplingSpec(max_tokens=2), "after"))[2] == 2
