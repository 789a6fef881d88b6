"""The vLLM plugin that keeps vLLM's CPU attention off its AMX kernel (wrong answers in bfloat16,
server/engines/vllm_plugin.py) is registered where vLLM looks for it, and does its one thing.
The conformance suite's answers ("Paris") are what show the bug gone on an AMX machine."""

from __future__ import annotations

import importlib.util
from importlib.metadata import entry_points

import pytest


def test_the_plugin_is_where_vllm_looks() -> None:
    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert found.get("llm_service_cpu_attention") == "server.engines.vllm_plugin:register"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")
def test_bfloat16_attention_never_picks_the_amx_kernel() -> None:
    import torch
    from vllm.v1.attention.backends import cpu_attn

    from server.engines import vllm_plugin

    vllm_plugin.register()
    vllm_plugin.register()  # vLLM may load plugins more than once: it wraps once
    assert getattr(cpu_attn._get_attn_isa, "llm_service", False)
    assert cpu_attn._get_attn_isa(torch.bfloat16, 32, 64) != "amx"
    assert cpu_attn._get_attn_isa(torch.float32, 32, 64) == "vec"  # other choices are vLLM's own
