"""`HFEngine`: the Transformers engine behind the `Engine` protocol. `start` loads the model with
our attention and starts the model thread (`scheduler.Core`); `generate` checks a request,
compiles its grammar, submits its sequence and turns the tokens the thread posts into
`TokenEvent`s (`text.Text` makes the text, on the event loop). With `--enable-prefix-caching`
(the default) prompts reuse the KV of cached prefixes (`prefix.PrefixCache`), partitioned by
`cache_salt`; the first event says how many prompt tokens came from it (`cached_tokens`).
Requests that ask for `prompt_logprobs` skip the lookup, as in vLLM: they need every prompt
position computed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import xgrammar as xgr

from server import system
from server.config import Settings
from server.engines.base import (
    Constraint,
    EngineInfo,
    FinishReason,
    SamplingSpec,
    TokenEvent,
    TokenLogprobs,
)
from server.engines.hf import grammar
from server.engines.hf.attention import ATTENTION, attend
from server.engines.hf.cache import KVCache
from server.engines.hf.sampler import bad_words_ids
from server.engines.hf.scheduler import Core
from server.engines.hf.sequence import Output, Seq
from server.engines.hf.text import Text, special_ids
from server.errors import EngineError, InvalidRequest, ServiceUnavailable
from server.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GiB = 1 << 30
DEFAULT_MAX_NUM_SEQS = 32
# prompt tokens prefilled in one step: bounds how long running streams pause for newcomers
DEFAULT_PREFILL_TOKENS = 1024
CPU_KV_CACHE_DEFAULT_GIB = 4.0


def _device(torch: Any) -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _dtype(torch: Any, setting: str, config: Any, device: str) -> Any:
    if setting != "auto":
        return getattr(torch, setting)
    configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if configured in (torch.bfloat16, torch.float16, torch.float32):
        if device == "cpu" and configured == torch.float16:
            return torch.float32  # CPUs have no fast float16 matmuls
        return configured
    return torch.float32 if device == "cpu" else torch.float16


def _kv_budget_bytes(settings: Settings, device: str, total: int, used: int) -> int:
    """The KV cache this engine allocates at most: --kv-cache-space; else --gpu-memory-utilization
    of the device less what is `used` (on a GPU: by everything, on CPU: by the weights); else 80%
    of a GPU's free memory, or on CPU the smaller of 4 GiB and a quarter of RAM."""
    if settings.kv_cache_space is not None:
        return int(settings.kv_cache_space * GiB)
    if settings.gpu_memory_utilization is not None:
        return max(int(settings.gpu_memory_utilization * total) - used, 0)
    if device == "cuda":
        return int((total - used) * 0.8)
    return int(min(CPU_KV_CACHE_DEFAULT_GIB * GiB, total / 4))


# beyond weights and KV cache: activations of a step, logits, torch's allocator slack
ENGINE_OVERHEAD = GiB // 4


def _place_threads(torch: Any, settings: Settings) -> None:
    """torch's threads on CPU (--cpu-placement): one per physical core this process may run on,
    unless OMP_NUM_THREADS (which torch reads itself) or `default` (torch's own count) says otherwise."""
    if "OMP_NUM_THREADS" in os.environ:
        log.info("CPU placement: %d torch threads (OMP_NUM_THREADS)", torch.get_num_threads())
    elif settings.cpu_placement == "default":
        log.info("CPU placement: %d torch threads (torch's own count; --cpu-placement default)", torch.get_num_threads())
    else:
        torch.set_num_threads(system.physical_cores())
        log.info("CPU placement: %d torch threads, one per physical core this process may use "
                 "(--cpu-placement default for torch's own count)", torch.get_num_threads())


class HFEngine:
    def __init__(self, core: Core, tokenizer: Tokenizer, info: EngineInfo, compiler: xgr.GrammarCompiler) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self.info = info
        self.compiler = compiler  # xgrammar's GrammarCompiler, for the model's vocabulary
        self.skip_ids, self.spaced_ids = special_ids(tokenizer)
        self._queues: dict[str, asyncio.Queue[Output | BaseException]] = {}

    @staticmethod
    def footprint(weights: int, settings: Settings, device: str, total: int) -> int:
        """Memory this engine will hold for a model with `weights` bytes on a device of `total`
        (on a GPU without a set KV size that is most of what is free, so such a model fills the device)."""
        return weights + _kv_budget_bytes(settings, device, total, weights) + ENGINE_OVERHEAD

    def attach_to_loop(self) -> None:
        """Nothing to do: each request's queue is made on the loop it is generated on."""

    @classmethod
    def start(cls, model_path: Path, settings: Settings, tokenizer: Tokenizer) -> HFEngine:
        """Load the model and start the engine thread (blocking)."""
        import torch
        from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
        from transformers.masking_utils import AttentionMaskInterface

        if settings.tensor_parallel_size != 1 or settings.pipeline_parallel_size != 1 or settings.distributed_executor_backend:
            raise ValueError("--tensor-parallel-size, --pipeline-parallel-size and --distributed-executor-backend need the vLLM engine")
        if settings.speculative is not None:
            raise ValueError("--speculative needs the vLLM engine: the transformers engine decodes one token per step")
        config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=settings.trust_remote_code)
        device = _device(torch)
        if device == "cpu":
            _place_threads(torch, settings)
        dtype = _dtype(torch, settings.dtype, config, device)
        text = config.get_text_config()
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        AttentionInterface.register(ATTENTION, attend)
        # our attention builds its own masks: the model must not build 4D ones
        AttentionMaskInterface.register(ATTENTION, lambda *args, **kwargs: None)
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=dtype, attn_implementation=ATTENTION,
            trust_remote_code=settings.trust_remote_code,
        )
        model = model.to(device).eval()
        if model.get_output_embeddings() is None:
            raise ValueError(f"the transformers engine cannot drive {type(model).__name__}: it has no LM head")
        limit = int(getattr(text, "max_position_embeddings", 0) or 2048)
        max_model_len = settings.max_model_len or limit
        if max_model_len > limit:
            raise ValueError(f"--max-model-len {max_model_len} is longer than the model's {limit} positions")
        if getattr(text, "attn_logit_softcapping", None):
            raise ValueError("the transformers engine has no soft-capped attention (Gemma 2); use --engine vllm")
        window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
        if window and window < max_model_len:
            raise ValueError(
                f"this model attends over a sliding window of {window} tokens, which the transformers "
                f"engine does not implement: pass --max-model-len {window} (or less), or use --engine vllm"
            )
        cache = KVCache(torch, text.num_hidden_layers, kv_heads, head_dim, dtype, device, max_model_len)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if device == "cuda":
            free, total = torch.cuda.mem_get_info()
            used = total - free
        else:
            total, used = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), weights
        budget = _kv_budget_bytes(settings, device, total, used)
        budget_tokens = budget // cache.bytes_per_token
        if budget_tokens < 16:
            raise ValueError(f"the KV cache budget ({budget / GiB:.2f} GiB) holds no sequence; raise --kv-cache-space")
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if tokenizer.hf.eos_token_id is not None:
            eos_ids.add(int(tokenizer.hf.eos_token_id))
        # the logits' width, which may pad the tokenizer's vocabulary (vLLM's get_vocab_size)
        logits_vocab = int(getattr(text, "vocab_size", 0) or len(tokenizer.hf))
        compiler = grammar.compiler(tokenizer.hf, logits_vocab)
        core = Core(
            model, cache, torch,
            max_seqs=settings.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
            budget_tokens=budget_tokens,
            prefill_tokens=settings.max_num_batched_tokens or DEFAULT_PREFILL_TOKENS,
            max_model_len=max_model_len,
            eos_ids=frozenset(eos_ids),
            vocab=min(len(tokenizer.hf), logits_vocab),
            seed=settings.seed,
            grammar_vocab=logits_vocab,
            prefix_caching=settings.enable_prefix_caching,
        )
        log.info(
            "transformers engine: %s %s on %s, KV budget %.2f GiB (%d tokens, %d bytes each), "
            "up to %d sequences, prefix caching %s", type(model).__name__, str(dtype).removeprefix("torch."),
            device, budget / GiB, budget_tokens, cache.bytes_per_token, core.max_seqs,
            "on" if core.prefix is not None else "off",
        )
        core.thread.start()
        return cls(core, tokenizer, EngineInfo(name="transformers", max_model_len=max_model_len,
                                               max_num_seqs=core.max_seqs), compiler)

    async def generate(
        self, prompt_token_ids: list[int], spec: SamplingSpec, request_id: str
    ) -> AsyncIterator[TokenEvent]:
        torch = self.core.torch
        core = self.core
        if core.error is not None or not core.thread.is_alive():
            raise ServiceUnavailable("The inference engine has stopped; the server must be restarted.")
        need = min(len(prompt_token_ids) + spec.max_tokens, core.max_model_len)
        if need > core.budget_tokens:
            raise InvalidRequest(
                f"This request may need {need} tokens of KV cache (prompt + max_tokens), more than the "
                f"engine's whole budget of {core.budget_tokens} tokens. Lower max_tokens, or start the "
                "server with a larger --kv-cache-space.",
                param="max_tokens",
            )
        self._check_token_ids(spec)
        bad_words = bad_words_ids(lambda w: list(self.tokenizer.hf.encode(w, add_special_tokens=False)),
                                  spec.bad_words, core.vocab) if spec.bad_words else ()
        matcher = await self._matcher(spec.constraint, spec.stop_token_ids) if spec.constraint is not None else None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output | BaseException] = asyncio.Queue()

        def deliver(item: Output | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
                pass

        generator = torch.Generator(device="cpu").manual_seed(spec.seed) if spec.seed is not None else None
        seq = Seq(request_id, list(prompt_token_ids), spec, deliver, generator, need, bad_words, matcher)
        text = Text(self.tokenizer, spec, self.skip_ids, self.spaced_ids)
        finished = False
        core.submit(seq)
        try:
            count = 0
            while not finished:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                pieces: list[str] = []
                ids: list[int] = []
                lps: list[TokenLogprobs] = []
                prompt_lps = None
                cached = None
                reason: FinishReason | None = None
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    count += 1
                    ids.append(item.token_id)
                    if item.logprobs is not None:
                        lps.append(item.logprobs)
                    if item.prompt_logprobs is not None:
                        prompt_lps = item.prompt_logprobs
                    if item.cached_tokens is not None:
                        cached = item.cached_tokens
                    # stop strings count from the token after min_tokens on, as in vLLM
                    piece, stopped = text.feed(item.token_id, check_stop=count > spec.min_tokens,
                                               ends=item.finish_reason == "stop")
                    pieces.append(piece)
                    if stopped:
                        reason = "stop"
                        break
                    if item.finish_reason is not None:
                        reason = item.finish_reason
                        pieces.append(text.flush())
                        break
                finished = reason is not None
                yield TokenEvent(
                    text="".join(pieces),
                    token_ids=tuple(ids),
                    logprobs=tuple(lps) if spec.logprobs is not None else None,
                    finish_reason=reason,
                    prompt_logprobs=prompt_lps,
                    cached_tokens=cached,
                )
        finally:
            if not seq.done:
                core.cancel(request_id)

    async def _matcher(self, constraint: Constraint, stop_token_ids: tuple[int, ...]) -> xgr.GrammarMatcher:
        """A fresh matcher for this sequence's grammar, compiled off the event loop (the compiler
        caches: the other sequences of an `n` > 1 request reuse the first one's grammar)."""
        try:
            compiled = await asyncio.to_thread(grammar.compile_constraint, self.compiler, constraint)
        except (RuntimeError, ValueError, KeyError) as e:  # what xgrammar raises for what it cannot compile
            raise InvalidRequest(f"The {constraint.kind} constraint does not compile: {e}") from e
        return grammar.matcher(compiled, self.core.eos_ids | frozenset(stop_token_ids))

    def _check_token_ids(self, spec: SamplingSpec) -> None:
        """Token ids a request names must index the logits (vLLM refuses the others alike)."""
        vocab = self.core.vocab
        named = (("stop_token_ids", spec.stop_token_ids), ("logit_bias", tuple(t for t, _ in spec.logit_bias)),
                 ("allowed_token_ids", spec.allowed_token_ids or ()))
        for param, ids in named:
            invalid = [t for t in ids if not 0 <= t < vocab]
            if invalid:
                raise InvalidRequest(f"token_id(s) {invalid} in {param} contain out-of-vocab token ids. "
                                     f"Vocabulary size: {vocab}", param=param)
        if spec.allowed_token_ids is not None and not spec.allowed_token_ids:
            raise InvalidRequest("allowed_token_ids is not None and empty!", param="allowed_token_ids")

    async def abort(self, request_id: str) -> None:
        self.core.cancel(request_id)

    async def check_health(self) -> None:
        if self.core.error is not None or not self.core.thread.is_alive():
            raise EngineError(f"the transformers engine thread stopped: {self.core.error!r}")

    async def num_active_requests(self) -> int:
        return self.core.active

    def kv_cache_usage(self) -> float:
        """Fraction of the KV budget allocated right now to running sequences (cached prefix blocks
        are not counted: they are given back on demand, and vLLM counts them as free too)."""
        cache = self.core.cache
        return cache.rows * cache.positions / self.core.budget_tokens

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.core.stop)

