"""Tool calls: the format a model writes them in, the grammar that keeps them well-formed, the
fallback for chat templates that know no tools, and the parser (one, for whole and streamed answers).

Formats (chosen from the chat template, or `--tool-call-format`):
- hermes (Qwen, Hermes, and the fallback): `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`
- llama3_json (Llama 3.1+): `{"name": "f", "parameters": {...}}`
- mistral: `[TOOL_CALLS][{"name": "f", "arguments": {...}}]`

The grammar is an xgrammar structural tag: for `auto`, free text until a call's opening, then a
call to one of the given tools whose arguments match its `parameters`; for `required` and a named
function, the answer is calls only. So every call the parser sees is complete and valid, and the
parser only has to find it, not repair it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from xgrammar.builtin_structural_tag import get_model_structural_tag

from server import structured
from server.engines.base import Constraint

ToolFormat = Literal["hermes", "llama3_json", "mistral"]
TOOL_FORMATS: tuple[str, ...] = ("hermes", "llama3_json", "mistral")
# a call's arguments may carry at most this much whitespace in a row (a small model can loop in it)
MAX_WHITESPACE = 2


@dataclass(frozen=True)
class _Syntax:
    trigger: str  # where a call begins
    header: re.Pattern[str]  # from the trigger to the start of the arguments; group 1: the name
    footer: re.Pattern[str]  # after the arguments, to the call's end
    xgrammar_model: str | None  # xgrammar's builtin structural tag for this format (None: ours)


SYNTAX: dict[str, _Syntax] = {
    "hermes": _Syntax("<tool_call>", re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"([^"]*)"\s*,\s*"arguments"\s*:\s*'),
                      re.compile(r"\s*\}\s*</tool_call>"), "qwen_3"),
    "llama3_json": _Syntax('{"name"', re.compile(r'\{\s*"name"\s*:\s*"([^"]*)"\s*,\s*"parameters"\s*:\s*'),
                           re.compile(r"\s*\}"), "llama"),
    "mistral": _Syntax("[TOOL_CALLS]",
                       re.compile(r'\[TOOL_CALLS\]\s*\[\s*\{\s*"name"\s*:\s*"([^"]*)"\s*,\s*"arguments"\s*:\s*'),
                       re.compile(r"\s*\}\s*\]"), None),
}


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


def knows_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` itself (else the fallback describes them)."""
    return bool(template) and "tools" in str(template)


def grammar(fmt: ToolFormat, tools: list[dict[str, Any]], choice: str | dict[str, Any], parallel: bool) -> Constraint:
    """The structural tag that makes every call well-formed: `choice` is "auto" (free text, or
    calls once one opens), "required" or {"type": "function", "function": {"name": ...}} (calls
    only, one per line; OpenAI's forced calls come without text)."""
    syntax = SYNTAX[fmt]
    if syntax.xgrammar_model is not None:  # xgrammar's own tags for the format, with its triggers
        tag = get_model_structural_tag(syntax.xgrammar_model, list[Any](tools), cast(Any, choice), reasoning="disabled",
                                       max_whitespace_cnt=MAX_WHITESPACE, parallel_tool_calls=parallel)
        tree = tag.model_dump(mode="json")["format"]
    else:  # mistral: one call per [TOOL_CALLS] block
        named = choice["function"]["name"] if isinstance(choice, dict) else None
        tree = {"type": "triggered_tags", "triggers": [syntax.trigger], "tags": [
            {"type": "tag", "begin": f'[TOOL_CALLS][{{"name": {json.dumps(t["function"]["name"])}, "arguments": ',
             "content": {"type": "json_schema", "json_schema": t["function"].get("parameters") or {"type": "object"},
                         "max_whitespace_cnt": MAX_WHITESPACE},
             "end": "}]"}
            for t in tools if named is None or t["function"]["name"] == named]}
    if choice != "auto" and tree.get("type") == "triggered_tags":
        tree = {"type": "tags_with_separator", "tags": tree["tags"], "separator": "\n", "at_least_one": True,
                "stop_after_first": not parallel or isinstance(choice, dict)}  # a named function: one call
    elif tree.get("type") == "triggered_tags":
        tree.update(at_least_one=False, stop_after_first=not parallel)
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
    """A call as the model writes it (the grammar's canonical form)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    if fmt == "hermes":
        return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n</tool_call>'
    if fmt == "llama3_json":
        return f'{{"name": {json.dumps(name)}, "parameters": {args}}}'
    return f'[TOOL_CALLS][{{"name": {json.dumps(name)}, "arguments": {args}}}]'


# --------------------------------------------------------------------------- the parser


@dataclass
class Call:
    index: int
    id: str
    name: str
    arguments: str = ""  # the model's text of the arguments, complete once `done`
    done: bool = False


@dataclass
class Delta:
    """What an answer's next text adds: content, a call's start (name known), or its arguments."""

    content: str = ""
    started: list[Call] = field(default_factory=list)
    arguments: list[tuple[int, str]] = field(default_factory=list)  # (call index, fragment)


class Parser:
    """Splits an answer into content and tool calls as its text arrives (`feed`), holding back
    only what could still be the start of a call. Whole answers use it too: one `feed`, `end`."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.syntax = SYNTAX[fmt]
        self.buffer = ""  # text not yet given out
        self.calls: list[Call] = []
        self.content = ""
        self._call: Call | None = None  # the call whose arguments are arriving
        self._decoder = json.JSONDecoder()

    def feed(self, text: str) -> Delta:
        self.buffer += text
        out = Delta()
        while True:
            if self._call is None:
                at = self.buffer.find(self.syntax.trigger)
                if at < 0:  # content, but keep what could begin the trigger
                    keep = _partial_suffix(self.buffer, self.syntax.trigger)
                    self._content(out, self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return out
                self._content(out, self.buffer[:at])
                self.buffer = self.buffer[at:]
                head = self.syntax.header.match(self.buffer)
                if head is None or head.end() == len(self.buffer):
                    return out  # the call's name (and the space after its header) has not arrived yet
                self._call = Call(len(self.calls), f"call_{uuid.uuid4().hex[:24]}", head.group(1))
                self.calls.append(self._call)
                out.started.append(self._call)
                self.buffer = self.buffer[head.end():]
            call = self._call
            try:  # the arguments are complete once they decode as one JSON value
                text = call.arguments + self.buffer
                _, end = self._decoder.raw_decode(text, len(text) - len(text.lstrip()))
            except json.JSONDecodeError:
                if self.buffer:
                    call.arguments += self.buffer
                    out.arguments.append((call.index, self.buffer))
                self.buffer = ""
                return out
            end -= len(call.arguments)
            fragment, rest = self.buffer[:end], self.buffer[end:]
            foot = self.syntax.footer.match(rest)
            if foot is None:
                return out  # wait for the call's end (arguments given out once it is certain)
            call.arguments += fragment
            if fragment:
                out.arguments.append((call.index, fragment))
            call.done = True
            self._call = None
            self.buffer = rest[foot.end():]

    def end(self) -> Delta:
        """The answer is over: what was held back is content (an unfinished call stays unfinished)."""
        out = Delta()
        if self._call is None:
            self._content(out, self.buffer)
        self.buffer = ""
        return out

    @property
    def complete_calls(self) -> list[Call]:
        return [c for c in self.calls if c.done]

    def _content(self, out: Delta, text: str) -> None:
        if text:
            self.content += text
            out.content += text


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
