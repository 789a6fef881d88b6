"""The Engine protocol and the small dataclasses that cross it.

An engine takes token ids (prompts are templated and tokenized by the server, the same way for
every engine) and yields `TokenEvent`s for one sequence. Fan-out for `n` and for lists of prompts
happens above it, in the routes, so every engine serves exactly one sequence per request id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from server.config import Settings
    from server.tokenizer import Tokenizer

# why an engine ended a sequence; the API adds its own ("tool_calls") above the engine
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Constraint:
    """A grammar the answer must match, checked and normalized by `server.structured` before any
    engine sees it. Engines compile it with xgrammar for their tokenizer; JSON is compact (no free
    whitespace: `disable_any_whitespace` in vLLM's terms), so a small model cannot wander in spaces.

    kind "json": `value` is a JSON Schema (JSON mode is '{"type": "object"}'); "regex": a regular
    expression; "grammar": an EBNF (GBNF) or Lark grammar (choices arrive here as EBNF);
    "structural_tag": an xgrammar structural tag (JSON), as tool calls use.
    """

    kind: Literal["json", "regex", "grammar", "structural_tag"]
    value: str


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
    # vLLM's extras, the same meaning on every engine
    ignore_eos: bool = False  # end-of-sequence tokens do not end the answer (max_tokens does)
    stop_token_ids: tuple[int, ...] = ()  # these tokens end the answer ("stop"), like EOS
    include_stop_str_in_output: bool = False  # the stop string that ended the answer stays in it
    skip_special_tokens: bool = True  # special tokens are left out of the text
    spaces_between_special_tokens: bool = True  # slow (Python) tokenizers only, as in vLLM
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    bad_words: tuple[str, ...] = ()  # never generated (with or without a leading space)
    allowed_token_ids: tuple[int, ...] | None = None  # only these may be generated
    priority: int = 0  # lower is served sooner; given to engines that schedule by priority
    cache_salt: str | None = None  # prefix-cache hits only between requests of the same salt
    # the answer matches this grammar; end-of-sequence only where the grammar may end
    constraint: Constraint | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of one generated (or prompt) token and its top alternatives, by token id."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)
    rank: int | None = None  # the token's rank in its distribution (1: the likeliest), when known


@dataclass(frozen=True)
class TokenEvent:
    """New output of one sequence since its previous event.

    `text` is whole characters only: an engine holds back bytes of a character that a later
    token completes, and cuts stop strings out, so `text` can be shorter than `token_ids` suggest.
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None = None
    finish_reason: FinishReason | None = None  # set on the last event
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
    """Everything the server calls on an engine. Implemented by the vLLM and Transformers engines
    (and a fake in the unit tests); `server.engines.engine_class` picks the class for a setting."""

    info: EngineInfo

    @classmethod
    def start(cls, model_path: Path, settings: Settings, tokenizer: Tokenizer) -> Engine:
        """Load the model and start serving (blocking; called in a worker thread)."""
        ...

    @staticmethod
    def footprint(weights: int, settings: Settings, device: str, total: int) -> int:
        """Bytes this engine will hold for a model of `weights` bytes on a device of `total`."""
        ...

    def attach_to_loop(self) -> None:
        """Called on the serving event loop once `start` has returned (in a worker thread)."""
        ...

    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache in use now, 0..1."""
        ...

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


class Embedder(Protocol):
    """Everything the server calls on an embedding engine: a second, smaller protocol, because an
    embedding model does not generate (no sampling, no token stream, no KV cache to report).
    Implemented by vLLM's pooling runner and by a sentence-transformers-style engine on
    transformers (and a fake in the unit tests); `server.engines.embedder_class` picks one.

    Inputs arrive as token ids, tokenized and truncated to `info.max_model_len` by the server (the
    same way for every engine, so engines cannot disagree on truncation). Output vectors are pooled
    and normalized as the model's sentence-transformers config says (modules.json, 1_Pooling)."""

    info: EngineInfo  # max_num_seqs: inputs it embeds in one batch
    dimensions: int  # the length of its vectors

    @classmethod
    def start(cls, model_path: Path, settings: Settings, tokenizer: Tokenizer) -> Embedder:
        """Load the model (blocking; called in a worker thread)."""
        ...

    @staticmethod
    def footprint(weights: int, settings: Settings, device: str, total: int) -> int:
        """Bytes this engine will hold for a model of `weights` bytes on a device of `total`."""
        ...

    def attach_to_loop(self) -> None:
        """Called on the serving event loop once `start` has returned (in a worker thread)."""
        ...

    async def embed(self, inputs: list[list[int]], request_id: str) -> list[list[float]]:
        """One vector per input, in order. Concurrent calls are batched together by the engine.
        Cancelling the call drops its inputs from work not yet started."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine can no longer serve."""
        ...

    async def num_active_requests(self) -> int:
        """Inputs being embedded or waiting in the engine right now."""
        ...

    async def shutdown(self) -> None: ...
