"""The Engine protocol and the small dataclasses that cross it.

An engine takes token ids (prompts are templated and tokenized by the server, the same way for
every engine) and yields `TokenEvent`s for one sequence. Fan-out for `n` and for lists of prompts
happens above it, in the routes, so every engine serves exactly one sequence per request id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingSpec:
    """What to generate for one sequence; values are already validated and defaulted."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_tokens: int = 0  # end-of-sequence is not allowed before this many tokens
    stop: tuple[str, ...] = ()
    # None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely alternatives
    logprobs: int | None = None
    # None: none; k >= 0: logprobs for every prompt token (completions `echo` + `logprobs`)
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of one generated (or prompt) token and its top alternatives, by token id."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenEvent:
    """New output of one sequence since its previous event.

    `text` is whole characters only: an engine holds back bytes of a character that a later
    token completes, and cuts stop strings out, so `text` can be shorter than `token_ids` suggest.
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last event
    # set on the first event when prompt logprobs were asked for (first entry: None)
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    # set on the first event by engines that cache prompt prefixes: prompt tokens not recomputed
    cached_tokens: int | None = None


@dataclass(frozen=True)
class EngineInfo:
    name: str  # "vllm" | "transformers"
    max_model_len: int
    max_num_seqs: int = 256  # sequences it batches at once: the server admits that many


class Engine(Protocol):
    """What the routes need from an engine. Implemented by vLLM and Transformers engines."""

    info: EngineInfo

    def generate(
        self, prompt_token_ids: list[int], spec: SamplingSpec, request_id: str
    ) -> AsyncIterator[TokenEvent]:
        """Stream one sequence. Closing the iterator early must abort the request."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop generating for `request_id` now and free what it holds; unknown ids are ignored."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine can no longer serve."""
        ...

    async def num_active_requests(self) -> int:
        """Requests the engine is generating for right now (tests use it to prove aborts)."""
        ...

    async def shutdown(self) -> None: ...
