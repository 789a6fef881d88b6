"""The seams around the engines: every engine class (and the unit tests' fake) is a full `Engine`,
`engine_class` picks one without importing the other, and `--scheduling-policy` is an engine
setting like the others (flag, environment variable, models file)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from server import engines
from server.__main__ import build_parser, parse_serve
from server.config import ModelSpec, Settings, SettingsError
from server.engines.base import Engine
from server.engines.hf import HFEngine
from server.engines.vllm_engine import VLLMEngine
from tests.fake_engine import FakeEngine

# mypy checks each class against the protocol here
CLASSES: list[type[Engine]] = [HFEngine, VLLMEngine, FakeEngine]
MEMBERS = ("start", "footprint", "attach_to_loop", "kv_cache_usage", "generate", "abort", "check_health",
           "num_active_requests", "shutdown")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_engine_class_has_the_whole_protocol(cls: type[Engine]) -> None:
    assert all(callable(getattr(cls, m, None)) for m in MEMBERS)
    assert cls.footprint(1 << 30, Settings(kv_cache_space=1.0), "cpu", 16 << 30) >= 1 << 30


def test_engine_class_follows_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engines.engine_class("transformers") == (HFEngine, "asked for with --engine")
    assert engines.engine_class("vllm")[0] is VLLMEngine
    monkeypatch.setitem(sys.modules, "vllm", None)
    cls, why = engines.engine_class("auto")
    assert cls is HFEngine and "not installed" in why


def test_scheduling_policy_is_an_engine_setting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="--scheduling-policy"):
        Settings(scheduling_policy="lifo")  # type: ignore[arg-type]
    args, _ = parse_serve(*build_parser(), ["serve"], {"LLM_SERVICE_SCHEDULING_POLICY": "priority"})
    assert Settings.from_mapping(vars(args)).scheduling_policy == "priority"
    args, _ = parse_serve(*build_parser(), ["serve", "--scheduling-policy", "fcfs"], {"LLM_SERVICE_SCHEDULING_POLICY": "priority"})
    assert Settings.from_mapping(vars(args)).scheduling_policy == "fcfs"
    spec = ModelSpec.from_dict({"name": "m", "settings": {"scheduling_policy": "priority"}})
    assert spec.engine_settings(Settings()).scheduling_policy == "priority"
