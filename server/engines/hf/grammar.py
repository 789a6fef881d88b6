"""Grammar constraints with xgrammar, compiled as vLLM's xgrammar backend compiles them with
`disable_any_whitespace` (vllm/v1/structured_output/backend_xgrammar.py: compile_grammar), so
both engines hold answers to the same grammar. One `GrammarCompiler` per engine (it caches what
it compiled, up to vLLM's default 512 MiB); one `GrammarMatcher` per sequence, advanced by the
model thread."""

from __future__ import annotations

from typing import Any

import xgrammar as xgr

from server.engines.base import Constraint
from server.structured import COMPACT_JSON, is_lark

# vLLM's VLLM_XGRAMMAR_CACHE_MB default: distinct schemas beyond it are compiled again when reused
CACHE_BYTES = 512 << 20


def compiler(hf_tokenizer: Any, vocab_size: int) -> xgr.GrammarCompiler:
    """The engine's compiler; `vocab_size`: the model's logits, which may pad the tokenizer's."""
    info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
    return xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_BYTES)


def compile_constraint(compiler: xgr.GrammarCompiler, constraint: Constraint) -> xgr.CompiledGrammar:
    """The compiled grammar for a constraint; blocking (ms for a small schema, more for a large
    one), so callers run it off the event loop."""
    kind, value = constraint.kind, constraint.value
    if kind == "json":
        return compiler.compile_json_schema(value, **COMPACT_JSON)
    if kind == "regex":
        return compiler.compile_regex(value)
    if kind == "grammar":
        return compiler.compile_lark(value) if is_lark(value) else compiler.compile_grammar(value)
    if kind == "structural_tag":  # server.structured has turned vLLM's older form into this one
        return compiler.compile_structural_tag(value)
    raise ValueError(f"unknown constraint kind {kind!r}")


def matcher(compiled: xgr.CompiledGrammar, stop_token_ids: frozenset[int]) -> xgr.GrammarMatcher:
    """A sequence's matcher. Its stop tokens are the ones that end the answer (EOS and the
    request's stop_token_ids, vLLM's `all_stop_token_ids`): the grammar ends exactly when the
    answer does, and none of them can be sampled before the grammar may end."""
    return xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids))
