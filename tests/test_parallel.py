"""Model parallelism on vLLM's CPU build, run for real: the default model served by two pipeline
stages and by three tensor-parallel ranks (its 9 attention heads and 3 KV heads divide by 3, not
by 2), each worker a process of vLLM's `mp` executor. Each answers through the SDK and stops
cleanly, with no worker left behind. Ray is refused at start, before vLLM starts, with our reason.
The choice of cores (`cpu_binding`) is a pure function, tested over made-up machines."""

from __future__ import annotations

import importlib.util
import signal
import time

import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam

from server.config import Settings, SettingsError
from server.engines.vllm_engine import RESERVE_FROM_CORES, cpu_binding, cpu_placement
from tests.conftest import MODEL
from tests.server_process import ServerProcess

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")

FRANCE: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
POEM: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write a short poem about the sea."}]
# small and eager: each server starts in ~30 s (TP 3: ~75 s, three ranks on two cores)
SMALL = ("--engine", "vllm", "--enforce-eager", "--distributed-executor-backend", "mp", "--kv-cache-space", "0.25",
         "--max-model-len", "1024")


def _greedy(base_url: str, messages: list[ChatCompletionMessageParam], max_tokens: int) -> str:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    answer = client.chat.completions.create(model=MODEL, messages=messages,
                                            max_tokens=max_tokens, temperature=0)
    return answer.choices[0].message.content or ""


def _stop_cleanly(proc: ServerProcess) -> None:
    """SIGTERM to the server alone, as a supervisor sends it: exit 0, and every process it started
    (vLLM's engine core, each rank's worker) gone."""
    children = psutil.Process(proc.proc.pid).children(recursive=True)
    assert len(children) >= 3  # the engine core and at least two workers
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait_exit(60) == 0
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left behind: {[p.pid for p in alive]}"


# the shared vLLM server (one worker, tests/conftest.py) gives the reference answers
one_worker = pytest.mark.parametrize("server", ["vllm"], indirect=True)


@needs_vllm
@one_worker
def test_pipeline_parallel_2_answers_as_one_worker_does_and_stops_cleanly(server: ServerProcess) -> None:
    proc = ServerProcess(*SMALL, "--pipeline-parallel-size", "2", name="parallel-pp2")
    try:
        proc.wait_ready()
        # the same layers in the same order, split over two processes: the same greedy answers
        france = _greedy(proc.base_url, FRANCE, 12)
        assert "Paris" in france
        assert france == _greedy(server.base_url, FRANCE, 12)
        assert _greedy(proc.base_url, POEM, 48) == _greedy(server.base_url, POEM, 48)
        assert "CPU placement: 2 worker(s) bound to cores" in proc.log_text()
        _stop_cleanly(proc)
    finally:
        proc.stop()


@needs_vllm
@one_worker
def test_tensor_parallel_3_answers_and_stops_cleanly(server: ServerProcess) -> None:
    proc = ServerProcess(*SMALL, "--tensor-parallel-size", "3", name="parallel-tp3")
    try:
        proc.wait_ready()
        # each rank sums a third of every projection: the order of additions differs, so long
        # answers may part ways after some tokens (measured: after ~30); a short one does not
        assert _greedy(proc.base_url, FRANCE, 12) == _greedy(server.base_url, FRANCE, 12)
        _stop_cleanly(proc)
    finally:
        proc.stop()


@needs_vllm
def test_ray_on_cpu_is_refused_at_start_with_the_reason() -> None:
    started = time.monotonic()
    proc = ServerProcess("--engine", "vllm", "--distributed-executor-backend", "ray", name="parallel-ray")
    try:
        assert proc.wait_exit(120) == 1
        log = proc.log_text()
        assert ("could not serve smollm2-135m-instruct: --distributed-executor-backend: ray needs GPUs: vLLM's CPU "
                "build cannot run its workers on Ray") in log
        assert "use mp" in log
        assert "Loading weights" not in log and "EngineCore" not in log  # vLLM never started
        assert time.monotonic() - started < 60
    finally:
        proc.stop()


def test_an_unknown_executor_names_the_flag() -> None:
    with pytest.raises(SettingsError, match="--distributed-executor-backend: must be one of mp, ray"):
        Settings(distributed_executor_backend="slurm")


# --------------------------------------------------------------------------- the cores each worker gets

def _machine(nodes: int, cores: int, threads: int = 1) -> list[tuple[int, int, int]]:
    """(logical cpu, physical core, NUMA node) as Linux numbers them: siblings after all cores."""
    total = nodes * cores
    return [(t * total + n * cores + c, n * cores + c, n) for t in range(threads) for n in range(nodes)
            for c in range(cores)]


def test_a_small_box_gives_its_one_worker_every_core() -> None:
    assert cpu_binding(_machine(1, 2), 1) == "0,1"  # vLLM's own: core 0 (core 1 kept for its front end)
    assert cpu_binding(_machine(1, 4, threads=2), 1) == "4,5,6,7"  # one thread per core, the last sibling


def test_workers_share_out_a_node_vllm_would_refuse() -> None:
    # vLLM's own binding wants a NUMA node per worker: on one node it refuses to start
    assert cpu_binding(_machine(1, 2), 2) == "0|1"
    assert cpu_binding(_machine(1, 2), 3) == "0|1|0"  # more workers than cores: they share
    assert cpu_binding(_machine(1, 5), 2) == "0,1,2|3,4"


def test_big_boxes_keep_a_core_per_worker_for_the_front_end() -> None:
    assert cpu_binding(_machine(2, RESERVE_FROM_CORES), 2) is None  # vLLM's own: a node each, less a core
    assert cpu_binding(_machine(2, 4), 2) == "0,1,2,3|4,5,6,7"  # small nodes: a whole node each
    split = cpu_binding(_machine(1, 2 * RESERVE_FROM_CORES), 2)
    assert split == "0,1,2,3,4,5,6|8,9,10,11,12,13,14"  # one node split in two, a core each kept


@needs_vllm
def test_the_environment_and_the_flag_win_over_our_placement() -> None:
    assert cpu_placement(Settings(), {"VLLM_CPU_OMP_THREADS_BIND": "0"}) == {}
    assert cpu_placement(Settings(), {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}) == {}
    assert cpu_placement(Settings(cpu_placement="default"), {}) == {}
    assert "VLLM_CPU_OMP_THREADS_BIND" in cpu_placement(Settings(pipeline_parallel_size=2), {})

