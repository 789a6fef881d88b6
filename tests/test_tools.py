"""server/tools.py without a model: the formats agree with the grammars xgrammar builds, every
call a grammar allows is parsed back exactly (split at every point of its text, as a stream
splits it), text around calls stays content, and the fallback renders tools as text turns."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string as accepts

from server import tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
NAMES = ["get_weather", "add"]
NAMED = {"type": "function", "function": {"name": "add"}}


def _grammar(fmt: str, choice: object, parallel: bool = True, **kw: object) -> xgr.Grammar:
    c = tools.grammar(fmt, TOOLS, choice, parallel, **kw)  # type: ignore[arg-type]
    return xgr.Grammar.from_structural_tag(c.value)


def _call(fmt: str, name: str, args: str) -> str:
    return tools.call_text(fmt, name, args)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", tools.TOOL_FORMATS)
def test_the_parser_reads_what_the_grammar_writes(fmt: str) -> None:
    one = _call(fmt, "get_weather", '{"city":"Paris"}')
    two = one + "\n" + _call(fmt, "add", '{"a":1}')
    auto, required, named = _grammar(fmt, "auto"), _grammar(fmt, "required"), _grammar(fmt, NAMED)
    assert accepts(auto, "Hello") and accepts(auto, "Sure. " + one) and accepts(auto, two)
    assert not accepts(required, "Hello") and accepts(required, one) and accepts(required, two)
    assert not accepts(required, one + "\nand some text")  # required: calls only
    assert accepts(named, _call(fmt, "add", '{"a":1}')) and not accepts(named, one)
    assert not accepts(named, _call(fmt, "add", '{"a":1}') + "\n" + _call(fmt, "add", '{"a":2}'))
    assert not accepts(_grammar(fmt, "required", parallel=False), two)  # parallel_tool_calls: false
    assert not accepts(required, _call(fmt, "add", '{"a":"x"}'))  # arguments match the parameters


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
def test_our_openings_are_xgrammars(fmt: str) -> None:
    tree = json.loads(tools.grammar(fmt, TOOLS, "auto", True).value)["format"]  # type: ignore[arg-type]
    syntax = tools.SYNTAX[fmt]
    assert tree["triggers"] == [syntax.trigger]
    assert [t["begin"] for t in tree["tags"]] == [syntax.opening(n) for n in NAMES]
    assert {t["end"] for t in tree["tags"]} == {syntax.end}


def _stream(fmt: str, text: str, step: int) -> tuple[str, list[tuple[str, str]], list[tools.Event]]:
    parser = tools.Parser(fmt, NAMES)  # type: ignore[arg-type]
    events = [e for i in range(0, len(text), step) for e in parser.feed(text[i:i + step])] + parser.end()
    content = "".join(e.text for e in events if e.kind == "content")
    args: dict[int, str] = {}
    for e in events:
        if e.kind == "call":
            assert e.call is not None and e.call.index not in args and e.call.id.startswith("call_")
            args[e.call.index] = ""
        elif e.kind == "arguments":
            assert e.call is not None and e.call.index in args  # a call's start comes before its arguments
            args[e.call.index] += e.text
    assert content == parser.content
    return content, [(c.name, args[c.index]) for c in parser.calls], events


@pytest.mark.parametrize("fmt", tools.TOOL_FORMATS)
def test_split_anywhere_the_stream_joins_to_the_whole(fmt: str) -> None:
    nested = '{"a": {"b": [1, "}\\"]"]}}'
    text = "Sure.\n\n" + _call(fmt, "get_weather", '{"city":"Paris"}') + "\n" + _call(fmt, "add", nested) + "\n\nbye now"
    for step in range(1, len(text) + 1):
        content, calls, _ = _stream(fmt, text, step)
        assert calls == [("get_weather", '{"city":"Paris"}'), ("add", nested)], step
        assert content == "Sure.\n\n\n\nbye now", step  # the separator between calls is not content


def test_text_that_only_looks_like_a_call_is_content() -> None:
    # llama3_json's trigger needs the space the grammar writes; hermes' needs a tool's name
    content, calls, _ = _stream("llama3_json", 'I think {"name":"x"} is nice. ' + _call("llama3_json", "add", '{"a":1}'), 3)
    assert content == 'I think {"name":"x"} is nice. ' and calls == [("add", '{"a":1}')]
    content, calls, _ = _stream("hermes", "<tool_call> is a tag. <tool_callx>", 1)
    assert content == "<tool_call> is a tag. <tool_callx>" and calls == []


def test_events_keep_their_order_and_whitespace_after_a_call_before_text() -> None:
    text = _call("hermes", "add", '{"a":1}') + "\n\n  Done."
    content, calls, events = _stream("hermes", text, 1000)
    assert [e.kind for e in events] == ["call", "arguments", "content"] and content == "\n\n  Done."


def test_an_unfinished_call_stays_unfinished() -> None:
    parser = tools.Parser("hermes", NAMES)
    parser.feed(tools.SYNTAX["hermes"].opening("add") + '{"a": 12')  # cut by max_tokens
    parser.end()
    assert [(c.done, c.arguments) for c in parser.calls] == [(False, '{"a": 12')] and parser.content == ""


def test_a_response_format_beside_tools_is_that_json_or_calls() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    g = _grammar("hermes", "auto", response_schema=schema)
    assert accepts(g, '{"n": 3}') and accepts(g, _call("hermes", "add", '{"a":1}'))
    assert not accepts(g, "Hello") and not accepts(g, '{"m": 3}')


def test_the_fallback_renders_tools_calls_and_results_as_text() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1."},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "1"}]
    out = tools.fallback(messages, TOOLS)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.") and '"name": "add"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": _call("hermes", "add", '{"a": 1}')}
    assert out[3] == {"role": "user", "content": "<tool_response>\n1\n</tool_response>"}
    assert all("tool_calls" not in m for m in out)


def test_templates_that_read_tools_are_told_apart() -> None:
    assert tools.knows_tools("{% for t in tools %}{{ t }}{% endfor %}")
    assert not tools.knows_tools("{{ messages[0].content }} # the tools we like")
    assert tools.detect("... <tool_call> ...") == "hermes" and tools.detect("[TOOL_CALLS]") == "mistral"
    assert tools.detect("<|python_tag|>") == "llama3_json" and tools.detect(None) == "hermes"
