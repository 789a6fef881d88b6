"""OpenAI wire schemas (pydantic), one module per API surface; `common` holds what they share.

Requests forbid unknown fields, so a field we do not support is a 400 that names it instead of
being silently ignored; fields we know but cannot serve are refused by name with the reason
(`REFUSED`). Every request field's fate is a row of docs/fields.json, rendered into the README's
table; tests/test_field_table.py holds these schemas to it.
"""
