"""Settings are checked at construction and a bad value names its flag; the CLI says so in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
        ({"dtype": "int3"}, "--dtype"),
        ({"served_model_name": " "}, "--served-model-name"),
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
