"""One sequence as the model thread sees it, and what it posts back for each token."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.engines.base import FinishReason, SamplingSpec, TokenLogprobs


@dataclass
class Output:
    token_id: int
    logprobs: TokenLogprobs | None
    finish_reason: FinishReason | None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    cached_tokens: int | None = None  # on the first token: prompt tokens the prefix cache supplied


@dataclass
class Seq:
    request_id: str
    prompt: list[int]
    spec: SamplingSpec
    deliver: Callable[[Output | BaseException], None]
    generator: Any
    need: int  # positions this sequence may come to hold: prompt + max_tokens
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences, see sampler.bad_words_ids
    # an xgrammar GrammarMatcher when the answer must match `spec.constraint`; only the model
    # thread touches it once the sequence is submitted
    matcher: Any = None
    order: tuple[int, int] = (0, 0)  # (priority, arrival): the waiting queue's order
    output: list[int] = field(default_factory=list)
    length: int = 0  # positions in the cache
    cached: int = 0  # prompt tokens its prefill took from the prefix cache
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its whole blocks so far
    done: bool = False

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]
