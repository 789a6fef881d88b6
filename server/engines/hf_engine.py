"""The Transformers engine: continuous batching over a plain transformers model, for machines
where vLLM does not run (macOS, Windows, ARM, CPUs without AVX-512, ...).

Why our own scheduler rather than transformers' `ContinuousBatchingManager` (5.19): on this CPU
it generated 38-45 output tok/s for 16 concurrent 128-token answers (`generate_batch`, sdpa or
paged attention), and its sampling is one setting for the whole batch: `do_sample` is global (no
greedy and sampled requests side by side), and it has no per-request seed, top_logprobs, min_p or
penalties, which the API promises. What we keep from transformers is the model: its modules and
weights run unchanged; we only plug in an attention function (`AttentionInterface`) that reads
and writes our KV cache, the same seam transformers' own paged attention uses.

Shape of the engine:
- One thread (`_Core._run`) owns the model and the cache. Each turn it takes new and cancelled
  requests, admits waiting ones that fit (`# admit`), prefills them in one batch (`# prefill`),
  then runs one decode step for every running sequence (`# decode`) and posts each sequence's
  new token to its asyncio queue. Requests join and leave between steps.
- The KV cache is one tensor per layer, rows x heads x positions x head_dim. Running sequences
  hold rows 0..n-1 (a leaving sequence's row is refilled by the last one), so a decode step
  reads one contiguous block; rows and positions grow on demand. A request is admitted only if
  the cache can hold every admitted sequence at its longest (prompt + max_tokens), within the
  KV budget (`--kv-cache-space`); the rest wait in the queue, nothing is evicted mid-answer.
- Sampling is per row (temperature, top_p, top_k, min_p, penalties, min_tokens, allowed_token_ids,
  bad_words, logit_bias, its own seeded generator), in vLLM's order and with its rules; logprobs
  are of the model's raw distribution, as vLLM reports them. Waiting requests are admitted by
  `priority` (lower first), then arrival.
- Text (whole characters, stop strings held back until they can no longer match) is assembled
  on the event loop in `generate`, so the model thread does nothing but tensors.
- `cache_salt` is accepted and has no effect: this engine has no prefix cache to partition.
"""

from __future__ import annotations

import asyncio
import bisect
import codecs
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.config import Settings
from server.engines.base import EngineInfo, FinishReason, SamplingSpec, TokenEvent, TokenLogprobs
from server.errors import EngineError, InvalidRequest, ServiceUnavailable
from server.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GiB = 1 << 30
ATTENTION = "llm_service"  # the name our attention function is registered under
DEFAULT_MAX_NUM_SEQS = 32
# prompt tokens prefilled in one step: bounds how long running streams pause for newcomers
DEFAULT_PREFILL_TOKENS = 1024
CPU_KV_CACHE_DEFAULT_GIB = 4.0
# most token sequences the bad words of one request may become (vLLM's VLLM_MAX_NUM_BAD_WORDS)
MAX_BAD_WORDS = 128


# --------------------------------------------------------------------------- attention + cache


@dataclass
class _Step:
    """What the attention function needs to know about the forward pass in progress."""

    prefill: bool
    row0: int  # first cache row of this batch (rows are contiguous)
    positions: Any = None  # decode: tensor [rows], where each row's new token goes
    valid: Any = None  # decode: bool tensor [rows, 1, 1, T], keys each row may attend to
    span: int = 0  # decode: positions to read (longest row + 1)


class _KVCache:
    """Per-layer K and V tensors [rows, kv_heads, positions, head_dim], grown on demand."""

    def __init__(self, torch: Any, layers: int, kv_heads: int, head_dim: int, dtype: Any, device: Any,
                 max_positions: int) -> None:
        self.torch = torch
        self.max_positions = max_positions
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.k: list[Any] = []
        self.v: list[Any] = []
        self.rows = 0
        self.positions = 0
        self.step: _Step | None = None  # the forward pass in progress

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.torch.finfo(self.dtype).bits // 8

    def reserve(self, rows: int, positions: int, max_rows: int, budget_tokens: int) -> None:
        """Make room for `rows` x `positions`, with slack to copy less often, within the budget.

        Admission guarantees rows x positions <= budget_tokens, so the exact fit always exists.
        """
        if rows <= self.rows and positions <= self.positions:
            return
        grow_rows = min(max(rows, 2 * self.rows, 4), max_rows)
        grow_pos = self.positions
        if positions > self.positions:
            grow_pos = min(self.positions + max(256, self.positions // 4), self.max_positions)
        new_rows = max(rows, min(grow_rows, budget_tokens // positions))
        new_pos = max(positions, min(grow_pos, budget_tokens // new_rows))
        keep_rows, keep_pos = min(self.rows, new_rows), min(self.positions, new_pos)
        shape = (new_rows, self.kv_heads, new_pos, self.head_dim)
        for store in (self.k, self.v):
            for i in range(self.layers):
                # zeros, not empty: masked-out positions are multiplied by 0, and 0 * NaN is NaN
                fresh = self.torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    fresh[:keep_rows, :, :keep_pos] = store[i][:keep_rows, :, :keep_pos]
                    store[i] = fresh
                else:
                    store.append(fresh)
        self.rows, self.positions = new_rows, new_pos

    def move_row(self, src: int, dst: int, length: int) -> None:
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]

    def release(self) -> None:
        self.k, self.v = [], []
        self.rows = self.positions = 0


def _attend(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
            dropout: float = 0.0, kv_cache: _KVCache | None = None, softcap: float | None = None,
            sliding_window: int | None = None, **_: Any) -> tuple[Any, None]:
    """Attention over our KV cache, with the signature transformers' models call attention with.
    The engine passes its cache as the `kv_cache` keyword of the model's forward."""
    if kv_cache is None or kv_cache.step is None:
        raise RuntimeError(f"the {ATTENTION!r} attention only runs inside the transformers engine")
    torch, step = kv_cache.torch, kv_cache.step
    if softcap is not None or (sliding_window is not None and sliding_window < kv_cache.max_positions):
        # refused at start (HFEngine.start); this guards models whose config hides it
        raise NotImplementedError("the transformers engine has no sliding-window or soft-capped attention")
    K, V = kv_cache.k[module.layer_idx], kv_cache.v[module.layer_idx]
    rows, heads, q_len, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    lo, hi = step.row0, step.row0 + rows
    if step.prefill:  # prompts start at position 0: causal attention over the new keys only
        K[lo:hi, :, :q_len] = key
        V[lo:hi, :, :q_len] = value
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=heads != key.shape[1])
        return out.transpose(1, 2), None
    # decode: one query per row; each row attends to its own positions [0, length]. Plain
    # matmuls: on CPU they beat SDPA's kernel for one query per row (161 vs 145 tok/s, 16 rows).
    idx = torch.arange(lo, hi, device=K.device)
    K[idx, :, step.positions] = key[:, :, 0]
    V[idx, :, step.positions] = value[:, :, 0]
    keys, values = K[lo:hi, :, : step.span], V[lo:hi, :, : step.span]
    kv_heads = keys.shape[1]
    # grouped-query: [rows, kv_heads, group, dim] x [rows, kv_heads, dim, T]
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~step.valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values).reshape(rows, heads, 1, dim)
    return out.transpose(1, 2), None


# --------------------------------------------------------------------------- sequences


@dataclass
class _Output:
    token_id: int
    logprobs: TokenLogprobs | None
    finish_reason: FinishReason | None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    spec: SamplingSpec
    deliver: Callable[[_Output | BaseException], None]
    generator: Any
    need: int  # positions this sequence may come to hold: prompt + max_tokens
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences, see _bad_words_ids
    order: tuple[int, int] = (0, 0)  # (priority, arrival): the waiting queue's order
    output: list[int] = field(default_factory=list)
    length: int = 0  # positions in the cache
    done: bool = False

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]


class _Core:
    """The model thread: admission, prefill, decode, sampling. Only `_run` touches tensors."""

    def __init__(self, model: Any, cache: _KVCache, torch: Any, *, max_seqs: int, budget_tokens: int,
                 prefill_tokens: int, max_model_len: int, eos_ids: frozenset[int], vocab: int, seed: int) -> None:
        self.cache, self.torch = cache, torch
        self.decoder, self.lm_head = model.get_decoder(), model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2's final logits
        self.max_seqs, self.budget_tokens, self.prefill_tokens = max_seqs, budget_tokens, prefill_tokens
        self.max_model_len = max_model_len
        self.eos_ids = eos_ids
        self.vocab = vocab
        self.rng = torch.Generator(device="cpu").manual_seed(seed)
        self.device = cache.device
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.inbox: list[_Seq] = []
        self.cancelled: set[str] = set()
        self.waiting: list[_Seq] = []  # sorted by (priority, arrival)
        self.arrivals = 0
        self.running: list[_Seq] = []
        self.active = 0  # waiting + running, readable from any thread
        self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="hf-engine", daemon=True)

    # ---- called from the event loop

    def submit(self, seq: _Seq) -> None:
        with self.lock:
            seq.order = (seq.spec.priority, self.arrivals)
            self.arrivals += 1
            self.inbox.append(seq)
            self.active += 1
        self.wake.set()

    def cancel(self, request_id: str) -> None:
        with self.lock:
            self.cancelled.add(request_id)
        self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join()

    # ---- the model thread

    def _run(self) -> None:
        torch = self.torch
        try:
            with torch.inference_mode():
                while not self.stopping:
                    self._take_inbox()
                    if not self.running and not self.waiting:
                        self.cache.release()
                        self.wake.wait()
                        self.wake.clear()
                        continue
                    admitted: list[_Seq] = []
                    try:
                        admitted = self._admit()
                        if admitted:
                            self._prefill(admitted)
                        if self.running:
                            self._decode()
                    except Exception as e:  # a failed step fails its sequences, not the server
                        failed = self.running + [s for s in admitted if s not in self.running]
                        log.exception("engine step failed; failing its %d requests", len(failed))
                        failure = EngineError(f"The inference engine failed on this request: {e}")
                        for seq in failed:
                            self._finish(seq, failure)
                        self.running.clear()
                        self.cache.release()
        except BaseException as e:  # the thread is gone: every request still here must hear it
            self.error = e
            log.exception("the transformers engine thread died")
        finally:
            reason = ServiceUnavailable("The inference engine has stopped; the server must be restarted.")
            with self.lock:
                left = self.inbox + list(self.waiting) + self.running
                self.inbox, self.running = [], []
                self.waiting.clear()
            for seq in left:
                self._finish(seq, reason)

    def _finish(self, seq: _Seq, outcome: _Output | BaseException | None = None) -> None:
        if not seq.done:
            seq.done = True
            with self.lock:
                self.active -= 1
        if outcome is not None:
            seq.deliver(outcome)

    def _take_inbox(self) -> None:
        with self.lock:
            new, self.inbox = self.inbox, []
            cancelled, self.cancelled = self.cancelled, set()
        for seq in new:
            bisect.insort(self.waiting, seq, key=lambda s: s.order)
        if not cancelled:
            return
        for seq in [s for s in self.waiting if s.request_id in cancelled]:
            self.waiting.remove(seq)
            self._finish(seq)
        for seq in [s for s in self.running if s.request_id in cancelled]:
            self._finish(seq)
        self._compact()

    def _compact(self) -> None:
        """Drop finished sequences; the last running row moves into each freed row."""
        row = 0
        while row < len(self.running):
            if self.running[row].done:
                last = self.running.pop()
                if row < len(self.running) and not last.done:
                    self.cache.move_row(len(self.running), row, last.length)
                    self.running[row] = last
                continue
            row += 1

    # admit
    def _admit(self) -> list[_Seq]:
        admitted: list[_Seq] = []
        longest = max((s.need for s in self.running), default=0)
        tokens = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_seqs:
            seq = self.waiting[0]
            rows = len(self.running) + len(admitted) + 1
            if rows * max(longest, seq.need) > self.budget_tokens:
                break  # waits until running sequences finish and free the cache
            if admitted and tokens + len(seq.prompt) > self.prefill_tokens:
                break
            self.waiting.pop(0)
            admitted.append(seq)
            longest = max(longest, seq.need)
            tokens += len(seq.prompt)
        return admitted

    # prefill
    def _prefill(self, seqs: list[_Seq]) -> None:
        torch = self.torch
        row0 = len(self.running)
        longest = max(len(s.prompt) for s in seqs)
        span = max([longest] + [s.length + 1 for s in self.running])
        self.cache.reserve(row0 + len(seqs), span, self.max_seqs, self.budget_tokens)
        ids = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s.prompt)] = torch.tensor(s.prompt)
        positions = torch.arange(longest).expand(len(seqs), longest)
        self.cache.step = _Step(prefill=True, row0=row0)
        hidden = self.decoder(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                              use_cache=False, kv_cache=self.cache).last_hidden_state
        lasts = torch.tensor([len(s.prompt) - 1 for s in seqs], device=self.device)
        logits = self._logits(hidden[torch.arange(len(seqs), device=self.device), lasts])
        for s in seqs:
            s.length = len(s.prompt)
            self.running.append(s)
        prompt_lps = {
            i: self._prompt_logprobs(s, hidden[i, : len(s.prompt) - 1])
            for i, s in enumerate(seqs)
            if s.spec.prompt_logprobs is not None
        }
        self._emit(seqs, logits, prompt_lps)

    # decode
    def _decode(self) -> None:
        torch = self.torch
        seqs = self.running
        positions = torch.tensor([s.length for s in seqs], device=self.device)
        span = int(positions.max()) + 1
        self.cache.reserve(len(seqs), span, self.max_seqs, self.budget_tokens)
        valid = torch.arange(span, device=self.device)[None, :] <= positions[:, None]
        self.cache.step = _Step(prefill=False, row0=0, positions=positions,
                                valid=valid[:, None, None, :], span=span)
        ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        hidden = self.decoder(input_ids=ids, position_ids=positions[:, None], use_cache=False,
                              kv_cache=self.cache).last_hidden_state
        for s in seqs:
            s.length += 1
        self._emit(list(seqs), self._logits(hidden[:, -1]))

    def _logits(self, hidden: Any) -> Any:
        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = self.torch.tanh(logits / self.softcap) * self.softcap
        return logits[:, : self.vocab]

    def _prompt_logprobs(self, seq: _Seq, hidden: Any) -> tuple[TokenLogprobs | None, ...]:
        k = seq.spec.prompt_logprobs or 0
        logprobs = self.torch.log_softmax(self._logits(hidden), dim=-1)
        targets = self.torch.tensor(seq.prompt[1:], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top = logprobs.topk(k, dim=-1) if k > 0 else None
        out: list[TokenLogprobs | None] = [None]
        for j, tid in enumerate(seq.prompt[1:]):
            alts = dict(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True)) if top is not None else {}
            out.append(TokenLogprobs(tid, chosen[j], alts))
        return tuple(out)

    def _emit(self, seqs: list[_Seq], logits: Any, prompt_lps: dict[int, tuple[TokenLogprobs | None, ...]] | None = None) -> None:
        """Sample one token per sequence, post it, retire finished sequences."""
        tokens, logprobs = self._sample(seqs, logits)
        for i, seq in enumerate(seqs):
            tid = tokens[i]
            seq.output.append(tid)
            reason: FinishReason | None = None
            # vLLM's order: EOS (unless ignore_eos), a stop token, then the length limits. Neither
            # kind of stop token is sampled before min_tokens: _constrain masks them.
            if (tid in self.eos_ids and not seq.spec.ignore_eos) or tid in seq.spec.stop_token_ids:
                reason = "stop"
            elif len(seq.output) >= seq.spec.max_tokens or len(seq.prompt) + len(seq.output) >= self.max_model_len:
                reason = "length"
            out = _Output(tid, logprobs[i], reason, (prompt_lps or {}).get(i))
            if reason is not None:
                self._finish(seq, out)
            else:
                seq.deliver(out)
        if any(s.done for s in self.running):
            self._compact()

    def _sample(self, seqs: list[_Seq], logits: Any) -> tuple[list[int], list[TokenLogprobs | None]]:
        torch = self.torch
        raw = torch.log_softmax(logits, dim=-1) if any(s.spec.logprobs is not None for s in seqs) else None
        scores = logits
        for i, seq in enumerate(seqs):
            spec = seq.spec
            penalized = spec.presence_penalty or spec.frequency_penalty or spec.repetition_penalty != 1.0
            if penalized or _constrains(seq):
                scores = scores.clone() if scores is logits else scores
                _constrain(torch, scores[i], seq, self.eos_ids)
                _penalize(torch, scores[i], seq, self.device)
        chosen = [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.spec.temperature == 0]
        if greedy:
            picks = scores[greedy].argmax(dim=-1).tolist()
            for i, t in zip(greedy, picks, strict=True):
                chosen[i] = t
        sampled = [i for i, s in enumerate(seqs) if s.spec.temperature != 0]
        if sampled:
            probs = _filtered_probs(torch, scores[sampled], [seqs[i].spec for i in sampled])
            # inverse-CDF sampling, one uniform draw per row from that row's generator: as exact
            # as torch.multinomial, which on CPU costs ~1 ms a row (it draws a number per token)
            cdf = probs.cumsum(dim=-1)
            draws = torch.cat([torch.rand(1, generator=seqs[i].generator or self.rng) for i in sampled])
            # right side: the first token whose cumulative mass exceeds the draw, never a zero-mass one
            picks = torch.searchsorted(cdf, (draws.to(cdf.device) * cdf[:, -1])[:, None], right=True)
            for j, i in enumerate(sampled):
                chosen[i] = min(int(picks[j, 0]), probs.shape[1] - 1)
        lps: list[TokenLogprobs | None] = [None] * len(seqs)
        if raw is not None:
            for i, seq in enumerate(seqs):
                k = seq.spec.logprobs
                if k is None:
                    continue
                top: dict[int, float] = {}
                if k > 0:
                    vals, idx = raw[i].topk(k)
                    top = dict(zip(idx.tolist(), vals.tolist(), strict=True))
                lps[i] = TokenLogprobs(chosen[i], float(raw[i, chosen[i]]), top)
        return chosen, lps


def _bad_words_ids(encode: Callable[[str], list[int]], words: tuple[str, ...], vocab: int) -> tuple[tuple[int, ...], ...]:
    """vLLM's token sequences for `bad_words` (SamplingParams.update_from_tokenizer): each word
    without leading spaces, and again after one space when that is another first token and as
    many tokens (a word mid-sentence). InvalidRequest as vLLM words it."""
    seqs: list[tuple[int, ...]] = []
    for word in dict.fromkeys(words):
        if not word:
            raise InvalidRequest(f"bad_words cannot contain an empty string. Got bad_words={list(words)}",
                                 param="bad_words")
        for prefix in ("", " "):
            ids = tuple(encode(prefix + word.lstrip()))
            if not ids:
                if not prefix:
                    raise InvalidRequest("bad_words entries must tokenize to at least one token.", param="bad_words")
                continue
            if not prefix or (ids[0] != seqs[-1][0] and len(ids) == len(seqs[-1])):
                seqs.append(ids)
    if len(seqs) > MAX_BAD_WORDS:
        raise InvalidRequest(f"Too many bad words after tokenization: {len(seqs)}. The max number is {MAX_BAD_WORDS}.",
                             param="bad_words")
    invalid = [t for ids in seqs for t in ids if not 0 <= t < vocab]
    if invalid:
        raise InvalidRequest(f"The model vocabulary size is {vocab}, but the following tokens were specified as "
                             f"bad: {invalid}.", param="bad_words")
    return tuple(seqs)


def _banned(bad_words: tuple[tuple[int, ...], ...], output: list[int]) -> list[int]:
    """vLLM's bad-words rule: a word's last token is banned when its other tokens end the answer
    so far (a one-token word always is); the prompt does not count."""
    banned = []
    for ids in bad_words:
        n = len(ids) - 1
        if n <= len(output) and (n == 0 or tuple(output[-n:]) == ids[:-1]):
            banned.append(ids[-1])
    return banned


def _constrains(seq: _Seq) -> bool:
    spec = seq.spec
    return (spec.allowed_token_ids is not None or bool(seq.bad_words) or bool(spec.logit_bias)
            or len(seq.output) < spec.min_tokens)


def _constrain(torch: Any, row: Any, seq: _Seq, eos_ids: frozenset[int]) -> None:
    """One row's logits before penalties, in vLLM's order: allowed_token_ids, bad_words, min_tokens
    (EOS and stop tokens, even with ignore_eos), logit_bias (clamped to +-100, as vLLM's server does)."""
    spec = seq.spec
    if spec.allowed_token_ids is not None:
        keep = torch.zeros(row.shape[0], dtype=torch.bool, device=row.device)
        keep[list(spec.allowed_token_ids)] = True
        row.masked_fill_(~keep, float("-inf"))
    if seq.bad_words and (banned := _banned(seq.bad_words, seq.output)):
        row[banned] = float("-inf")
    if len(seq.output) < spec.min_tokens and (stops := eos_ids | set(spec.stop_token_ids)):
        row[sorted(stops)] = float("-inf")
    if spec.logit_bias:
        bias = {tid: min(100.0, max(-100.0, b)) for tid, b in spec.logit_bias}
        row[list(bias)] += torch.tensor(list(bias.values()), dtype=row.dtype, device=row.device)


def _penalize(torch: Any, row: Any, seq: _Seq, device: Any) -> None:
    """OpenAI's presence/frequency penalties over the answer so far; vLLM's repetition penalty
    over prompt and answer (divide positive logits, multiply negative ones)."""
    spec = seq.spec
    if spec.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt) | set(seq.output)), device=device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / spec.repetition_penalty, vals * spec.repetition_penalty)
    if seq.output and (spec.presence_penalty or spec.frequency_penalty):
        counts = torch.bincount(torch.tensor(seq.output, device=device), minlength=row.shape[0])[: row.shape[0]]
        row -= counts.to(row.dtype) * spec.frequency_penalty + (counts > 0).to(row.dtype) * spec.presence_penalty


def _filtered_probs(torch: Any, scores: Any, specs: list[SamplingSpec]) -> Any:
    """Temperature, then top_k, top_p and min_p, row by row; returns probabilities."""
    temps = torch.tensor([s.temperature for s in specs], device=scores.device)[:, None]
    scores = scores / temps
    # Logits come from bf16 activations, so ties are common: cut by rank in a stable sort (the
    # lower id wins a tie, as in argmax), never by value, or top_k=1 could keep two tokens.
    if any(s.top_k > 0 for s in specs):
        for j, s in enumerate(specs):
            if 0 < s.top_k < scores.shape[1]:
                order = scores[j].sort(descending=True, stable=True).indices
                scores[j, order[s.top_k:]] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    if any(s.top_p < 1.0 for s in specs):
        for j, s in enumerate(specs):
            if s.top_p < 1.0:
                sorted_p, order = probs[j].sort(descending=True, stable=True)
                # keep the smallest prefix whose mass reaches top_p (always the top token)
                drop = (sorted_p.cumsum(0) - sorted_p) >= s.top_p
                probs[j, order[drop]] = 0.0
    if any(s.min_p > 0 for s in specs):
        for j, s in enumerate(specs):
            if s.min_p > 0:
                probs[j] = probs[j].masked_fill(probs[j] < s.min_p * probs[j].max(), 0.0)
    return probs


# --------------------------------------------------------------------------- text


class _Text:
    """Token ids -> text for one answer, the way vLLM's detokenizer makes it: whole characters only;
    special tokens left out (unless `skip_special_tokens` is off); the EOS or stop token that ended
    the answer left out (unless `include_stop_str_in_output`); a stop string cut off with what
    follows it (kept, with `include_stop_str_in_output`), and the tail that could still begin one
    held back until it cannot."""

    def __init__(self, tokenizer: Tokenizer, spec: SamplingSpec, skip_ids: frozenset[int],
                 spaced_ids: frozenset[int] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = spec.stop
        self.include_stop = spec.include_stop_str_in_output
        self.skip = skip_ids if spec.skip_special_tokens else frozenset()
        # slow tokenizers only (empty otherwise): vLLM's slow detokenizer sets added tokens apart
        # from their neighbours with spaces; its fast one (DecodeStream) gives their bare text
        self.spaced = spaced_ids if spec.spaces_between_special_tokens else frozenset()
        self.last_spaced: bool | None = None  # whether the last token with text was an added one
        self.hold = max(len(s) for s in self.stop) - 1 if self.stop and not self.include_stop else 0
        self.text = ""  # the answer so far
        self.sent = 0  # characters of it already returned

    def feed(self, token_id: int, check_stop: bool, ends: bool = False) -> tuple[str, bool]:
        """New text to send, and whether a stop string ended the answer. `ends`: this token is the
        EOS or stop token that ended the answer."""
        new = 0
        if not (ends and not self.include_stop) and token_id not in self.skip:
            piece = self.decoder.decode(self.tokenizer.token_bytes(token_id))
            if self.spaced:
                spaced = token_id in self.spaced
                if self.last_spaced is not None and (spaced or self.last_spaced):
                    piece = " " + piece
                self.last_spaced = spaced
            self.text += piece
            new = len(piece)
        if check_stop and self.stop and new:
            hit = _find_stop(self.text, new, self.stop)
            if hit is not None:
                start, end = hit
                self.text = self.text[: end if self.include_stop else start]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self.hold), False

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        text, self.sent = self.text[self.sent : upto], upto
        return text

    def flush(self) -> str:
        """The held-back text at the end. Bytes of a character the answer was cut off in the middle
        of are dropped, not sent as U+FFFD: they never were a character (vLLM does the same)."""
        self.decoder.reset()
        return self._take(len(self.text))


def _find_stop(text: str, new: int, stops: tuple[str, ...]) -> tuple[int, int] | None:
    """(start, end) of the stop string that ends within the last `new` characters of `text`,
    the earliest-ending one if several do (then the first listed), as vLLM's check_stop_strings."""
    best: tuple[int, int] | None = None
    for stop in stops:
        i = text.find(stop, max(len(text) - new - len(stop) + 1, 0))
        if i >= 0 and (best is None or i + len(stop) < best[1]):
            best = (i, i + len(stop))
    return best


def _special_ids(tokenizer: Tokenizer) -> tuple[frozenset[int], frozenset[int]]:
    """The tokens `skip_special_tokens` leaves out, and those `spaces_between_special_tokens` sets
    apart with spaces, as vLLM decides them. Fast tokenizers (vLLM's DecodeStream): the added
    tokens marked special, and none (DecodeStream gives an added token's bare text, as we always
    do). Slow ones: the tokenizer's special tokens, and every added token."""
    backend = getattr(tokenizer.hf, "backend_tokenizer", None)
    if backend is not None:
        added = backend.get_added_tokens_decoder()
        return frozenset(i for i, tok in added.items() if tok.special), frozenset()
    return frozenset(tokenizer.special_ids), frozenset(int(i) for i in tokenizer.hf.get_added_vocab().values())


# --------------------------------------------------------------------------- the engine


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


class HFEngine:
    def __init__(self, core: _Core, tokenizer: Tokenizer, info: EngineInfo) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self.info = info
        self.skip_ids, self.spaced_ids = _special_ids(tokenizer)
        self._queues: dict[str, asyncio.Queue[_Output | BaseException]] = {}

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
        config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=settings.trust_remote_code)
        device = _device(torch)
        dtype = _dtype(torch, settings.dtype, config, device)
        text = config.get_text_config()
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        AttentionInterface.register(ATTENTION, _attend)
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
        cache = _KVCache(torch, text.num_hidden_layers, kv_heads, head_dim, dtype, device, max_model_len)
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
        core = _Core(
            model, cache, torch,
            max_seqs=settings.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
            budget_tokens=budget_tokens,
            prefill_tokens=settings.max_num_batched_tokens or DEFAULT_PREFILL_TOKENS,
            max_model_len=max_model_len,
            eos_ids=frozenset(eos_ids),
            vocab=min(len(tokenizer.hf), int(getattr(text, "vocab_size", 0) or len(tokenizer.hf))),
            seed=settings.seed,
        )
        log.info(
            "transformers engine: %s %s on %s, KV budget %.2f GiB (%d tokens, %d bytes each), "
            "up to %d sequences", type(model).__name__, str(dtype).removeprefix("torch."), device,
            budget / GiB, budget_tokens, cache.bytes_per_token, core.max_seqs,
        )
        core.thread.start()
        return cls(core, tokenizer, EngineInfo(name="transformers", max_model_len=max_model_len,
                                               max_num_seqs=core.max_seqs))

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
        bad_words = _bad_words_ids(lambda w: list(self.tokenizer.hf.encode(w, add_special_tokens=False)),
                                   spec.bad_words, core.vocab) if spec.bad_words else ()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Output | BaseException] = asyncio.Queue()

        def deliver(item: _Output | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
                pass

        generator = torch.Generator(device="cpu").manual_seed(spec.seed) if spec.seed is not None else None
        seq = _Seq(request_id, list(prompt_token_ids), spec, deliver, generator, need, bad_words)
        text = _Text(self.tokenizer, spec, self.skip_ids, self.spaced_ids)
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
                )
        finally:
            if not seq.done:
                core.cancel(request_id)

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
        """Fraction of the KV budget allocated right now."""
        cache = self.core.cache
        return cache.rows * cache.positions / self.core.budget_tokens

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.core.stop)

