"""Grammar constraints with xgrammar, compiled as vLLM's xgrammar backend compiles them with
`disable_any_whitespace` (vllm/v1/structured_output/backend_xgrammar.py: compile_grammar), so
both engines hold answers to the same grammar. One `GrammarCompiler` per engine (it caches what
it compiled); one `GrammarMatcher` per sequence, advanced by the model thread."""

from __future__ import annotations

from typing import Any

from server.engines.base import Constraint
from server.structured import is_lark


def compiler(hf_tokenizer: Any, vocab_size: int) -> Any:
    """The engine's compiler; `vocab_size`: the model's logits, which may pad the tokenizer's."""
    import xgrammar as xgr

    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size))


def compile_constraint(compiler: Any, constraint: Constraint) -> Any:
    """The compiled grammar (`xgr.CompiledGrammar`) for a constraint; blocking (ms for a small
    schema, more for a large one), so callers run it off the event loop."""
    kind, value = constraint.kind, constraint.value
    if kind == "json":
        # no whitespace of the model's choosing: vLLM's disable_any_whitespace
        return compiler.compile_json_schema(value, any_whitespace=False, separators=(",", ":"))
    if kind == "regex":
        return compiler.compile_regex(value)
    if kind == "grammar":
        return compiler.compile_lark(value) if is_lark(value) else compiler.compile_grammar(value)
    if kind == "structural_tag":  # server.structured has turned vLLM's older form into this one
        return compiler.compile_structural_tag(value)
    raise ValueError(f"unknown constraint kind {kind!r}")


def matcher(compiled: Any, stop_token_ids: frozenset[int]) -> Any:
    """A sequence's matcher. Its stop tokens are the ones that end the answer (EOS and the
    request's stop_token_ids, vLLM's `all_stop_token_ids`): the grammar ends exactly when the
    answer does, and none of them can be sampled before the grammar may end."""
    import xgrammar as xgr

    return xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids))
