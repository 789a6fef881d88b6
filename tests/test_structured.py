"""server/structured.py without a model: every keyword it lets through is enforced by the grammar
it compiles (an instance that breaks the keyword is rejected, a valid one accepted), and every
schema xgrammar would enforce only in part is a 400 naming the keyword, never a 500."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import xgrammar as xgr
from pydantic import BaseModel, Field
from xgrammar.testing import _is_grammar_accept_string as accepts

from server import structured
from server.errors import APIError, InvalidRequest

# keyword -> (schema, an instance that breaks it, one that meets it)
ENFORCED_CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    "type": ({"type": "integer"}, '"a"', "1"),
    "enum": ({"enum": ["a", 1]}, '"b"', "1"),
    "const": ({"const": "a"}, '"b"', '"a"'),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, '"a"', "null"),
    "oneOf": ({"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                         {"type": "object", "properties": {"k": {"const": "b"}}, "required": ["k"]}]}, '{"k":"c"}', '{"k":"a"}'),
    "allOf": ({"allOf": [{"type": "integer", "minimum": 1}]}, "0", "1"),
    "$ref": ({"$defs": {"i": {"type": "integer"}}, "$ref": "#/$defs/i"}, '"a"', "1"),
    "properties": ({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"a":"x"}', '{"a":1}'),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "{}", '{"a":1}'),
    "additionalProperties": ({"type": "object", "additionalProperties": False}, '{"a":1}', "{}"),
    "patternProperties": ({"type": "object", "patternProperties": {"^a": {"type": "integer"}},
                           "additionalProperties": False}, '{"a":"x"}', '{"a":1}'),
    "propertyNames": ({"type": "object", "propertyNames": {"pattern": "^a"}}, '{"b":1}', '{"a":1}'),
    "unevaluatedProperties": ({"type": "object", "properties": {"a": {"type": "integer"}},
                               "unevaluatedProperties": False}, '{"b":1}', '{"a":1}'),
    "minProperties": ({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1}, "{}", '{"a":1}'),
    "maxProperties": ({"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 1},
                      '{"a":1,"b":2}', '{"a":1}'),
    "items": ({"type": "array", "items": {"type": "integer"}}, '["a"]', "[1]"),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, '["a"]', "[1]"),
    "minItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1]", "[1,2]"),
    "maxItems": ({"type": "array", "items": {"type": "integer"}, "maxItems": 1}, "[1,2]", "[1]"),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": False}, '["a"]', "[1,1]"),
    "minLength": ({"type": "string", "minLength": 2}, '"a"', '"ab"'),
    "maxLength": ({"type": "string", "maxLength": 2}, '"abc"', '"ab"'),
    "pattern": ({"type": "string", "pattern": "^[a-c]+$"}, '"x"', '"abc"'),
    "format": ({"type": "string", "format": "date"}, '"soon"', '"2026-11-23"'),
    "minimum": ({"type": "number", "minimum": 0.5}, "0.1", "0.5"),
    "maximum": ({"type": "integer", "maximum": 3}, "4", "3"),
    "exclusiveMinimum": ({"type": "integer", "exclusiveMinimum": 3}, "3", "4"),
    "exclusiveMaximum": ({"type": "number", "exclusiveMaximum": 3}, "3", "2.5"),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, "4", "6"),
    "$defs": ({"$defs": {"s": {"type": "string"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/s"}}},
              '{"a":1}', '{"a":"x"}'),
    "definitions": ({"definitions": {"s": {"type": "string"}}, "type": "array", "items": {"$ref": "#/definitions/s"}},
                    "[1]", '["x"]'),
}


def test_every_enforced_keyword_has_a_case() -> None:
    assert set(ENFORCED_CASES) == structured.ENFORCED


@pytest.mark.parametrize("keyword", sorted(ENFORCED_CASES))
def test_what_passes_the_check_is_enforced(keyword: str) -> None:
    schema, bad, good = ENFORCED_CASES[keyword]
    constraint = structured.json_schema(schema, "s")
    grammar = xgr.Grammar.from_json_schema(constraint.value, **structured.COMPACT_JSON)
    formats = jsonschema.FormatChecker()
    jsonschema.validate(json.loads(good), schema, format_checker=formats)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(bad), schema, format_checker=formats)
    assert accepts(grammar, good) and not accepts(grammar, bad)


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"type": "object", "not": {}}, "not"),
    ({"if": {"type": "integer"}, "then": {"minimum": 1}}, "if"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"const": 1}}, "contains"),
    ({"type": "string", "format": "color"}, "format"),
    ({"type": "string", "format": ["email"]}, "format"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "maxLength"),  # xgrammar drops the length
    ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
    ({"minLength": 3}, "minLength"),  # without a type, dropped
    ({"minimum": 3}, "minimum"),
    ({"$defs": {"i": {"type": "integer"}}, "$ref": "#/$defs/i", "minimum": 10}, "minimum"),  # beside $ref
    ({"maxLength": 1, "anyOf": [{"type": "string"}]}, "maxLength"),
    ({"type": "string", "enum": ["a", 1]}, "type"),
    ({"$ref": "http://example.com/s.json"}, "$ref"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),  # 1 matches both
    ({"oneOf": [{"properties": [1]}, {"required": 5}]}, "oneOf"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}, "required"),
    ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "allOf"),
])
def test_what_would_be_enforced_in_part_is_a_400_naming_it(schema: dict[str, Any], keyword: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        structured.json_schema(schema, "response_format.json_schema.schema")
    assert refused.value.param == f"response_format.json_schema.schema.{keyword}"


def test_pydantic_schemas_pass() -> None:
    class Pet(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=30, multiple_of=1)
        nick: str | None = None
        toys: list[str] = Field(max_length=3)
        kind: str = Field(pattern="^(cat|dog)$")

    structured.json_schema(Pet.model_json_schema(), "s")


@pytest.mark.parametrize(("build", "arg"), [
    (structured.regex, "[0-9"), (structured.grammar, "root ::= missing"), (structured.grammar, "start: missing"),
    (structured.choice, []), (structured.structural_tag, "{"), (structured.structural_tag, {"structures": 1}),
    (structured.json_schema, 3), (structured.json_schema, {"type": "strng"}),
])
def test_what_does_not_compile_is_a_400(build: Any, arg: Any) -> None:
    with pytest.raises(APIError) as refused:
        build(arg, "p")
    assert refused.value.status_code == 400 and refused.value.param is not None


def test_choices_and_lark_are_exact() -> None:
    g = xgr.Grammar.from_ebnf(structured.choice(["yes", 'no "x"'], "c").value)
    assert accepts(g, "yes") and accepts(g, 'no "x"') and not accepts(g, "no")
    assert structured.is_lark("start: \"a\"") and not structured.is_lark('root ::= "a"') and not structured.is_lark("")
