"""Tool calls: the format a model writes them in, the grammar that keeps them well-formed, the
fallback for chat templates that know no tools, and the parser (one, for whole and streamed answers).

Formats (chosen from the chat template, or `--tool-call-format`):
- hermes (Qwen, Hermes, and the fallback): `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`
- llama3_json (Llama 3.1+): `{"name": "f", "parameters": {...}}`
- mistral: `[TOOL_CALLS][{"name": "f", "arguments": {...}}]`

The grammar is an xgrammar structural tag: for `auto`, free text until a call's opening, then a
call to one of the given tools whose arguments match its `parameters`; for `required` and a named
function, the answer is calls only. Every call therefore opens with exactly the text the grammar
wrote for its tool (`_Syntax.begin`) and closes with `_Syntax.end`, so the parser matches those
strings exactly: it finds calls, it never repairs them.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

import jinja2
import jinja2.meta
from xgrammar.builtin_structural_tag import get_model_structural_tag

from server import structured
from server.engines.base import Constraint

ToolFormat = Literal["hermes", "llama3_json", "mistral"]
TOOL_FORMATS: tuple[str, ...] = ("hermes", "llama3_json", "mistral")
# a call's arguments may carry at most this much whitespace in a row (a small model can loop in it)
MAX_WHITESPACE = 2


@dataclass(frozen=True)
class _Syntax:
    trigger: str  # the text that opens a call in free text (the grammar's trigger)
    begin: str  # a call's text up to its arguments; {name} is the function's name as JSON
    end: str  # a call's text after its arguments
    xgrammar_model: str | None  # xgrammar's builtin structural tag for this format (None: ours)

    def opening(self, name: str) -> str:
        return self.begin.format(name=json.dumps(name))


# the begins and ends are xgrammar's (qwen_3, llama); tests/test_tools.py holds them equal
SYNTAX: dict[str, _Syntax] = {
    "hermes": _Syntax("<tool_call>", '<tool_call>\n{{"name": {name}, "arguments": ', "}\n</tool_call>", "qwen_3"),
    "llama3_json": _Syntax('{"name": ', '{{"name": {name}, "parameters": ', "}", "llama"),
    "mistral": _Syntax("[TOOL_CALLS]", '[TOOL_CALLS][{{"name": {name}, "arguments": ', "}]", None),
}


@functools.lru_cache(maxsize=64)  # asked on every chat request, of a template that never changes
def detect(template: str | None) -> ToolFormat:
    """The format a chat template writes tool calls in; hermes for templates that know none
    (the fallback renders tools in that format)."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<tool_call>" in text:
        return "hermes"
    if "<|python_tag|>" in text or "ipython" in text:
        return "llama3_json"
    return "hermes"


@functools.lru_cache(maxsize=64)  # parses the template: once per template, not per request
def knows_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` itself (reads the variable), else the fallback
    describes them."""
    if not template:
        return False
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:  # a template with extensions jinja2 does not parse alone
        return "tools" in template


def grammar(fmt: ToolFormat, tools: list[dict[str, Any]], choice: str | dict[str, Any], parallel: bool,
            response_schema: dict[str, Any] | bool | None = None) -> Constraint:
    """The structural tag that makes every call well-formed: `choice` is "auto" (free text, or
    calls once one opens), "required" or {"type": "function", "function": {"name": ...}} (calls
    only, one per line; OpenAI's forced calls come without text). With `response_schema`
    (a structured response_format beside the tools), "auto" is that JSON or calls."""
    syntax = SYNTAX[fmt]
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    if syntax.xgrammar_model is not None:  # xgrammar's own tags for the format (one per tool)
        tag = get_model_structural_tag(syntax.xgrammar_model, cast(list[Any], tools), "auto", reasoning="disabled",
                                       max_whitespace_cnt=MAX_WHITESPACE)
        tags = tag.model_dump(mode="json")["format"]["tags"]
    else:
        tags = [{"type": "tag", "begin": syntax.opening(t["function"]["name"]), "end": syntax.end,
                 "content": {"type": "json_schema", "json_schema": t["function"].get("parameters") or {"type": "object"},
                             "max_whitespace_cnt": MAX_WHITESPACE}}
                for t in tools]
    if named is not None:
        tags = [t for t in tags if t["begin"] == syntax.opening(named)]
    calls = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
             "stop_after_first": not parallel or named is not None}  # a named function: one call
    tree: dict[str, Any] = calls
    if choice == "auto" and response_schema is not None:
        answer = {"type": "json_schema", "json_schema": response_schema, "max_whitespace_cnt": MAX_WHITESPACE}
        tree = {"type": "or", "elements": [answer, calls]}
    elif choice == "auto":
        tree = {"type": "triggered_tags", "triggers": [syntax.trigger], "tags": tags, "at_least_one": False,
                "stop_after_first": not parallel}
    return structured.structural_tag({"type": "structural_tag", "format": tree}, "tools")


# --------------------------------------------------------------------------- the fallback

FALLBACK_INTRO = ("You can call functions to help with the user's request. The functions are described in JSON "
                  "Schema inside <tools></tools>:\n<tools>\n{tools}\n</tools>\nTo call a function, answer with "
                  "a JSON object holding its name and arguments inside <tool_call></tool_call>:\n<tool_call>\n"
                  '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def fallback(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: the tools described in the system turn (in
    the hermes format the parser reads), calls as assistant text, results as user turns."""
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    intro = FALLBACK_INTRO.format(tools=listed) if tools else ""
    out: list[dict[str, Any]] = []
    for msg in messages:
        msg = dict(msg)
        calls = msg.pop("tool_calls", None)
        if calls:
            text = "\n".join(call_text("hermes", c["function"]["name"], c["function"]["arguments"]) for c in calls)
            msg["content"] = f"{msg.get('content') or ''}\n{text}".strip("\n")
        if msg["role"] == "tool":
            msg = {"role": "user", "content": f"<tool_response>\n{msg.get('content') or ''}\n</tool_response>"}
        out.append(msg)
    if intro:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{intro}"}
        else:
            out.insert(0, {"role": "system", "content": intro})
    return out


def call_text(fmt: ToolFormat, name: str, arguments: Any) -> str:
    """A call as the model writes it (the grammar's form)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    syntax = SYNTAX[fmt]
    return syntax.opening(name) + args + syntax.end


# --------------------------------------------------------------------------- the parser


@dataclass
class Call:
    index: int
    id: str
    name: str
    arguments: str = ""  # the model's text of the arguments, complete once `done`
    done: bool = False


@dataclass(frozen=True)
class Event:
    """What an answer's next text adds, in order: content, a call's start (its name known), or a
    fragment of a call's arguments."""

    kind: Literal["content", "call", "arguments"]
    text: str = ""
    call: Call | None = None


class Parser:
    """Splits an answer into content and tool calls as its text arrives (`feed`), holding back
    only what could still be the opening of a call. Whole answers use it too: one `feed`, `end`.
    Whitespace between calls (the grammar's separator) is not content; whitespace followed by
    more text is."""

    def __init__(self, fmt: ToolFormat, names: Iterable[str]) -> None:
        self.syntax = SYNTAX[fmt]
        self.openings = {self.syntax.opening(n): n for n in names}
        self.buffer = ""  # text not yet given out
        self.calls: list[Call] = []
        self.content = ""
        self._call: Call | None = None  # the call whose arguments are arriving
        self._held = ""  # whitespace after a call: content only if more text follows
        self._decoder = json.JSONDecoder()

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        out: list[Event] = []
        while self._step(out):
            pass
        return out

    def end(self) -> list[Event]:
        """The answer is over: what was held back is content (an unfinished call stays unfinished)."""
        out: list[Event] = []
        if self._call is None:
            self._content(out, self.buffer)
        self.buffer = self._held = ""
        return out

    @property
    def complete_calls(self) -> list[Call]:
        return [c for c in self.calls if c.done]

    def _step(self, out: list[Event]) -> bool:
        """Consume what can be consumed; False when more text is needed."""
        if self._call is None:
            at = self.buffer.find(self.syntax.trigger)
            if at < 0:  # content, but keep what could begin the trigger
                keep = _partial_suffix(self.buffer, self.syntax.trigger)
                self._content(out, self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return False
            self._content(out, self.buffer[:at])
            self.buffer = self.buffer[at:]
            opening = next((o for o in self.openings if self.buffer.startswith(o)), None)
            if opening is None:
                if any(o.startswith(self.buffer) for o in self.openings):
                    return False  # the name has not fully arrived
                self._content(out, self.buffer[0])  # the trigger's text, but not a call
                self.buffer = self.buffer[1:]
                return True
            self._held = ""  # the separator before a call
            self._call = Call(len(self.calls), f"call_{uuid.uuid4().hex[:24]}", self.openings[opening])
            self.calls.append(self._call)
            out.append(Event("call", call=self._call))
            self.buffer = self.buffer[len(opening):]
        call = self._call
        text = call.arguments + self.buffer
        try:  # the arguments are complete once they decode as one JSON value
            _, stop = self._decoder.raw_decode(text, len(text) - len(text.lstrip()))
        except json.JSONDecodeError:
            self._arguments(out, call, self.buffer)
            self.buffer = ""
            return False
        fragment, rest = self.buffer[: stop - len(call.arguments)], self.buffer[stop - len(call.arguments):]
        if not rest.startswith(self.syntax.end):
            if self.syntax.end.startswith(rest):
                return False  # the call's end is arriving (arguments given out once it is certain)
            rest = self.syntax.end + rest  # not the grammar's end: close the call where its JSON ends
        self._arguments(out, call, fragment)
        call.done = True
        self._call = None
        self.buffer = rest[len(self.syntax.end):]
        return True

    def _arguments(self, out: list[Event], call: Call, text: str) -> None:
        if text:
            call.arguments += text
            out.append(Event("arguments", text, call))

    def _content(self, out: list[Event], text: str) -> None:
        if not text:
            return
        if self.calls and not (self._held + text).strip():
            self._held += text  # after a call: a separator, unless text follows
            return
        text, self._held = self._held + text, ""
        self.content += text
        if out and out[-1].kind == "content":
            out[-1] = Event("content", out[-1].text + text)
        else:
            out.append(Event("content", text))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
