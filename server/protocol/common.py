"""What the request and response schemas of several surfaces share."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from server import structured
from server.engines.base import Constraint, SamplingSpec
from server.errors import InvalidRequest, UnsupportedParameter

# OpenAI's documented bounds
MAX_N = 128
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
# integers an engine takes: 64-bit signed (seed + choice index included, checked by the pipeline)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
# token-id lists a client sends (stop_token_ids, allowed_token_ids, bad_words): bounded
MAX_TOKEN_LIST = 4096

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


def listed(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A prompt or input field as a list of items: strings, or token-id lists (a flat list of ids
    is one item), as OpenAI's completions and embeddings take them."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(x, int) for x in value):
        return [[int(x) for x in value if isinstance(x, int)]]
    if all(isinstance(x, str) for x in value):
        return [str(x) for x in value]
    return [[int(t) for t in x] for x in value if isinstance(x, list)]


class _Request(BaseModel):
    """A request schema: unknown fields are refused by name; `REFUSED` fields are known but not
    served here, refused with the reason when they carry anything but their no-op default."""

    model_config = ConfigDict(extra="forbid")
    # field -> (the values that change nothing, why anything else is refused)
    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {}
    # where this object sits in a request ("messages."): a refusal's param names the whole path
    PARAM_PREFIX: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, (noops, why) in cls.REFUSED.items():
                if name in data and data[name] not in noops:
                    raise UnsupportedParameter(cls.PARAM_PREFIX + name, why)
            return {k: v for k, v in data.items() if k not in cls.REFUSED}
        return data


# vLLM's bound on cache_salt (vllm/entrypoints/generate/base/protocol.py)
MAX_CACHE_SALT, CACHE_SALT_FORBIDDEN = 128, frozenset("@/\\\0")

NO_MULTIMODAL = "This server serves text models: images, audio, video and files are not supported."
VLLM_FLAG = "vLLM allows it only when its server is started with a flag that this server does not offer"


def refused_common() -> dict[str, tuple[tuple[Any, ...], str]]:
    """Fields both generation routes refuse (OpenAI's and vLLM's)."""
    return {
        "use_beam_search": ((None, False), "Beam search is not supported; use n for several samples."),
        "length_penalty": ((None, 1, 1.0), "It applies only to beam search, which is not supported."),
        "watermarking": ((None, False), "Watermarking is not supported."),
        "repetition_detection": ((None,), "Repetition detection is not supported: it ends an answer with "
                                 "finish_reason 'repetition', which is not one of OpenAI's."),
        "thinking_token_budget": ((None, -1), "This server has no reasoning-token budgets."),
        "logprob_token_ids": ((None, []), "Logprobs of chosen token ids are not supported; use top_logprobs."),
        "routed_experts_prompt_start": ((None, 0), "Expert routing data is not exposed by this server."),
        "return_token_offsets": ((None, False), "Token offsets are not supported; use return_token_ids."),
        "mm_payload": ((None, "tensors"), NO_MULTIMODAL),
        "return_mm_kwargs": ((None, False), NO_MULTIMODAL),
        "kv_transfer_params": ((None,), "Disaggregated prefill (a KV connector) is not configured on this server."),
        "ec_transfer_params": ((None,), "Encoder-cache transfer is not configured on this server."),
        "vllm_xargs": ((None,), "Custom engine arguments are not accepted from clients."),
    }


class JsonSchemaFormat(_Request):
    """`response_format.json_schema`: the schema the answer must match (always enforced, whatever
    `strict` says: a non-strict schema is met too)."""

    PARAM_PREFIX = "response_format.json_schema."
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's `text`, `json_object` and `json_schema`, and vLLM's `structural_tag`."""

    PARAM_PREFIX = "response_format."
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    # vLLM's structural tag: the xgrammar format tree, or the older structures + triggers
    format: dict[str, Any] | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None

    @model_validator(mode="after")
    def _fields_of_type(self) -> ResponseFormat:
        takes = {"json_schema": {"json_schema"}, "structural_tag": {"format", "structures", "triggers"}}.get(self.type, set())
        for name in ("json_schema", "format", "structures", "triggers"):
            if getattr(self, name) is not None and name not in takes:
                raise InvalidRequest(f"Invalid value for 'response_format.{name}': not taken by type {self.type!r}.",
                                     param=f"response_format.{name}")
        if self.type == "json_schema" and self.json_schema is None:
            raise InvalidRequest("Missing required parameter: 'response_format.json_schema'.",
                                 param="response_format.json_schema")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return structured.json_object()
        if self.type == "json_schema" and self.json_schema is not None:
            schema = self.json_schema.schema_
            return structured.json_schema(True if schema is None else schema, "response_format.json_schema.schema")
        if self.type == "structural_tag":
            tag = ({"type": "structural_tag", "format": self.format} if self.format is not None
                   else {"structures": self.structures or [], "triggers": self.triggers or []})
            return structured.structural_tag(tag, "response_format")
        return None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object,
    structural_tag."""

    PARAM_PREFIX = "structured_outputs."
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(max_length=4096)] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    # hints: JSON here is always compact and never has properties its schema does not list,
    # which meets either value of both
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "whitespace_pattern": ((None,), "JSON is generated without free whitespace here; a whitespace "
                                        "pattern cannot be applied."),
    }

    def constraint(self) -> Constraint:
        p = "structured_outputs"
        given = [k for k in ("json_", "regex", "choice", "grammar", "structural_tag") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequest(f"Invalid value for '{p}': give exactly one of json, regex, choice, grammar, "
                                 f"json_object, structural_tag (got {len(given)}).", param=p)
        if self.json_ is not None:
            schema = self.json_
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise InvalidRequest(f"Invalid value for '{p}.json': not JSON ({e.msg}).", param=f"{p}.json") from None
            return structured.json_schema(schema, f"{p}.json")
        if self.regex is not None:
            return structured.regex(self.regex, f"{p}.regex")
        if self.choice is not None:
            return structured.choice(self.choice, f"{p}.choice")
        if self.grammar is not None:
            return structured.grammar(self.grammar, f"{p}.grammar")
        if self.structural_tag is not None:
            return structured.structural_tag(self.structural_tag, f"{p}.structural_tag")
        return structured.json_object()


class StreamOptions(_Request):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM: usage so far in every chunk
    include_obfuscation: bool | None = None  # a hint: OpenAI's padding against length side channels


class PromptCacheOptions(_Request):
    """OpenAI's prompt-cache controls: a hint (our prefix cache is automatic, per block)."""

    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


class SamplingFields(_Request):
    """Fields shared by both generation routes (OpenAI's, vLLM's extras, and hints)."""

    model: str
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None  # no end-of-sequence before this many
    ignore_eos: bool | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_TOKEN_LIST)] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    bad_words: Annotated[list[str], Field(max_length=MAX_TOKEN_LIST)] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=1 << 20)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    return_token_ids: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    return_tokens_as_token_ids: bool | None = None
    add_special_tokens: bool | None = None
    priority: Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)] | None = None
    cache_salt: str | None = None  # vLLM's bound, checked below
    request_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:+=-]{1,128}$")] | None = None
    # hints: accepted, no effect on the output by their definition (see the README's table)
    metadata: dict[str, str] | None = None  # kept in the request log
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=1024)] | None = None
    prompt_cache_retention: Literal["in-memory", "in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None  # kept in the request log
    session_id: Annotated[str, Field(max_length=1024)] | None = None
    stream_interval: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None

    @model_validator(mode="after")
    def _check_common(self) -> SamplingFields:
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest("Invalid value for 'min_tokens': must not exceed 'max_tokens'.", param="min_tokens")
        stops = self.stop_list()
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(
                f"Invalid value for 'stop': at most {MAX_STOP_SEQUENCES} sequences are allowed.",
                param="stop",
            )
        if any(s == "" for s in stops):
            raise InvalidRequest("Invalid value for 'stop': stop sequences must not be empty.", param="stop")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "Invalid value for 'stream_options': only allowed when 'stream' is true.",
                param="stream_options",
            )
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequest("Invalid value for 'prompt_logprobs': not available when 'stream' is true.",
                                 param="prompt_logprobs")
        for token in self.logit_bias or {}:
            if not token.isdigit() or int(token) > INT32_MAX:
                raise InvalidRequest(f"Invalid value for 'logit_bias': the key {token[:40]!r} is not a token id.",
                                     param="logit_bias")
        if self.metadata is not None:
            _check_metadata(self.metadata)
        salt = self.cache_salt
        if salt is not None and (not salt or len(salt) > MAX_CACHE_SALT or not CACHE_SALT_FORBIDDEN.isdisjoint(salt)):
            raise InvalidRequest(f"Invalid value for 'cache_salt': a non-empty string of at most {MAX_CACHE_SALT} "
                                 "characters, without '@', '/', a backslash or NUL.", param="cache_salt")
        if self.bad_words and any(not w.strip() for w in self.bad_words):
            raise InvalidRequest("Invalid value for 'bad_words': words must not be empty.", param="bad_words")
        return self

    def constraint(self, response_format: ResponseFormat | None) -> Constraint | None:
        """The grammar the answer must match, from `response_format` or `structured_outputs`."""
        from_format = response_format.constraint() if response_format is not None else None
        if from_format is not None and self.structured_outputs is not None:
            raise InvalidRequest("Give 'response_format' or 'structured_outputs', not both.", param="structured_outputs")
        return from_format or (self.structured_outputs.constraint() if self.structured_outputs else None)

    def check_constrained(self, why: str) -> None:
        """A structured answer ends where its grammar ends and holds only what it allows: what
        would end it elsewhere, keep it going, ban the grammar's only way on, or add the end token's
        text is refused."""
        for name, value in (("stop", self.stop_list()), ("stop_token_ids", self.stop_token_ids),
                            ("min_tokens", self.min_tokens), ("ignore_eos", self.ignore_eos),
                            ("allowed_token_ids", self.allowed_token_ids is not None), ("bad_words", self.bad_words),
                            ("skip_special_tokens", self.skip_special_tokens is False)):
            if value:
                raise InvalidRequest(f"'{name}' cannot be used with {why}: the answer is generated by its grammar "
                                     "alone, to its end, so that it always parses and validates.", param=name)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and (self.stream_options.include_usage
                                             or self.stream_options.continuous_usage_stats))

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def sampling(self, logprobs: int | None, prompt_logprobs: int | None,
                 constraint: Constraint | None = None) -> SamplingSpec:
        """The engine's spec; max_tokens is settled by the pipeline (0 until then)."""
        return SamplingSpec(
            max_tokens=0,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            min_tokens=self.min_tokens or 0,
            stop=tuple(self.stop_list()),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            ignore_eos=bool(self.ignore_eos),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            skip_special_tokens=self.skip_special_tokens is not False,
            spaces_between_special_tokens=self.spaces_between_special_tokens is not False,
            logit_bias=tuple((int(t), float(b)) for t, b in (self.logit_bias or {}).items()),
            bad_words=tuple(self.bad_words or ()),
            allowed_token_ids=tuple(self.allowed_token_ids) if self.allowed_token_ids is not None else None,
            priority=self.priority or 0,
            cache_salt=self.cache_salt,
            constraint=constraint,
        )


def _check_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"Invalid value for 'metadata': at most {MAX_METADATA_PAIRS} pairs.", param="metadata")
    for k, v in metadata.items():
        if len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE:
            raise InvalidRequest(f"Invalid value for 'metadata': keys are at most {MAX_METADATA_KEY} characters "
                                 f"and values at most {MAX_METADATA_VALUE}.", param="metadata")


# --------------------------------------------------------------------------- responses


class Wire(BaseModel):
    """Response object: `None` fields are omitted, except those OpenAI sends as explicit null."""

    KEEP_NULL: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in self.KEEP_NULL}


class PromptTokensDetails(Wire):
    cached_tokens: int = 0


class Usage(Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class PromptLogprob(Wire):
    """vLLM's shape for one token of `prompt_logprobs`."""

    KEEP_NULL = frozenset({"rank", "decoded_token"})
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, PromptLogprob] | None]


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, server_error, requests (a rate limit), server_overloaded
    param: str | None  # the request field at fault, as a dotted path ("messages.content")
    code: str | None  # e.g. model_not_found, unsupported_parameter, context_length_exceeded


class ErrorResponse(BaseModel):
    """OpenAI's error shape: the body of every 4xx and 5xx (`errors.APIError.to_dict`), and the
    one event a stream that fails midway sends."""

    error: ErrorDetail
