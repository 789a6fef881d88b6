"""One Settings object, built once and validated at construction.

A bad value raises `SettingsError` naming the setting (as its command-line flag), so the CLI can
print one clear line instead of a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32")
ENGINES: tuple[str, ...] = ("auto", "vllm", "transformers")
# vLLM's executors for tensor/pipeline parallelism: mp (processes on one machine), ray (a Ray
# cluster, several machines), uni (one process), external_launcher (torchrun)
EXECUTOR_BACKENDS: tuple[str, ...] = ("mp", "ray", "uni", "external_launcher")


class SettingsError(ValueError):
    """A setting has a value the server cannot run with."""

    def __init__(self, name: str, message: str) -> None:
        flag = "--" + name.replace("_", "-")
        super().__init__(f"{flag}: {message}")
        self.name = name


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
    seed: int = 0
    max_logprobs: int = 20
    # operations
    api_key: tuple[str, ...] = ()  # --api-key, repeatable
    api_keys_file: Path | None = None
    metrics_require_key: bool = False
    max_queued_requests: int = 64
    max_request_bytes: int = 4 << 20
    max_messages: int = 2048
    max_tokens_limit: int | None = None  # None: the context length
    shutdown_timeout: float = 30.0  # seconds running requests get to finish on SIGTERM
    database_url: str | None = None  # None: SQLite in the cache folder
    log_content: bool = False  # prompt and answer text in the request log
    request_log_buffer: int = 10000  # rows waiting for the database before they are dropped (counted)

    def __post_init__(self) -> None:
        self._check_positive("port", self.port, upper=65535)
        if self.engine not in ENGINES:
            raise SettingsError("engine", f"must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.distributed_executor_backend not in (None, *EXECUTOR_BACKENDS):
            raise SettingsError("distributed_executor_backend",
                                f"must be one of {', '.join(EXECUTOR_BACKENDS)}, not {self.distributed_executor_backend!r}")
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
        self._check_positive("request_log_buffer", self.request_log_buffer)
        if self.database_url is not None and "://" not in self.database_url:
            raise SettingsError("database_url", "must be a SQLAlchemy URL such as sqlite:///requests.db "
                                "or postgresql+psycopg://user:password@host/dbname")
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
        if self.log_level.lower() not in {"critical", "error", "warning", "info", "debug"}:
            raise SettingsError("log_level", f"unknown level {self.log_level!r}")

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
        if "cache_dir" in kwargs:
            kwargs["cache_dir"] = Path(kwargs["cache_dir"]).expanduser()
        if "api_keys_file" in kwargs:
            kwargs["api_keys_file"] = Path(kwargs["api_keys_file"]).expanduser()
        if "api_key" in kwargs:
            kwargs["api_key"] = tuple(kwargs["api_key"])
        return cls(**kwargs)

    @property
    def request_log_url(self) -> str:
        return self.database_url or f"sqlite:///{self.cache_dir / 'requests.sqlite3'}"

    @property
    def model_name(self) -> str:
        """The id clients use for the served model."""
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return DEFAULT_MODEL_NAME
        return self.model.rstrip("/")
