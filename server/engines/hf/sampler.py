"""Sampling, per row: grammar masks, then allowed_token_ids, bad_words, min_tokens, logit_bias,
penalties, temperature, top_k, top_p, min_p and each row's own seeded generator, in vLLM's order
and with its rules. Greedy and sampled rows, constrained and free ones, share one batch.

Logprobs are of the model's distribution after the grammar mask and before everything else, as
vLLM reports them (its `raw_logprobs`: the grammar bitmask is applied before its sampler runs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.engines.base import SamplingSpec, TokenLogprobs
from server.engines.hf.sequence import Seq
from server.errors import InvalidRequest

# most token sequences the bad words of one request may become (vLLM's VLLM_MAX_NUM_BAD_WORDS)
MAX_BAD_WORDS = 128


class Sampler:
    """Picks one token per row of the logits (which it may change in place)."""

    def __init__(self, torch: Any, eos_ids: frozenset[int], seed: int, device: Any, grammar_vocab: int) -> None:
        self.torch = torch
        self.eos_ids = eos_ids
        self.rng = torch.Generator(device="cpu").manual_seed(seed)
        self.device = device
        # the grammars' vocabulary: the model's logits (TokenizerInfo's vocab_size); our logits
        # may be narrower (cut to the tokenizer), and xgrammar masks the overlap
        self.grammar_vocab = grammar_vocab
        self.bitmask: Any = None  # xgrammar's token bitmask, [rows, grammar_vocab / 32], grown on demand

    def sample(self, seqs: list[Seq], logits: Any) -> tuple[list[int], list[TokenLogprobs | None]]:
        torch = self.torch
        self._mask_grammar(seqs, logits)
        raw = torch.log_softmax(logits, dim=-1) if any(s.spec.logprobs is not None for s in seqs) else None
        scores = logits
        for i, seq in enumerate(seqs):
            spec = seq.spec
            penalized = spec.presence_penalty or spec.frequency_penalty or spec.repetition_penalty != 1.0
            if penalized or constrains(seq):
                scores = scores.clone() if scores is logits else scores
                constrain(torch, scores[i], seq, self.eos_ids)
                penalize(torch, scores[i], seq, self.device)
        chosen = [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.spec.temperature == 0]
        if greedy:
            picks = scores[greedy].argmax(dim=-1).tolist()
            for i, t in zip(greedy, picks, strict=True):
                chosen[i] = t
        sampled = [i for i, s in enumerate(seqs) if s.spec.temperature != 0]
        if sampled:
            probs = filtered_probs(torch, scores[sampled], [seqs[i].spec for i in sampled])
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
                    # a grammar leaves fewer than k tokens possible: the rest are -inf, which JSON
                    # cannot carry; vLLM's server sends them as -9999.0
                    top = dict(zip(idx.tolist(), vals.clamp(min=-9999.0).tolist(), strict=True))
                lps[i] = TokenLogprobs(chosen[i], float(raw[i, chosen[i]]), top)
        return chosen, lps

    def _mask_grammar(self, seqs: list[Seq], logits: Any) -> None:
        """-inf for every token the grammar does not allow next, on constrained rows only, before
        anything else sees the logits: no later bias or temperature can bring a token back."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return
        import xgrammar as xgr

        if self.bitmask is None or self.bitmask.shape[0] < len(seqs):
            self.bitmask = xgr.allocate_token_bitmask(max(len(seqs), 4), self.grammar_vocab)
        for i in rows:
            seqs[i].matcher.fill_next_token_bitmask(self.bitmask, i)
        bitmask = self.bitmask[: len(seqs)]
        if logits.device != bitmask.device:
            bitmask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)


def bad_words_ids(encode: Callable[[str], list[int]], words: tuple[str, ...], vocab: int) -> tuple[tuple[int, ...], ...]:
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


def banned(bad_words: tuple[tuple[int, ...], ...], output: list[int]) -> list[int]:
    """vLLM's bad-words rule: a word's last token is banned when its other tokens end the answer
    so far (a one-token word always is); the prompt does not count."""
    out = []
    for ids in bad_words:
        n = len(ids) - 1
        if n <= len(output) and (n == 0 or tuple(output[-n:]) == ids[:-1]):
            out.append(ids[-1])
    return out


def constrains(seq: Seq) -> bool:
    spec = seq.spec
    return (spec.allowed_token_ids is not None or bool(seq.bad_words) or bool(spec.logit_bias)
            or len(seq.output) < spec.min_tokens)


def constrain(torch: Any, row: Any, seq: Seq, eos_ids: frozenset[int]) -> None:
    """One row's logits before penalties, in vLLM's order: allowed_token_ids, bad_words, min_tokens
    (EOS and stop tokens, even with ignore_eos), logit_bias (clamped to +-100, as vLLM's server does)."""
    spec = seq.spec
    if spec.allowed_token_ids is not None:
        keep = torch.zeros(row.shape[0], dtype=torch.bool, device=row.device)
        keep[list(spec.allowed_token_ids)] = True
        row.masked_fill_(~keep, float("-inf"))
    if seq.bad_words and (ban := banned(seq.bad_words, seq.output)):
        row[ban] = float("-inf")
    if len(seq.output) < spec.min_tokens and (stops := eos_ids | set(spec.stop_token_ids)):
        row[sorted(stops)] = float("-inf")
    if spec.logit_bias:
        bias = {tid: min(100.0, max(-100.0, b)) for tid, b in spec.logit_bias}
        row[list(bias)] += torch.tensor(list(bias.values()), dtype=row.dtype, device=row.device)


def penalize(torch: Any, row: Any, seq: Seq, device: Any) -> None:
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


def filtered_probs(torch: Any, scores: Any, specs: list[SamplingSpec]) -> Any:
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
