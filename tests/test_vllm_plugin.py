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


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")
def test_a_later_pipeline_stage_gets_its_input_buffer_in_eager_mode() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from server.engines import vllm_plugin

    vllm_plugin.register()
    vllm_plugin.register()
    gather = CPUModelRunner.sync_and_gather_intermediate_tensors
    assert getattr(gather, "llm_service", False)

    class Model:
        def make_empty_intermediate_tensors(self, batch_size: int, dtype: object, device: object) -> dict[str, list[int]]:
            return {"hidden_states": [0] * batch_size}

    class ModelConfig:
        dtype = "bfloat16"

    runner = CPUModelRunner.__new__(CPUModelRunner)  # what the skipped warm-up left: no buffer
    runner.intermediate_tensors = None
    runner.model, runner.model_config, runner.max_num_tokens, runner.device = Model(), ModelConfig(), 8, "cpu"
    gathered = gather(runner, 4, None, False)  # vLLM's own gathering, on the buffer now there
    assert runner.intermediate_tensors == {"hidden_states": [0] * 8}
    assert gathered["hidden_states"] == [0] * 4
