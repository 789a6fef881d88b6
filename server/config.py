"""One Settings object, built once and validated at construction.

A bad value raises `SettingsError` naming the setting (as its command-line flag), so the CLI can
print one clear line instead of a traceback.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
# the embedding model `make serve` serves beside the chat model (--embedding-model)
DEFAULT_EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"
# what a model does: generate text (chat, completions, responses) or embed it (embeddings)
Kind = Literal["generate", "embed"]
KINDS: tuple[str, ...] = ("generate", "embed")
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32")
ENGINES: tuple[str, ...] = ("auto", "vllm", "transformers")
# vLLM's executors for tensor/pipeline parallelism: mp (processes on one machine), ray (a Ray
# cluster, several machines), uni (one process), external_launcher (torchrun)
EXECUTOR_BACKENDS: tuple[str, ...] = ("mp", "ray", "uni", "external_launcher")
# the order vLLM schedules waiting requests in: arrival, or a request's `priority` (lower first)
SchedulingPolicy = Literal["fcfs", "priority"]
SCHEDULING_POLICIES: tuple[str, ...] = ("fcfs", "priority")
# which cores an engine's threads use on CPU: auto (ours, from the machine: vLLM's workers bound by
# server.engines.vllm_engine.cpu_binding, torch's threads one per physical core) or default (each
# engine's own: vLLM keeps a core per worker for its front end and wants a NUMA node per worker)
CPU_PLACEMENTS: tuple[str, ...] = ("auto", "default")
# speculative decoding (vLLM): ngram proposes the tokens that followed the last n-gram where it
# appeared before in the prompt or answer (prompt lookup), no draft model
SPECULATIVE_METHODS: tuple[str, ...] = ("ngram",)
# engine settings one model may set for itself (a models file's `settings:`, the admin API);
# everything else (HTTP, keys, limits, the request log) is the server's
MODEL_SETTINGS: tuple[str, ...] = (
    "max_model_len", "dtype", "gpu_memory_utilization", "kv_cache_space", "tensor_parallel_size",
    "pipeline_parallel_size", "distributed_executor_backend", "max_num_seqs", "max_num_batched_tokens",
    "enforce_eager", "seed", "max_logprobs", "trust_remote_code", "scheduling_policy", "tool_call_format",
    "enable_prefix_caching", "speculative", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
)
# the server's flags an embedding model does not inherit (it sets them in its own `settings`)
EMBED_OWN_SETTINGS: tuple[str, ...] = ("max_model_len", "gpu_memory_utilization", "kv_cache_space", "max_num_seqs",
                                       "max_num_batched_tokens", "tensor_parallel_size", "pipeline_parallel_size",
                                       "distributed_executor_backend", "scheduling_policy", "max_logprobs",
                                       "speculative")
# how a model writes tool calls: auto (read from its chat template) or one of server.tools' formats
TOOL_CALL_FORMATS: tuple[str, ...] = ("auto", "hermes", "llama3_json", "mistral")
# `--model NAME=default` / a models file's `source: default`: the embedded default model
DEFAULT_SOURCE = "default"


class SettingsError(ValueError):
    """A setting has a value the server cannot run with."""

    def __init__(self, name: str, message: str) -> None:
        flag = "--" + name.replace("_", "-")
        super().__init__(f"{flag}: {message}")
        self.name = name


class ModelSpecError(ValueError):
    """A model or alias declaration is malformed; the message names the field."""


@dataclass(frozen=True)
class ModelSpec:
    """One model the server serves, declared at start (`--model`, `--models-file`) or through
    `POST /v1/admin/models`. `settings` override the server's engine settings for this model."""

    name: str
    source: str | None = None  # None: the embedded default model of its kind
    engine: str | None = None  # None: the server's --engine
    preload: bool = True  # False: loaded by its first request (and unloaded by --idle-unload)
    settings: tuple[tuple[str, Any], ...] = ()
    kind: Kind = "generate"
    # False only for the embedding model served by default (--embedding-model's default): if it
    # cannot load (it does not fit beside a chat model that took 90% of a GPU), the server says
    # why and serves the rest, instead of refusing to start
    required: bool = True

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        """From a models file entry or an admin API body; ModelSpecError names what is wrong."""
        if not isinstance(data, dict):
            raise ModelSpecError(f"a model must be a mapping with name and source, not {data!r}")
        unknown = set(data) - {"name", "source", "engine", "preload", "settings", "kind"}
        if unknown:
            raise ModelSpecError(f"unknown field(s) {', '.join(sorted(unknown))} "
                                 "(a model has name, source, engine, preload, settings, kind)")
        name = data.get("name")
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ModelSpecError(f"'name' must be a non-empty string without surrounding spaces, not {name!r}")
        source = data.get("source")
        if source is not None and (not isinstance(source, str) or not source.strip()):
            raise ModelSpecError(f"model {name!r}: 'source' must be a folder, .gguf file or hub id, not {source!r}")
        engine = data.get("engine")
        if engine is not None and engine not in ENGINES:
            raise ModelSpecError(f"model {name!r}: 'engine' must be one of {', '.join(ENGINES)}, not {engine!r}")
        preload = data.get("preload", True)
        if not isinstance(preload, bool):
            raise ModelSpecError(f"model {name!r}: 'preload' must be true or false, not {preload!r}")
        settings = data.get("settings") or {}
        if not isinstance(settings, dict):
            raise ModelSpecError(f"model {name!r}: 'settings' must be a mapping, not {settings!r}")
        bad = sorted(set(settings) - set(MODEL_SETTINGS))
        if bad:
            raise ModelSpecError(f"model {name!r}: 'settings' cannot set {', '.join(bad)}; "
                                 f"a model may set {', '.join(MODEL_SETTINGS)}")
        kind = data.get("kind", "generate")
        if kind not in KINDS:
            raise ModelSpecError(f"model {name!r}: 'kind' must be one of {', '.join(KINDS)}, not {kind!r}")
        return cls(name, None if source in (None, DEFAULT_SOURCE) else source, engine, preload,
                   tuple(sorted(settings.items())), kind)

    def engine_settings(self, server: Settings) -> Settings:
        """The server's settings with this model's source, name, engine and overrides; checked
        like the command line's (SettingsError names the setting). An embedding model does not
        take the server's sizing flags (context, memory share, batch): those size the chat model,
        and an encoder of 256 tokens cannot use them; it sets its own in `settings`."""
        sizing = {name: getattr(Settings, name) for name in EMBED_OWN_SETTINGS} if self.kind == "embed" else {}
        return replace(server, model=self.source, served_model_name=self.name, engine=self.engine or server.engine,
                       models=(), aliases=(), models_file=None, model_kind=self.kind, embedding_model=None,
                       **{**sizing, **dict(self.settings)})

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "source": self.source or DEFAULT_SOURCE, "engine": self.engine,
                "preload": self.preload, "settings": dict(self.settings)}


@dataclass(frozen=True)
class Alias:
    """A public model name for one model, or for weighted variants of an A/B trial."""

    name: str
    variants: tuple[tuple[str, float], ...]  # (model name, weight > 0)

    @classmethod
    def from_value(cls, name: str, value: Any) -> Alias:
        if isinstance(value, str):
            return cls(name, ((value, 1.0),))
        if not isinstance(value, dict) or not value:
            raise ModelSpecError(f"alias {name!r}: give a model name or a mapping of model names to weights, not {value!r}")
        variants = []
        for model, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
                raise ModelSpecError(f"alias {name!r}: the weight of {model!r} must be a positive number, not {weight!r}")
            variants.append((str(model), float(weight)))
        return cls(name, tuple(variants))

    def describe(self) -> dict[str, float]:
        total = sum(w for _, w in self.variants)
        return {m: w / total for m, w in self.variants}


def read_models_file(path: Path) -> tuple[tuple[ModelSpec, ...], tuple[Alias, ...]]:
    """`--models-file`: YAML (or JSON) with `models:` (a list) and optional `aliases:`."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SettingsError("models_file", f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SettingsError("models_file", f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise SettingsError("models_file", f"{path} must be a mapping with a 'models:' list")
    unknown = set(data) - {"models", "aliases"}
    if unknown:
        raise SettingsError("models_file", f"{path}: unknown section(s) {', '.join(sorted(unknown))} (models, aliases)")
    aliases = data.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise SettingsError("models_file", f"{path}: 'aliases' must be a mapping of alias -> model or weights")
    try:
        return (tuple(ModelSpec.from_dict(m) for m in data["models"]),
                tuple(Alias.from_value(str(k), v) for k, v in aliases.items()))
    except ModelSpecError as e:
        raise SettingsError("models_file", f"{path}: {e}") from None


def _model_flag(value: str) -> ModelSpec:
    """`--model SOURCE` or `--model NAME=SOURCE` (NAME has no '/': a path or hub id never starts so)."""
    name, sep, source = value.partition("=")
    if sep and name and "/" not in name and source:
        return ModelSpec(name, None if source == DEFAULT_SOURCE else source)
    if value == DEFAULT_SOURCE:
        return ModelSpec(DEFAULT_MODEL_NAME)
    return ModelSpec(value.rstrip("/"), value)


def default_cache_dir() -> Path:
    """`$LLM_SERVICE_CACHE`, else `$XDG_CACHE_HOME/llm-service`, else `~/.cache/llm-service`."""
    if env := os.environ.get("LLM_SERVICE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-service"


@dataclass(frozen=True)
class Settings:
    # model
    model: str | None = None  # None: the embedded default model
    served_model_name: str | None = None
    model_kind: Kind = "generate"  # of `model` (a model's own settings; the server's one --model generates)
    # served beside the chat model(s) as `all-minilm-l6-v2`: "default" (the embedded
    # all-MiniLM-L6-v2), a folder or hub id, or None (--embedding-model none: no embedding model)
    embedding_model: str | None = DEFAULT_SOURCE
    cache_dir: Path = field(default_factory=default_cache_dir)
    trust_remote_code: bool = False
    # http
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "info"
    # engine
    engine: str = "auto"  # auto: vLLM where it imports and supports the machine, else transformers
    max_model_len: int | None = None
    dtype: Dtype = "auto"
    gpu_memory_utilization: float | None = None
    kv_cache_space: float | None = None  # GiB
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None: vLLM's choice (mp on one machine)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    enable_prefix_caching: bool = True  # reuse the KV of cached prompt prefixes (both engines)
    seed: int = 0
    max_logprobs: int = 20
    scheduling_policy: SchedulingPolicy = "fcfs"  # vLLM's; "priority" honours requests' `priority`
    tool_call_format: str = "auto"  # auto: from the chat template (hermes when it knows no tools)
    cpu_placement: str = "auto"  # on CPU: our thread placement or the engine's own (environment variables win)
    speculative: str | None = None  # vLLM: "ngram" (prompt lookup) proposes tokens for the model to check
    num_speculative_tokens: int = 4  # tokens proposed per step
    prompt_lookup_max: int = 4  # the longest n-gram looked up
    prompt_lookup_min: int = 2  # the shortest n-gram looked up
    # operations
    api_key: tuple[str, ...] = ()  # --api-key, repeatable
    api_keys_file: Path | None = None
    metrics_require_key: bool = False
    docs_require_key: bool = False  # /docs, /redoc, /openapi.json behind the keys too
    max_queued_requests: int = 64
    max_request_bytes: int = 4 << 20
    max_messages: int = 2048
    max_tokens_limit: int | None = None  # None: the context length
    shutdown_timeout: float = 30.0  # seconds running requests get to finish on SIGTERM
    database_url: str | None = None  # None: SQLite in the cache folder
    # per-key limits shared by every replica: counted in Redis (None: in this process), what a
    # request of a limited key meets when Redis fails, how long a dead replica's slots stay taken,
    # and the most a request waits on Redis
    redis_url: str | None = None
    limits_on_redis_failure: str = "open"
    limits_lease: float = 30.0  # seconds
    redis_timeout: float = 0.05  # seconds
    log_content: bool = False  # prompt and answer text in the request log
    request_log_buffer: int = 10000  # rows waiting for the database before they are dropped (counted)
    # the Responses API: responses with `store` (OpenAI's default) and conversations are kept in the
    # database; off: nothing is kept, and `store: true` responses say `"store": false`
    store_responses: bool = True
    chat_page: bool = True  # the web page at / (browsers) and /chat
    response_retention: float = 30.0  # days a stored response (and an idle conversation) is kept
    # the Batch API: where file contents live (None: in the database when it is PostgreSQL, else
    # the `files` folder under the cache folder), their size cap, how many of the batch lines run
    # at once on this replica, and the completion window's length
    files_dir: Path | None = None
    max_file_bytes: int = 200 << 20
    batch_concurrency: int = 4
    batch_window: float = 86400.0
    # many models (empty: the one --model / the default model)
    models: tuple[ModelSpec, ...] = ()
    aliases: tuple[Alias, ...] = ()
    models_file: Path | None = None  # where models and aliases came from (for messages)
    memory_budget: float | None = None  # GiB the models may take together; None: 90% of the device's
    evict_idle: bool = False  # make room by unloading the least recently used idle lazy model
    idle_unload: float | None = None  # seconds: unload a lazy model idle this long
    load_wait: float = 60.0  # seconds a request waits for its lazy model to load before a 503

    def __post_init__(self) -> None:
        self._check_positive("port", self.port, upper=65535)
        if self.engine not in ENGINES:
            raise SettingsError("engine", f"must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.distributed_executor_backend not in (None, *EXECUTOR_BACKENDS):
            raise SettingsError("distributed_executor_backend",
                                f"must be one of {', '.join(EXECUTOR_BACKENDS)}, not {self.distributed_executor_backend!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise SettingsError("scheduling_policy",
                                f"must be one of {', '.join(SCHEDULING_POLICIES)}, not {self.scheduling_policy!r}")
        if self.tool_call_format not in TOOL_CALL_FORMATS:
            raise SettingsError("tool_call_format",
                                f"must be one of {', '.join(TOOL_CALL_FORMATS)}, not {self.tool_call_format!r}")
        if self.cpu_placement not in CPU_PLACEMENTS:
            raise SettingsError("cpu_placement", f"must be one of {', '.join(CPU_PLACEMENTS)}, not {self.cpu_placement!r}")
        if self.speculative not in (None, *SPECULATIVE_METHODS):
            raise SettingsError("speculative", f"must be one of {', '.join(SPECULATIVE_METHODS)}, not {self.speculative!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            self._check_positive(name, getattr(self, name))
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise SettingsError("prompt_lookup_min", f"must be at most --prompt-lookup-max ({self.prompt_lookup_max}), "
                                f"not {self.prompt_lookup_min}")
        if self.dtype not in DTYPES:
            raise SettingsError("dtype", f"must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None:
                self._check_positive(name, value)
        self._check_positive("tensor_parallel_size", self.tensor_parallel_size)
        self._check_positive("pipeline_parallel_size", self.pipeline_parallel_size)
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise SettingsError(
                "gpu_memory_utilization",
                f"must be a fraction in (0, 1], not {self.gpu_memory_utilization}",
            )
        if self.kv_cache_space is not None and self.kv_cache_space <= 0:
            raise SettingsError("kv_cache_space", f"must be a positive number of GiB, not {self.kv_cache_space}")
        if not isinstance(self.enable_prefix_caching, bool):  # a models file's `settings:` may say anything
            raise SettingsError("enable_prefix_caching", f"must be true or false, not {self.enable_prefix_caching!r}")
        self._check_positive("request_log_buffer", self.request_log_buffer)
        if not self.response_retention > 0:
            raise SettingsError("response_retention", f"must be a positive number of days, not {self.response_retention}")
        if self.database_url is not None and "://" not in self.database_url:
            raise SettingsError("database_url", "must be a SQLAlchemy URL such as sqlite:///requests.db "
                                "or postgresql+psycopg://user:password@host/dbname")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("redis_url", f"must be a Redis URL (redis://host:6379/0, rediss://… or unix://…), "
                                f"not {self.redis_url!r}")
        if self.limits_on_redis_failure not in ("open", "closed"):
            raise SettingsError("limits_on_redis_failure", f"must be open or closed, not {self.limits_on_redis_failure!r}")
        if not self.limits_lease > 0:
            raise SettingsError("limits_lease", f"must be a positive number of seconds, not {self.limits_lease}")
        if not 0 < self.redis_timeout <= 10:
            raise SettingsError("redis_timeout", f"must be a number of seconds in (0, 10], not {self.redis_timeout}")
        self._check_positive("max_file_bytes", self.max_file_bytes)
        self._check_positive("batch_concurrency", self.batch_concurrency)
        if not self.batch_window > 0:
            raise SettingsError("batch_window", f"must be a positive number of seconds, not {self.batch_window}")
        if self.shutdown_timeout < 0:
            raise SettingsError("shutdown_timeout", "must not be negative")
        if self.max_queued_requests < 0:
            raise SettingsError("max_queued_requests", "must not be negative")
        self._check_positive("max_request_bytes", self.max_request_bytes)
        self._check_positive("max_messages", self.max_messages)
        if self.max_tokens_limit is not None:
            self._check_positive("max_tokens_limit", self.max_tokens_limit)
        for key in self.api_key:
            if len(key) < 8:
                raise SettingsError("api_key", "keys must be at least 8 characters long")
        if self.max_logprobs < 0:
            raise SettingsError("max_logprobs", "must not be negative")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise SettingsError("served_model_name", "must not be empty")
        self._check_models()
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise SettingsError("memory_budget", f"must be a positive number of GiB, not {self.memory_budget}")
        if self.idle_unload is not None and self.idle_unload <= 0:
            raise SettingsError("idle_unload", f"must be a positive number of seconds, not {self.idle_unload}")
        if self.load_wait < 0:
            raise SettingsError("load_wait", "must not be negative")
        if self.log_level.lower() not in {"critical", "error", "warning", "info", "debug"}:
            raise SettingsError("log_level", f"unknown level {self.log_level!r}")

    def _check_models(self) -> None:
        if not self.models:
            return
        where = "models_file" if self.models_file is not None else "model"
        if self.served_model_name is not None:
            raise SettingsError("served_model_name", "names the one --model; with several models, "
                                "name each (--model NAME=SOURCE, or name: in the models file)")
        names = [m.name for m in self.models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SettingsError(where, f"model name(s) declared twice: {', '.join(twice)}")
        for alias in self.aliases:
            if alias.name in names:
                raise SettingsError(where, f"alias {alias.name!r} has the name of a model")
            missing = [m for m, _ in alias.variants if m not in names]
            if missing:
                raise SettingsError(where, f"alias {alias.name!r} points at undeclared model(s) {', '.join(missing)}")
            kinds = {m.kind for m in self.models if m.name in dict(alias.variants)}
            if len(kinds) > 1:
                raise SettingsError(where, f"alias {alias.name!r} mixes generating and embedding models")
        for spec in self.models:
            try:
                spec.engine_settings(self)
            except SettingsError as e:
                raise SettingsError(where, f"model {spec.name!r}: {e}") from None

    @property
    def served_models(self) -> tuple[ModelSpec, ...]:
        """What the server serves: the declared models, or the one --model (or the default); and
        the embedding model unless it is off or a declared model has its name."""
        models = self.models or (ModelSpec(self.model_name, self.model),)
        if self.embedding_model is None or any(m.name == DEFAULT_EMBEDDING_MODEL_NAME for m in models):
            return models
        source = None if self.embedding_model == DEFAULT_SOURCE else self.embedding_model
        return (*models, ModelSpec(DEFAULT_EMBEDDING_MODEL_NAME, source, kind="embed", required=source is not None))

    @staticmethod
    def _check_positive(name: str, value: int, upper: int | None = None) -> None:
        if value < 1 or (upper is not None and value > upper):
            bound = f" and at most {upper}" if upper else ""
            raise SettingsError(name, f"must be at least 1{bound}, not {value}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Settings:
        """Build from parsed CLI arguments, ignoring keys that are not settings."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names and v is not None}
        models: list[ModelSpec] = []
        aliases: tuple[Alias, ...] = ()
        flags = kwargs.pop("model", None)
        if isinstance(flags, str):
            flags = [flags]
        if flags:
            specs = [_model_flag(v) for v in flags]
            # one plain --model keeps its old meaning (its name from --served-model-name or itself)
            if len(specs) == 1 and "=" not in flags[0] and "models_file" not in kwargs:
                kwargs["model"] = specs[0].source
            else:
                models.extend(specs)
        if "models_file" in kwargs:
            kwargs["models_file"] = Path(kwargs["models_file"]).expanduser()
            file_models, aliases = read_models_file(kwargs["models_file"])
            models.extend(file_models)
        if models:
            kwargs["models"], kwargs["aliases"] = tuple(models), aliases
        if kwargs.get("embedding_model") == "none":
            kwargs["embedding_model"] = None
        for folder in ("cache_dir", "files_dir"):
            if kwargs.get(folder) is not None:
                kwargs[folder] = Path(kwargs[folder]).expanduser()
        if "api_keys_file" in kwargs:
            kwargs["api_keys_file"] = Path(kwargs["api_keys_file"]).expanduser()
        if "api_key" in kwargs:
            kwargs["api_key"] = tuple(kwargs["api_key"])
        return cls(**kwargs)

    @property
    def request_log_url(self) -> str:
        return self.database_url or f"sqlite:///{self.cache_dir / 'requests.sqlite3'}"

    @property
    def files_folder(self) -> Path | None:
        """Where uploaded and produced files' bytes live; None: in the database (PostgreSQL)."""
        if self.files_dir is not None:
            return self.files_dir
        return None if self.request_log_url.startswith("postgresql") else self.cache_dir / "files"

    @property
    def model_name(self) -> str:
        """The id clients use for the served model."""
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return DEFAULT_MODEL_NAME
        return self.model.rstrip("/")
