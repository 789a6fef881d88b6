"""Settings are checked at construction and a bad value names its flag; the CLI says so in one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from server.__main__ import build_parser, parse_serve
from server.config import DEFAULT_MODEL_NAME, Settings, SettingsError
from tests.server_process import ROOT


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"port": 0}, "--port"),
        ({"port": 70000}, "--port"),
        ({"max_model_len": 0}, "--max-model-len"),
        ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization"),
        ({"kv_cache_space": -1}, "--kv-cache-space"),
        ({"tensor_parallel_size": 0}, "--tensor-parallel-size"),
        ({"engine": "tgi"}, "--engine"),
        ({"distributed_executor_backend": "slurm"}, "--distributed-executor-backend"),
        ({"dtype": "int3"}, "--dtype"),
        ({"served_model_name": " "}, "--served-model-name"),
        ({"redis_url": "localhost:6379"}, "--redis-url"),
        ({"limits_on_redis_failure": "maybe"}, "--limits-on-redis-failure"),
        ({"limits_lease": 0}, "--limits-lease"),
        ({"redis_timeout": 0}, "--redis-timeout"),
    ],
)
def test_bad_values_name_the_setting(kwargs: dict, flag: str) -> None:
    with pytest.raises(SettingsError, match=flag):
        Settings(**kwargs)


def test_model_name() -> None:
    assert Settings().model_name == DEFAULT_MODEL_NAME
    assert Settings(model="/models/foo/").model_name == "/models/foo"
    assert Settings(model="/models/foo", served_model_name="foo").model_name == "foo"


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("LLM_SERVICE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Settings().cache_dir == tmp_path / "llm-service"
    monkeypatch.setenv("LLM_SERVICE_CACHE", str(tmp_path / "x"))
    assert Settings().cache_dir == tmp_path / "x"


def test_cli_rejects_a_bad_flag_value_in_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "server", "serve", "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "llm-service: --port: must be at least 1 and at most 65535, not 0"


def test_cli_help_lists_engine_flags() -> None:
    r = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--model", "--served-model-name", "--max-model-len", "--dtype", "--gpu-memory-utilization",
                 "--tensor-parallel-size", "--kv-cache-space", "--max-num-seqs"):
        assert flag in r.stdout


def _parse(argv: list[str], environ: dict[str, str]) -> Settings:
    args, rest = parse_serve(*build_parser(), ["serve", *argv], environ)
    assert not rest
    return Settings.from_mapping(vars(args))


def test_flags_from_the_environment_and_the_command_line_wins(capsys: pytest.CaptureFixture[str]) -> None:
    env = {
        "LLM_SERVICE_PORT": "9001",
        "LLM_SERVICE_DATABASE_URL": "postgresql+psycopg://u:secret@db/llm",
        "LLM_SERVICE_LOG_CONTENT": "true",
        "LLM_SERVICE_API_KEY": "sk-one-123456, sk-two-123456",
        "LLM_SERVICE_MODEL": "",  # empty: as if unset
        "LLM_SERVICE_DISTRIBUTED_EXECUTOR_BACKEND": "ray",
        "LLM_SERVICE_CACHE": "/elsewhere",  # not a flag, read by Settings itself: no warning
        "LLM_SERVICE_MAX_NUM_SEQ": "4",  # a typo: warned about, ignored
    }
    s = _parse([], env)
    assert (s.port, s.database_url, s.log_content, s.model) == (9001, env["LLM_SERVICE_DATABASE_URL"], True, None)
    assert s.api_key == ("sk-one-123456", "sk-two-123456")
    assert s.distributed_executor_backend == "ray"
    assert capsys.readouterr().err.strip() == (
        "llm-service: ignoring LLM_SERVICE_MAX_NUM_SEQ: no such flag (--max-num-seq)")
    s = _parse(["--port", "9002", "--api-key", "sk-three-12345"], env)
    assert s.port == 9002 and s.api_key == ("sk-three-12345",)
    assert _parse([], {"LLM_SERVICE_LOG_CONTENT": "0"}).log_content is False
    assert _parse([], {"LLM_SERVICE_LOG_CONTENT": "", "LLM_SERVICE_PORT": " "}).port == 8000


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LLM_SERVICE_PORT", "eighty", "LLM_SERVICE_PORT='eighty': invalid literal for int()"),
        ("LLM_SERVICE_ENGINE", "tgi", "LLM_SERVICE_ENGINE='tgi': must be one of auto, vllm, transformers"),
        ("LLM_SERVICE_ENFORCE_EAGER", "maybe", "LLM_SERVICE_ENFORCE_EAGER='maybe': expected 1/0"),
    ],
)
def test_a_bad_environment_value_names_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        _parse([], {name: value})


def test_cli_reports_a_bad_environment_value_in_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "server", "serve"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "LLM_SERVICE_PORT": "0"})
    assert r.returncode == 2
    assert r.stderr.strip() == "llm-service: --port: must be at least 1 and at most 65535, not 0"
