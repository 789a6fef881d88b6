"""What the machine has: CPU, memory, GPUs, and the memory this process (with the engine
processes it started) uses. Read by `GET /v1/admin/system` and by the model registry, which
places models against the memory of the device they load onto."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import psutil


def gpus() -> list[dict[str, Any]]:
    """Each visible CUDA device's name and memory; empty without one. Asks NVML (which vLLM
    installs) where it can: unlike torch, it opens no CUDA context in this process, which would
    cost memory on every GPU and force vLLM to spawn rather than fork its workers."""
    try:
        import pynvml
    except ImportError:
        return _torch_gpus()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return _torch_gpus()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "total_bytes": int(memory.total), "used_bytes": int(memory.used), "free_bytes": int(memory.free)})
        return out
    finally:
        pynvml.nvmlShutdown()


def _torch_gpus() -> list[dict[str, Any]]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append({"index": i, "name": torch.cuda.get_device_name(i), "total_bytes": total,
                    "used_bytes": total - free, "free_bytes": free})
    return out


def device() -> str:
    """Where the engines put models: "cuda" when torch sees a GPU, else "cpu" (RAM)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (a core's SMT siblings count once, as
    its matrix units are shared): the threads a compute-bound engine should run."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology / "physical_package_id").read_text().strip() + ":" + (topology / "core_id").read_text().strip())
        except OSError:  # no topology to read (not Linux, or hidden): each CPU is a core
            cores.add(f"cpu{cpu}")
    return max(len(cores), 1)


def device_total_bytes(kind: str) -> int:
    if kind == "cuda":
        return sum(g["total_bytes"] for g in gpus())
    return psutil.virtual_memory().total


def used_bytes(kind: str) -> int:
    """Memory in use on `kind`: GPU memory device-wide, or on CPU the resident memory of this
    process and its children (vLLM's engine runs in a child)."""
    if kind == "cuda":
        return sum(g["used_bytes"] for g in gpus())
    me = psutil.Process(os.getpid())
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # ended meanwhile
            continue
    return total


def snapshot() -> dict[str, Any]:
    """CPU, memory and GPUs now (for the admin API)."""
    memory = psutil.virtual_memory()
    return {
        "cpu": {"count": os.cpu_count(), "load_average": list(os.getloadavg()),
                "percent": psutil.cpu_percent(interval=0.2)},
        "memory": {"total_bytes": memory.total, "available_bytes": memory.available,
                   "server_bytes": used_bytes("cpu")},
        "gpus": gpus(),
    }
