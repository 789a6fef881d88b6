"""The model thread: admission, prefill, decode, and posting each new token.

Each turn `Core._run` takes new and cancelled requests, admits waiting ones that fit (`# admit`),
prefills them in one batch (`# prefill`), then runs one decode step for every running sequence
(`# decode`) and posts each sequence's new token to its asyncio queue. Requests join and leave
between steps. Waiting requests are admitted by `priority` (lower first), then arrival.

A request is admitted only if the cache can hold every admitted sequence at its longest
(prompt + max_tokens), within the KV budget; the rest wait in the queue, nothing is evicted
mid-answer. Cached prefix blocks (`prefix.PrefixCache`) never hold anyone back: they take what
the running rows leave of the budget, and are evicted before the rows grow (`_reserve`).

With the prefix cache, a prompt's longest cached block-aligned prefix is copied into its row
before the prefill, which computes only the rest (at least its last token, for the logits); the
blocks of each prompt are cached once it is prefilled, and those of its answer when it leaves.
"""

from __future__ import annotations

import bisect
import logging
import threading
from typing import Any

from server.engines.base import FinishReason, TokenLogprobs
from server.engines.hf.cache import KVCache, Step
from server.engines.hf.prefix import BLOCK, PrefixCache, chain
from server.engines.hf.sampler import Sampler
from server.engines.hf.sequence import Output, Seq
from server.errors import EngineError, ServiceUnavailable

log = logging.getLogger(__name__)


class Core:
    """The model thread: admission, prefill, decode, sampling. Only `_run` touches tensors."""

    def __init__(self, model: Any, cache: KVCache, torch: Any, *, max_seqs: int, budget_tokens: int,
                 prefill_tokens: int, max_model_len: int, eos_ids: frozenset[int], vocab: int, seed: int,
                 grammar_vocab: int | None = None, prefix_caching: bool = False) -> None:
        self.cache, self.torch = cache, torch
        self.prefix = PrefixCache(cache) if prefix_caching else None
        self.decoder, self.lm_head = model.get_decoder(), model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2's final logits
        self.max_seqs, self.budget_tokens, self.prefill_tokens = max_seqs, budget_tokens, prefill_tokens
        self.max_model_len = max_model_len
        self.eos_ids = eos_ids
        self.vocab = vocab
        self.device = cache.device
        self.sampler = Sampler(torch, eos_ids, seed, self.device, grammar_vocab or vocab)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.inbox: list[Seq] = []
        self.cancelled: set[str] = set()
        self.waiting: list[Seq] = []  # sorted by (priority, arrival)
        self.arrivals = 0
        self.running: list[Seq] = []
        self.active = 0  # waiting + running, readable from any thread
        self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="hf-engine", daemon=True)

    # ---- called from the event loop

    def submit(self, seq: Seq) -> None:
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
                    admitted: list[Seq] = []
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

    def _finish(self, seq: Seq, outcome: Output | BaseException | None = None) -> None:
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
        """Drop finished sequences; the last running row moves into each freed row. What a finished
        or cancelled sequence computed goes to the prefix cache first, while its row still holds it."""
        if self.prefix is not None:
            for row, seq in enumerate(self.running):
                if seq.done:
                    self._keep(seq, row)
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
    def _admit(self) -> list[Seq]:
        admitted: list[Seq] = []
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

    def _reserve(self, rows: int, positions: int) -> None:
        """Grow the cache for `rows` x `positions`; cached prefix blocks make way first, so the
        rows and the blocks together stay within the budget."""
        if self.prefix is not None:
            new_rows, new_pos = self.cache.plan(rows, positions, self.max_seqs, self.budget_tokens)
            self.prefix.evict(new_rows * new_pos + self.prefix.tokens - self.budget_tokens)
        self.cache.reserve(rows, positions, self.max_seqs, self.budget_tokens)

    def _load_prefix(self, seq: Seq, row: int) -> int:
        """Copy the longest cached prefix of the prompt into its row; returns its length."""
        if self.prefix is None:
            return 0
        seq.keys = chain(seq.prompt, seq.spec.cache_salt, [])
        if seq.spec.prompt_logprobs is not None:
            return 0  # they need every prompt position's hidden state (vLLM skips the cache alike)
        # at least one prompt token is computed: its hidden state gives the first token's logits
        blocks = self.prefix.match(seq.keys, (len(seq.prompt) - 1) // BLOCK)
        if not blocks:
            return 0
        cached = self.cache.write_prefix(row, blocks)
        log.debug("request %s: %d of %d prompt tokens from the prefix cache", seq.request_id, cached, len(seq.prompt))
        return cached

    def _keep(self, seq: Seq, row: int) -> None:
        """Cache the whole blocks of what the sequence's row holds, within what the rows leave."""
        assert self.prefix is not None
        tokens = (seq.prompt + seq.output)[: seq.length]
        seq.keys = chain(tokens, seq.spec.cache_salt, seq.keys)
        self.prefix.insert(row, seq.keys, self.budget_tokens - self.cache.allocated)

    # prefill
    def _prefill(self, seqs: list[Seq]) -> None:
        torch = self.torch
        row0 = len(self.running)
        span = max([len(s.prompt) for s in seqs] + [s.length + 1 for s in self.running])
        self._reserve(row0 + len(seqs), span)
        starts = [self._load_prefix(s, row0 + i) for i, s in enumerate(seqs)]
        news = [len(s.prompt) - start for s, start in zip(seqs, starts, strict=True)]
        longest = max(news)
        ids = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : news[i]] = torch.tensor(s.prompt[starts[i]:])
        positions = torch.arange(longest).expand(len(seqs), longest)
        step = Step(prefill=True, row0=row0)
        if any(starts):
            # each row's new tokens start at its cached prefix's end; padding repeats a row's last
            # position (so it stays a real position, and attends to keys that exist)
            first = torch.tensor(starts)[:, None]
            ends = first + torch.tensor(news)[:, None]
            positions = torch.minimum(first + positions, ends - 1)
            fresh = torch.arange(longest)[None, :] < torch.tensor(news)[:, None]
            step.span = int(ends.max())
            step.rows = (row0 + torch.arange(len(seqs)))[:, None].expand(-1, longest)[fresh].to(self.device)
            step.positions = positions[fresh].to(self.device)
            step.fresh = fresh.to(self.device)
            step.valid = (torch.arange(step.span)[None, None, :] <= positions[:, :, None])[:, None].to(self.device)
        self.cache.step = step
        hidden = self.decoder(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                              use_cache=False, kv_cache=self.cache).last_hidden_state
        lasts = torch.tensor([n - 1 for n in news], device=self.device)
        logits = self._logits(hidden[torch.arange(len(seqs), device=self.device), lasts])
        for s, start in zip(seqs, starts, strict=True):
            s.length = len(s.prompt)
            s.cached = start
            self.running.append(s)
        if self.prefix is not None:  # later prompts may hit these blocks while this one still runs
            for i, s in enumerate(seqs):
                self._keep(s, row0 + i)
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
        self._reserve(len(seqs), span)
        valid = torch.arange(span, device=self.device)[None, :] <= positions[:, None]
        self.cache.step = Step(prefill=False, row0=0, positions=positions,
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

    def _prompt_logprobs(self, seq: Seq, hidden: Any) -> tuple[TokenLogprobs | None, ...]:
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

    def _emit(self, seqs: list[Seq], logits: Any, prompt_lps: dict[int, tuple[TokenLogprobs | None, ...]] | None = None) -> None:
        """Sample one token per sequence, post it, retire finished sequences."""
        tokens, logprobs = self.sampler.sample(seqs, logits)
        for i, seq in enumerate(seqs):
            tid = tokens[i]
            seq.output.append(tid)
            if seq.matcher is not None and not seq.matcher.accept_token(tid):
                # the mask allowed only tokens the grammar accepts: this is our bug, and the
                # answer would not match its grammar, so it fails rather than goes out
                log.error("request %s: the grammar rejected token %d it had allowed", seq.request_id, tid)
                self._finish(seq, EngineError(
                    f"Internal error: the grammar rejected token {tid} that its mask allowed; "
                    "the answer would not match the requested format."))
                continue
            reason: FinishReason | None = None
            # vLLM's order: EOS (unless ignore_eos), a stop token, then the length limits. Neither
            # kind of stop token is sampled before min_tokens: constrain masks them. A grammar ends
            # only on accepting one of them (grammar.matcher), never before it may.
            if ((tid in self.eos_ids and not seq.spec.ignore_eos) or tid in seq.spec.stop_token_ids
                    or (seq.matcher is not None and seq.matcher.is_terminated())):
                reason = "stop"
            elif len(seq.output) >= seq.spec.max_tokens or len(seq.prompt) + len(seq.output) >= self.max_model_len:
                reason = "length"
            out = Output(tid, logprobs[i], reason, (prompt_lps or {}).get(i),
                         seq.cached if len(seq.output) == 1 else None)
            if reason is not None:
                self._finish(seq, out)
            else:
                seq.deliver(out)
        if any(s.done for s in self.running):
            self._compact()
