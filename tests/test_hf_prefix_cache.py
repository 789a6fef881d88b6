"""The Transformers engine's prefix cache, on the real default model in-process: answers with the
cache are the answers without it (a multi-turn chat, a batch sharing a system prompt, salts,
prompt logprobs), `cached_tokens` says what was reused, salts partition the cache, and a tiny KV
budget evicts blocks without holding anyone back.

The engines run in float32: bf16 on CPU is not batch-invariant (its matmul and attention kernels
round differently for different numbers of rows, so a prompt's greedy answer can change with the
batch it is prefilled in, cache or no cache); float32 shows that what the cache supplies is what
a full prefill computes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import pytest

from server import models
from server.config import Settings
from server.engines.base import SamplingSpec, TokenEvent, TokenLogprobs
from server.engines.hf import HFEngine
from server.engines.hf.prefix import BLOCK
from server.tokenizer import Tokenizer

SYSTEM = ("You are the concierge of the Grand Hotel in Lisbon. Answer guests briefly and kindly, "
          "recommend places within walking distance, mention opening hours when you know them, and never "
          "invent prices. The hotel has a rooftop bar open from 5 pm to midnight, a spa on the ground floor, "
          "breakfast from 7 to 10:30 am, and bicycles guests may borrow for free. ") * 2
QUESTIONS = ["Where can I eat fish tonight?", "Is the tram 28 worth it?", "What is there to see in Belem?",
             "Can I borrow a bicycle tomorrow morning?"]
GREEDY = SamplingSpec(max_tokens=16, temperature=0)


async def _start(**settings: object) -> HFEngine:
    config = Settings(seed=0, dtype="float32", **settings)  # type: ignore[arg-type]
    path = models.resolve(config)
    tokenizer = await asyncio.to_thread(Tokenizer, path)
    return await asyncio.to_thread(HFEngine.start, path, config, tokenizer)


@pytest.fixture(scope="module")
async def engines() -> AsyncIterator[tuple[HFEngine, HFEngine]]:
    """(with the prefix cache, without it)"""
    on, off = await _start(kv_cache_space=0.5), await _start(kv_cache_space=0.5, enable_prefix_caching=False)
    try:
        yield on, off
    finally:
        await on.shutdown()
        await off.shutdown()


async def _answer(engine: HFEngine, prompt: list[int], spec: SamplingSpec = GREEDY, request_id: str = "r",
                  ) -> tuple[list[int], int | None, tuple[TokenLogprobs | None, ...] | None]:
    """The answer's token ids, the first event's cached_tokens, and the prompt logprobs."""
    ids: list[int] = []
    cached = None
    prompt_lps = None
    first = True
    async for event in engine.generate(prompt, spec, request_id):
        if first:
            cached, first = event.cached_tokens, False
        else:
            assert event.cached_tokens is None  # only the first event says it
        ids.extend(event.token_ids)
        prompt_lps = prompt_lps or event.prompt_logprobs
    return ids, cached, prompt_lps


def _chat(engine: HFEngine, *turns: str, system: str = SYSTEM) -> list[int]:
    """A chat prompt whose user and assistant turns alternate, starting with the user's."""
    roles = ["user", "assistant"]
    messages = [{"role": "system", "content": system}]
    messages += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return engine.tokenizer.chat_prompt(messages)


async def test_a_multi_turn_chat_hits_more_each_turn_and_answers_the_same(
        engines: tuple[HFEngine, HFEngine]) -> None:
    on, off = engines
    spec = SamplingSpec(max_tokens=16, temperature=0, cache_salt="multi-turn")
    turns: list[str] = []
    cached: list[int] = []
    for i, question in enumerate(QUESTIONS[:3]):
        turns.append(question)
        prompt = _chat(on, *turns)
        ids, hit, _ = await _answer(on, prompt, spec, f"turn-{i}")
        expected, none, _ = await _answer(off, prompt, spec, f"turn-{i}")
        assert ids == expected, f"turn {i + 1}"
        assert none == 0  # without the cache nothing is ever reused
        assert hit is not None and hit % BLOCK == 0 and hit < len(prompt)
        cached.append(hit)
        turns.append(on.tokenizer.hf.decode(ids, skip_special_tokens=True))
    assert cached[0] == 0
    # each turn reuses the one before: its prompt and (but for the template's re-rendering of the
    # answer's end) its answer
    assert all(b > a for a, b in zip(cached, cached[1:], strict=False)), cached


async def test_a_batch_sharing_a_system_prompt_answers_the_same(engines: tuple[HFEngine, HFEngine]) -> None:
    on, off = engines
    spec = SamplingSpec(max_tokens=16, temperature=0, cache_salt="batch")
    prompts = [_chat(on, q) for q in QUESTIONS]
    expected = [(await _answer(off, p, spec))[0] for p in prompts]
    # cold: admitted together (or one step apart: a later one may hit what an earlier one prefilled)
    cold = await asyncio.gather(*(_answer(on, p, spec, f"cold-{i}") for i, p in enumerate(prompts)))
    assert [ids for ids, _, _ in cold] == expected
    # warm: every prompt finds the system prompt and its own earlier prefill
    warm = await asyncio.gather(*(_answer(on, p, spec, f"warm-{i}") for i, p in enumerate(prompts)))
    assert [ids for ids, _, _ in warm] == expected
    assert all(hit is not None and hit >= (len(p) - 1) // BLOCK * BLOCK
               for (_, hit, _), p in zip(warm, prompts, strict=True)), [h for _, h, _ in warm]
    # a new question after the same system prompt reuses the system prompt's blocks
    fresh = _chat(on, "Which museum opens earliest?")
    ids, hit, _ = await _answer(on, fresh, spec)
    assert ids == (await _answer(off, fresh, spec))[0]
    shared = len(on.tokenizer.chat_prompt([{"role": "system", "content": SYSTEM}])) - 2  # up to the system turn's end
    assert hit is not None and shared // BLOCK * BLOCK - BLOCK <= hit < len(fresh)


async def test_salts_partition_the_cache(engines: tuple[HFEngine, HFEngine]) -> None:
    on, off = engines
    prompt = _chat(on, "Describe the hotel's spa in detail.", system="You are a salty assistant. " * 20)

    async def hit(salt: str | None) -> int | None:
        return (await _answer(on, prompt, SamplingSpec(max_tokens=4, temperature=0, cache_salt=salt)))[1]

    assert await hit("a") == 0
    assert (await hit("a") or 0) > 0
    assert await hit("b") == 0
    assert await hit(None) == 0  # no salt is a partition of its own
    assert (await hit(None) or 0) > 0
    salted, _, _ = await _answer(on, prompt, SamplingSpec(max_tokens=16, temperature=0, cache_salt="b"))
    assert salted == (await _answer(off, prompt))[0]


async def test_prompt_logprobs_skip_the_cache(engines: tuple[HFEngine, HFEngine]) -> None:
    on, off = engines
    prompt = _chat(on, "Which tram goes to the castle?")
    spec = SamplingSpec(max_tokens=4, temperature=0, prompt_logprobs=2, cache_salt="logprobs")
    await _answer(on, prompt, spec)
    ids, hit, lps = await _answer(on, prompt, spec)
    assert hit == 0  # every prompt position was computed, as its logprobs need
    expected, _, expected_lps = await _answer(off, prompt, spec)
    assert ids == expected and lps is not None and expected_lps is not None
    assert [lp and (lp.token_id, round(lp.logprob, 4)) for lp in lps] == \
        [lp and (lp.token_id, round(lp.logprob, 4)) for lp in expected_lps]


async def test_a_tiny_budget_evicts_blocks_and_never_holds_requests_back(engines: tuple[HFEngine, HFEngine]) -> None:
    _, off = engines
    # ~700 tokens of float32 KV: two of these requests at a time (~220 tokens each), and some
    # blocks beside them, far from all of the four prompts' blocks
    tiny = await _start(kv_cache_space=0.03)
    core = tiny.core
    prefix = core.prefix
    assert prefix is not None
    try:
        # a shared system prompt, then each guest's own long question
        prompts = [_chat(tiny, f"I am guest {i}. " * 15 + q, system="You are a concierge in Lisbon. " * 10)
                   for i, q in enumerate(QUESTIONS)]
        assert all(2 * (len(p) + GREEDY.max_tokens) <= core.budget_tokens for p in prompts)
        assert sum(len(p) // BLOCK * BLOCK for p in prompts) > core.budget_tokens  # they cannot all stay
        hits = []
        expected = [(await _answer(off, p))[0] for p in prompts]
        peak = 0
        over = []

        async def watch(done: asyncio.Event) -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, len(core.running))
                if core.cache.allocated + prefix.tokens > core.budget_tokens:
                    over.append((core.cache.allocated, prefix.tokens))
                await asyncio.sleep(0.005)

        for round_ in range(2):
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(done))
            # two at a time, in a different order each round, so each pair evicts the other's blocks
            order = list(range(len(prompts))) if round_ == 0 else [3, 1, 2, 0]
            for a, b in zip(order[::2], order[1::2], strict=True):
                got = await asyncio.gather(_answer(tiny, prompts[a], request_id=f"{round_}-{a}"),
                                           _answer(tiny, prompts[b], request_id=f"{round_}-{b}"))
                assert [got[0][0], got[1][0]] == [expected[a], expected[b]]
                hits += [got[0][1] or 0, got[1][1] or 0]
            done.set()
            await watcher
        assert not over, over  # the rows and the cached blocks never took more than the budget
        assert peak == 2  # cached blocks never kept the second request waiting
        # later requests still found blocks: the shared system prompt's, which every hit keeps young
        assert all(hits[2:]), hits
        assert 0 < prefix.tokens <= core.budget_tokens - core.cache.allocated
        # a request that needs the whole budget is admitted at once, whatever is cached
        big = _chat(tiny, "Tell me everything.", system="Lisbon. " * 40)
        spec = SamplingSpec(max_tokens=core.budget_tokens - len(big), temperature=0, min_tokens=8,
                            ignore_eos=True)
        stream = cast(AsyncGenerator[TokenEvent, None], tiny.generate(big, spec, "big"))
        assert (await anext(stream)).token_ids  # its first token came
        await stream.aclose()
    finally:
        await tiny.shutdown()
