"""Structured outputs: what a request asks its answer to match, as one checked `Constraint`.

Both engines enforce a `Constraint` with xgrammar, so this module decides, before any engine
runs, whether a request's JSON Schema, regex, grammar or structural tag can be enforced *exactly*.
xgrammar silently ignores some JSON Schema keywords (`not`, `if`, `uniqueItems`, ...); a schema
that uses one is refused with a 400 naming it, because an answer we call schema-valid must be.
Keywords that only widen what is allowed (`nullable`) or only annotate (`title`) are harmless: a
grammar that ignores them is stricter than the schema, never looser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import xgrammar as xgr

from server.engines.base import Constraint
from server.errors import InvalidRequest, UnsupportedParameter

# keywords xgrammar 0.2.8 enforces (each probed: an instance that breaks it is rejected)
ENFORCED = frozenset({
    "type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
    "properties", "required", "additionalProperties", "patternProperties", "propertyNames",
    "unevaluatedProperties", "minProperties", "maxProperties",
    "items", "prefixItems", "minItems", "maxItems", "uniqueItems",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
})
# keywords that hold schemas others refer to
DEFINITIONS = frozenset({"$defs", "definitions"})
# keywords xgrammar enforces only in a schema whose `type` says so (without one it drops them)
STRING_KEYS = frozenset({"minLength", "maxLength", "pattern", "format"})
NUMBER_KEYS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
# keywords that narrow nothing: annotations, and OpenAPI's `nullable` / `discriminator` (hints)
HARMLESS = frozenset({
    "title", "description", "default", "examples", "example", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "nullable", "discriminator", "contentMediaType", "contentEncoding",
})
# string formats xgrammar enforces; any other format would pass unchecked
FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})
# how JSON is compiled on both engines: no whitespace of the model's choosing (vLLM's
# disable_any_whitespace, which its engine is configured with)
COMPACT_JSON: dict[str, Any] = {"any_whitespace": False, "separators": (",", ":")}
# vLLM's bound on a schema's nesting (check_json_nesting): deeper is a 400, not a slow compile
MAX_DEPTH = 64
# a grammar, regex or schema is text the server compiles: bounded like any other input
MAX_SPEC_CHARS = 256 * 1024


def json_schema(schema: Any, param: str) -> Constraint:
    """A JSON Schema (a dict, or `true` for any JSON value) as a checked constraint."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise InvalidRequest(f"Invalid value for '{param}': a JSON Schema is an object.", param=param)
    check_schema(schema, param)
    text = json.dumps(schema)
    _compiles(lambda: xgr.Grammar.from_json_schema(text, **COMPACT_JSON), param,
              "JSON Schema")
    return Constraint("json", text)


def json_object() -> Constraint:
    """JSON mode: any JSON object."""
    return Constraint("json", '{"type": "object"}')


def regex(pattern: str, param: str) -> Constraint:
    _bounded(pattern, param)
    _compiles(lambda: xgr.Grammar.from_regex(pattern), param, "regular expression")
    return Constraint("regex", pattern)


def choice(options: list[str], param: str) -> Constraint:
    """One of these strings exactly (vLLM's `choice`), as an EBNF grammar."""
    if not options:
        raise InvalidRequest(f"Invalid value for '{param}': give at least one choice.", param=param)
    # an EBNF string literal is a JSON string literal (xgrammar's escapes are JSON's)
    grammar = "root ::= " + " | ".join(json.dumps(o) for o in dict.fromkeys(options))
    _bounded(grammar, param)
    _compiles(lambda: xgr.Grammar.from_ebnf(grammar), param, "choice")
    return Constraint("grammar", grammar)


def grammar(text: str, param: str) -> Constraint:
    """An EBNF (GBNF) grammar with a `root` rule, or a Lark grammar (vLLM's heuristic decides)."""
    _bounded(text, param)
    lark = is_lark(text)
    _compiles(lambda: xgr.Grammar.from_lark(text) if lark else xgr.Grammar.from_ebnf(text), param,
              "Lark grammar" if lark else "EBNF grammar")
    return Constraint("grammar", text)


def structural_tag(tag: Any, param: str) -> Constraint:
    """An xgrammar structural tag: `{"type": "structural_tag", "format": {...}}`, or vLLM's older
    `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`, turned into the former."""
    if isinstance(tag, str):
        try:
            tag = json.loads(tag)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"Invalid value for '{param}': not JSON ({e.msg}).", param=param) from None
    if not isinstance(tag, dict):
        raise InvalidRequest(f"Invalid value for '{param}': a structural tag is an object.", param=param)
    if "structures" in tag:
        structures, triggers = tag.get("structures"), tag.get("triggers")
        if not isinstance(structures, list) or not isinstance(triggers, list):
            raise InvalidRequest(f"Invalid value for '{param}': 'structures' and 'triggers' are lists.", param=param)
        tags = []
        for i, s in enumerate(structures):
            if not isinstance(s, dict) or not {"begin", "schema", "end"} <= s.keys():
                raise InvalidRequest(f"Invalid value for '{param}.structures[{i}]': takes 'begin', 'schema' and "
                                     "'end'.", param=f"{param}.structures")
            tags.append({"type": "tag", "begin": s["begin"], "end": s["end"],
                         "content": {"type": "json_schema", "json_schema": s["schema"]}})
        tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}
    for path, schema in _tag_schemas(tag.get("format")):
        check_schema(schema, f"{param}.{path}")
    text = json.dumps(tag)
    _bounded(text, param)
    _compiles(lambda: xgr.Grammar.from_structural_tag(text), param, "structural tag")
    return Constraint("structural_tag", text)


def is_lark(text: str) -> bool:
    """vLLM's `grammar_is_likely_lark` (vllm/v1/structured_output/utils.py), so that a grammar
    means the same here without vLLM: EBNF if any line, comments removed, defines a rule with
    `::=`; else Lark."""
    if not text:
        return False
    for line in text.split("\n"):
        line = re.sub(r"(#|//).*$", "", line).strip()
        if line and "::=" in line:
            return False
    return True


def check_schema(schema: Any, param: str) -> None:
    """Refuse (400) any keyword the grammar would not enforce, naming it and where it is."""
    if len(json.dumps(schema)) > MAX_SPEC_CHARS:
        raise InvalidRequest(f"Invalid value for '{param}': the schema is over {MAX_SPEC_CHARS // 1024} KiB.",
                             param=param)
    _walk(schema, schema if isinstance(schema, dict) else {}, param, "", 0)


def _walk(node: Any, root: dict[str, Any], param: str, path: str, depth: int) -> None:
    if isinstance(node, bool):
        return
    where = path or "the schema's root"
    if not isinstance(node, dict):
        raise InvalidRequest(f"Invalid value for '{param}': at {where}, a schema is an object or a boolean.",
                             param=param)
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"Invalid value for '{param}': schemas nest at most {MAX_DEPTH} deep.", param=param)

    def refuse(key: str, why: str) -> NoReturn:
        raise UnsupportedParameter(f"{param}.{key}"[:200], f"{why} (at {where})")

    for key in node:
        if key not in HARMLESS and key not in ENFORCED:
            refuse(key, f"The JSON Schema keyword '{key}' cannot be enforced by the grammar, so an answer could "
                        f"break it. Enforced keywords: {', '.join(sorted(ENFORCED))}")
    keys = set(node) - HARMLESS - DEFINITIONS
    # xgrammar builds one rule from each of these and drops whatever else sits beside it
    for alone in ("$ref", "allOf", "anyOf", "oneOf"):
        if alone in keys and keys - {alone}:
            refuse(sorted(keys - {alone})[0], f"'{alone}' is enforced only without other keywords beside it "
                                              "(they would be dropped); move them into its schemas")
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        refuse("$ref", "Only local references ('#/$defs/...') are enforced")
    for key in ("enum", "const"):
        if key in keys:
            values = node[key] if key == "enum" else [node[key]]
            if not isinstance(values, list) or not values:
                refuse(key, f"'{key}' needs at least one value")
            if keys - {key, "type"}:
                refuse(sorted(keys - {key, "type"})[0], f"'{key}' is enforced alone (with at most 'type'): other "
                                                        "keywords beside it would be dropped")
            if "type" in node and not all(_has_type(v, node["type"]) for v in values):
                refuse("type", f"every '{key}' value must have the schema's 'type': the grammar generates the "
                               f"values as given")
    kinds = node.get("type")
    kinds = {kinds} if isinstance(kinds, str) else set(kinds) if isinstance(kinds, list) else set()
    for group, needs in ((STRING_KEYS, {"string"}), (NUMBER_KEYS, {"number", "integer"})):
        used = sorted(keys & group)
        if used and not kinds & needs:
            refuse(used[0], f"'{used[0]}' is enforced only in a schema whose 'type' says {' or '.join(sorted(needs))}")
    if "multipleOf" in keys and kinds - {"integer", "null"}:
        refuse("multipleOf", "'multipleOf' is enforced on integers only")
    if keys & {"pattern", "format"} and keys & {"minLength", "maxLength"}:
        refuse(sorted(keys & {"minLength", "maxLength"})[0], "A length is not enforced together with 'pattern' "
               "or 'format' (it would be dropped); put the length in the pattern")
    fmt = node.get("format")
    if "format" in node and not (isinstance(fmt, str) and fmt in FORMATS):
        refuse("format", f"The string format {str(fmt)[:40]!r} is not enforced. Enforced formats: "
                         f"{', '.join(sorted(FORMATS))}")
    if node.get("uniqueItems"):
        refuse("uniqueItems", "'uniqueItems: true' cannot be enforced by a grammar")
    if "allOf" in node and (not isinstance(node["allOf"], list) or len(node["allOf"]) != 1):
        refuse("allOf", "'allOf' is enforced only with one schema in it (as pydantic writes a described $ref); "
                        "merge the schemas")
    if "oneOf" in node:
        _exclusive(node["oneOf"], root, param, where)
    required, props = node.get("required"), node.get("properties")
    if required is not None:
        listed = set(props) if isinstance(props, dict) else set()
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            refuse("required", "'required' is a list of property names")
        if node.get("additionalProperties", False) is False and set(required) - listed:
            refuse("required", f"required property {sorted(set(required) - listed)[0]!r} is not in 'properties', "
                               "and no other properties are generated")
    for key, sub in _children(node):
        _walk(sub, root, param, f"{path}/{key}" if path else key, depth + 1)


def _has_type(value: Any, kinds: Any) -> bool:
    """Whether a JSON value has one of the JSON Schema types named."""
    names = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
    checks = {"string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "null": lambda v: v is None, "object": lambda v: isinstance(v, dict),
              "array": lambda v: isinstance(v, list),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}
    return any(checks.get(str(n), lambda v: False)(value) for n in names)


def _children(node: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        for name, sub in (node.get(key) or {}).items() if isinstance(node.get(key), dict) else ():
            yield f"{key}/{name}", sub
    for key in ("items", "additionalProperties", "unevaluatedProperties"):
        if isinstance(node.get(key), dict):
            yield key, node[key]
    if isinstance(node.get("propertyNames"), dict):  # names are strings: its type goes without saying
        yield "propertyNames", {"type": "string", **node["propertyNames"]}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for i, sub in enumerate(node.get(key) or []) if isinstance(node.get(key), list) else ():
            yield f"{key}/{i}", sub


def _exclusive(branches: Any, root: dict[str, Any], param: str, where: str) -> None:
    """`oneOf` means exactly one branch matches; xgrammar enforces "at least one". That is the
    same only when no value can match two branches: objects told apart by a required property's
    `const` (or one-value `enum`), as discriminated unions (pydantic's included) are."""
    def tag_values(branch: Any) -> dict[str, str]:
        ref = branch.get("$ref") if isinstance(branch, dict) else None
        if isinstance(ref, str) and ref.startswith("#/"):  # a local $ref: pydantic's union members
            branch = _resolve(root, ref)
        if not isinstance(branch, dict):
            return {}
        props, required = branch.get("properties"), branch.get("required")
        if not isinstance(props, dict) or not isinstance(required, list):
            return {}
        values = {}
        for name, prop in props.items():
            if not isinstance(prop, dict) or name not in required:
                continue
            if "const" in prop:
                values[name] = json.dumps(prop["const"])
            elif isinstance(prop.get("enum"), list) and len(prop["enum"]) == 1:
                values[name] = json.dumps(prop["enum"][0])
        return values

    if isinstance(branches, list) and branches:
        found = [tag_values(b) for b in branches]
        for name in set.intersection(*(set(t) for t in found)):
            if len({t[name] for t in found}) == len(found):
                return
    raise UnsupportedParameter(f"{param}.oneOf", f"'oneOf' (at {where}) is enforced only when its branches are "
                               "objects told apart by a required property's 'const' (a discriminated union); "
                               "otherwise a value could match two branches. Use 'anyOf'.")


def _resolve(root: dict[str, Any], ref: str) -> Any:
    node: Any = root
    for part in ref[2:].split("/"):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _tag_schemas(fmt: Any, path: str = "format") -> Iterator[tuple[str, Any]]:
    """The JSON schemas inside a structural tag's format tree."""
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema" and "json_schema" in fmt:
            yield path, fmt["json_schema"]
            return
        for key, value in fmt.items():
            yield from _tag_schemas(value, f"{path}.{key}")
    elif isinstance(fmt, list):
        for i, value in enumerate(fmt):
            yield from _tag_schemas(value, f"{path}[{i}]")


def _bounded(text: str, param: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidRequest(f"Invalid value for '{param}': over {MAX_SPEC_CHARS // 1024} KiB.", param=param)


def _compiles(build: Callable[[], object], param: str, what: str) -> None:
    """The grammar compiles (without a tokenizer: ms). Its error names what is wrong."""
    try:
        build()
    except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own errors, with a C++ prefix
        message = str(e).splitlines()[-1] if str(e) else type(e).__name__
        message = message.split(": ", 1)[-1] if "/project/cpp/" in message else message
        raise InvalidRequest(f"Invalid value for '{param}': this {what} cannot be compiled into a grammar: "
                             f"{message[:300]}", param=param) from None
