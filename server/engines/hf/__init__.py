"""The Transformers engine: continuous batching over a plain transformers model, for machines
where vLLM does not run (macOS, Windows, ARM, CPUs without AVX-512, ...).

Why our own scheduler rather than transformers' `ContinuousBatchingManager` (5.19): on this CPU
it generated 38-45 output tok/s for 16 concurrent 128-token answers (`generate_batch`, sdpa or
paged attention), and its sampling is one setting for the whole batch: `do_sample` is global (no
greedy and sampled requests side by side), and it has no per-request seed, top_logprobs, min_p or
penalties, which the API promises. What we keep from transformers is the model: its modules and
weights run unchanged; we only plug in an attention function (`AttentionInterface`) that reads
and writes our KV cache, the same seam transformers' own paged attention uses.

The modules, in the order a request meets them:
- engine.py     `HFEngine`: loads the model, checks and submits requests, makes `TokenEvent`s
- grammar.py    grammar constraints: xgrammar compiled as vLLM compiles it, a matcher per sequence
- sequence.py   one sequence as the model thread sees it (`Seq`), and what it posts back (`Output`)
- scheduler.py  the model thread (`Core`): admit, prefill, decode, post, retire
- attention.py  the attention function transformers' modules call, over our cache
- cache.py      the KV cache: a tensor per layer, rows x heads x positions x head_dim
- prefix.py     the prefix cache: blocks of KV keyed by a hash chain (and cache_salt), LRU eviction
- sampler.py    grammar masks, vLLM's per-request rules, penalties, filters, seeded sampling
- text.py       token ids -> whole characters, stop strings held back until they cannot match
"""

from server.engines.hf.engine import HFEngine

__all__ = ["HFEngine"]
