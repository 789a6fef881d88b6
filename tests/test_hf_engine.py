"""The Transformers engine's own parts: text assembly, sampling filters and vLLM's per-request
rules (allowed ids, bad words, logit bias, stop tokens, ignore_eos, priority), `--engine auto`,
and its KV budget (requests wait for room instead of crashing) on a live server."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from server import engines
from server.engines.base import SamplingSpec
from server.engines.hf.cache import KVCache
from server.engines.hf.sampler import bad_words_ids, banned, filtered_probs
from server.engines.hf.scheduler import Core
from server.engines.hf.sequence import Output, Seq
from server.engines.hf.text import Text
from server.errors import InvalidRequest
from tests.conftest import MODEL
from tests.server_process import ServerProcess

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


class _Pieces:
    """A tokenizer stand-in: token id i is pieces[i]; id 99 is special (end of turn)."""

    special_ids = frozenset({99})

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = dict(enumerate(pieces)) | {99: b"<|im_end|>"}

    def token_bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id]


def _run(pieces: list[bytes], stop: tuple[str, ...], ids: list[int] | None = None, *, ends: bool = False,
         spaced: frozenset[int] = frozenset(), **spec: Any) -> tuple[list[str], bool]:
    """Feed ids (default: every piece in order) through `Text`; `ends`: the last id ended the
    answer as a stop token does."""
    text = Text(_Pieces(pieces), SamplingSpec(max_tokens=16, stop=stop, **spec), frozenset({99}), spaced)  # type: ignore[arg-type]
    out: list[str] = []
    ids = ids if ids is not None else list(range(len(pieces)))
    for i, tid in enumerate(ids):
        piece, stopped = text.feed(tid, check_stop=True, ends=ends and i == len(ids) - 1)
        out.append(piece)
        if stopped:
            return out, True
    return out + [text.flush()], False


def test_stop_string_across_tokens_is_cut_and_never_sent() -> None:
    out, stopped = _run([b"The cap", b"ital of Fr", b"ance is"], ("ital of France",))
    assert stopped and "".join(out) == "The cap"
    # nothing that later turned out to be the stop string went out early
    assert all("ital" not in p for p in out)


def test_text_held_for_a_stop_string_is_released_when_it_cannot_match() -> None:
    out, stopped = _run([b"ab", b"cd", b"ef"], ("xyz",))
    # the last len(stop) - 1 characters wait until later text shows they do not begin the stop
    assert not stopped and out == ["", "ab", "cd", "ef"]


def test_multibyte_characters_are_never_split_and_specials_are_skipped() -> None:
    e_acute = "é".encode()
    out, _ = _run([b"caf", e_acute[:1], e_acute[1:], b"!"], (), ids=[0, 1, 2, 3, 99])
    assert out[1] == "" and out[2] == "é" and "".join(out) == "café!"  # the special token adds nothing
    # a character the answer was cut off in the middle of is dropped, not sent as U+FFFD
    out, _ = _run([b"caf", e_acute[:1]], ())
    assert "".join(out) == "caf"


def test_include_stop_str_in_output_keeps_the_stop_string_and_holds_nothing_back() -> None:
    out, stopped = _run([b"The cap", b"ital of Fr", b"ance is"], ("ital of France",), include_stop_str_in_output=True)
    # text goes out at once (nothing is cut later), and the answer ends right after the stop string
    assert stopped and out == ["The cap", "ital of Fr", "ance"]


def test_the_stop_string_that_ends_first_wins() -> None:
    # vLLM's check_stop_strings: the earliest-ending match, not the earliest-starting one
    out, stopped = _run([b"xabcd"], ("abcd", "bc"))
    assert stopped and "".join(out) == "xa"


def test_a_stop_string_must_end_in_text_that_is_checked() -> None:
    # vLLM checks stop strings only in text after min_tokens: one that ended before is not found later
    text = Text(_Pieces([b"ab", b"c"]), SamplingSpec(max_tokens=4, stop=("ab",)), frozenset({99}))  # type: ignore[arg-type]
    assert text.feed(0, check_stop=False) == ("a", False)
    assert text.feed(1, check_stop=True) == ("b", False)
    assert text.flush() == "c"


def test_special_tokens_show_when_not_skipped() -> None:
    out, _ = _run([b"Hi"], (), ids=[0, 99, 0], skip_special_tokens=False)
    assert "".join(out) == "Hi<|im_end|>Hi"
    out, _ = _run([b"Hi"], (), ids=[0, 99, 0])
    assert "".join(out) == "HiHi"


def test_the_token_that_ended_the_answer_is_text_only_with_include_stop_str_in_output() -> None:
    # EOS or a stop_token_ids token: vLLM leaves it out of the text, even when specials are shown
    out, _ = _run([b"Hi", b" there"], (), ids=[0, 1], ends=True, skip_special_tokens=False)
    assert "".join(out) == "Hi"
    out, _ = _run([b"Hi"], (), ids=[0, 99], ends=True, skip_special_tokens=False, include_stop_str_in_output=True)
    assert "".join(out) == "Hi<|im_end|>"
    out, _ = _run([b"Hi"], (), ids=[0, 99], ends=True, include_stop_str_in_output=True)
    assert "".join(out) == "Hi"  # a special token still needs skip_special_tokens off


def test_slow_tokenizers_set_added_tokens_apart_with_spaces() -> None:
    # vLLM's slow detokenizer joins added tokens and the text around them with spaces, unless
    # spaces_between_special_tokens is off; fast tokenizers have no such set (see text.special_ids)
    ids = [0, 99, 99, 0]
    out, _ = _run([b"Hi"], (), ids=ids, spaced=frozenset({99}), skip_special_tokens=False)
    assert "".join(out) == "Hi <|im_end|> <|im_end|> Hi"
    out, _ = _run([b"Hi"], (), ids=ids, spaced=frozenset({99}), skip_special_tokens=False,
                  spaces_between_special_tokens=False)
    assert "".join(out) == "Hi<|im_end|><|im_end|>Hi"


def test_sampling_filters_break_ties_like_argmax() -> None:
    scores = torch.tensor([[0.0, 2.0, 2.0, 1.0], [0.0, 2.0, 2.0, 1.0], [3.0, 2.9, -5.0, -5.0]])
    specs = [SamplingSpec(max_tokens=1, top_k=1), SamplingSpec(max_tokens=1, top_p=1e-6),
             SamplingSpec(max_tokens=1, min_p=0.5)]
    probs = filtered_probs(torch, scores.clone(), specs)
    # a tie for the top: exactly one token survives, the lower id, as argmax would pick
    assert probs[0].nonzero().flatten().tolist() == [1]
    assert probs[1].nonzero().flatten().tolist() == [1]
    # min_p keeps tokens at least half as likely as the best one
    assert probs[2].nonzero().flatten().tolist() == [0, 1]


# --------------------------------------------------------------------------- vLLM's per-request rules


def _encode(text: str) -> list[int]:
    """A tokenizer stand-in: one token per word, id = 10 + the word's place in WORDS; a word
    after a space is another token (id + 100), as in byte-level BPE."""
    words = ["hello", "world", "big", "cat"]
    out = []
    for i, word in enumerate(text.split(" ")):
        if word:
            out.append(10 + words.index(word) + (100 if i > 0 else 0))
    return out


def test_bad_words_become_token_sequences_with_and_without_a_leading_space() -> None:
    assert bad_words_ids(_encode, ("hello", " big cat"), 1000) == ((10,), (110,), (12, 113), (112, 113))
    with pytest.raises(InvalidRequest) as e:
        bad_words_ids(_encode, ("",), 1000)
    assert e.value.param == "bad_words"
    with pytest.raises(InvalidRequest):
        bad_words_ids(_encode, ("hello",), 50)  # a token beyond the vocabulary


def test_a_bad_words_last_token_is_banned_only_after_its_other_tokens() -> None:
    words = ((10,), (12, 13), (5, 6, 7))
    assert banned(words, []) == [10]  # one-token words always; longer ones need their prefix
    assert banned(words, [1, 12]) == [10, 13]
    assert banned(words, [5, 6]) == [10, 7]
    assert banned(words, [6]) == [10]


class _Model:
    """What `Core` reads from a model when it is built; sampling never runs it."""

    config = None

    def get_decoder(self) -> None:
        return None

    def get_output_embeddings(self) -> None:
        return None


EOS = 9


def _core() -> Core:
    cache = KVCache(torch, 1, 1, 1, torch.float32, "cpu", 64)
    return Core(_Model(), cache, torch, max_seqs=8, budget_tokens=1024, prefill_tokens=1024, max_model_len=64,
                 eos_ids=frozenset({EOS}), vocab=16, seed=0)


def _seq(spec: SamplingSpec, output: list[int] | None = None, bad_words: tuple[tuple[int, ...], ...] = (),
         got: list[Output | BaseException] | None = None) -> Seq:
    sink = got if got is not None else []
    seq = Seq("r", [1, 2], spec, sink.append, None, 64, bad_words)
    seq.output = list(output or [])
    return seq


def _logits(favourite: int, rows: int = 1) -> torch.Tensor:
    logits = torch.zeros(rows, 16)
    logits[:, favourite] = 5.0
    logits[:, 3] = 4.0
    return logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_masks_apply_per_row_to_greedy_and_sampled_rows(temperature: float) -> None:
    core = _core()
    free = _seq(SamplingSpec(max_tokens=8, temperature=temperature, top_k=1))
    allowed = _seq(SamplingSpec(max_tokens=8, temperature=temperature, allowed_token_ids=(4,)))
    bad = _seq(SamplingSpec(max_tokens=8, temperature=temperature, top_k=1), output=[6], bad_words=((6, EOS), (3,)))
    early = _seq(SamplingSpec(max_tokens=8, temperature=temperature, top_k=1, min_tokens=2, stop_token_ids=(3,)))
    logits = torch.zeros(4, 16)
    logits[:, 7] = 6.0
    logits[:, EOS] = 8.0
    logits[:, 3] = 7.0
    chosen, _ = core.sampler.sample([free, allowed, bad, early], logits.clone())
    # bad: EOS follows 6 and 3 is one token, both banned; early: EOS and its stop token wait for min_tokens
    assert chosen == [EOS, 4, 7, 7]
    bad.output = [5]
    assert core.sampler.sample([bad], logits[:1].clone())[0] == [EOS]  # EOS is banned only after a 6
    early.spec = SamplingSpec(max_tokens=8, temperature=temperature, top_k=1, min_tokens=2, ignore_eos=True)
    assert core.sampler.sample([early], logits[:1].clone())[0] == [3]  # ignore_eos: EOS still waits for min_tokens
    early.output = [1, 1]
    assert core.sampler.sample([early], logits[:1].clone())[0] == [EOS]


def test_logit_bias_moves_the_pick_but_not_the_logprobs() -> None:
    core = _core()
    plain = _seq(SamplingSpec(max_tokens=8, temperature=0, logprobs=1))
    biased = _seq(SamplingSpec(max_tokens=8, temperature=0, logprobs=1, logit_bias=((3, 2.0), (5, -1000.0))))
    logits = _logits(5, rows=2)
    chosen, lps = core.sampler.sample([plain, biased], logits.clone())
    assert chosen == [5, 3]
    raw = torch.log_softmax(logits[0], dim=-1)
    # logprobs are of the raw distribution (vLLM's raw_logprobs): the bias is not in them
    assert lps[1] is not None and lps[1].logprob == pytest.approx(float(raw[3]))
    assert lps[1].top == {5: pytest.approx(float(raw[5]))}


def test_stop_tokens_end_the_answer_and_ignore_eos_does_not() -> None:
    core = _core()
    got: list[Output | BaseException] = []
    stop = _seq(SamplingSpec(max_tokens=8, temperature=0, stop_token_ids=(5,)), got=got)
    core._emit([stop], _logits(5))
    assert isinstance(got[-1], Output) and got[-1].finish_reason == "stop" and stop.done
    keep = _seq(SamplingSpec(max_tokens=8, temperature=0, ignore_eos=True), got=got)
    core._emit([keep], _logits(EOS))
    assert isinstance(got[-1], Output) and got[-1].finish_reason is None and not keep.done
    last = _seq(SamplingSpec(max_tokens=1, temperature=0, ignore_eos=True), got=got)
    core._emit([last], _logits(EOS))
    assert isinstance(got[-1], Output) and got[-1].finish_reason == "length"
    eos = _seq(SamplingSpec(max_tokens=1, temperature=0), got=got)
    core._emit([eos], _logits(EOS))
    assert isinstance(got[-1], Output) and got[-1].finish_reason == "stop"  # a stop token beats the length


def test_waiting_requests_are_admitted_by_priority_then_arrival() -> None:
    core = _core()
    seqs = [_seq(SamplingSpec(max_tokens=8, priority=p)) for p in (0, 5, -1, 0)]
    for i, seq in enumerate(seqs):
        seq.request_id = str(i)
        core.submit(seq)
    core._take_inbox()
    assert [s.request_id for s in core.waiting] == ["2", "0", "3", "1"]


def test_auto_picks_transformers_where_vllm_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees on a machine without it
    name, why = engines.pick("auto")
    assert name == "transformers" and "not installed" in why
    assert engines.pick("transformers") == ("transformers", "asked for with --engine")


@pytest.mark.skipif(not engines.pick("auto")[0] == "vllm", reason="vLLM is not installed here")
def test_auto_picks_vllm_where_it_runs() -> None:
    assert engines.pick("auto")[0] == "vllm"


# --------------------------------------------------------------------------- KV budget, live

# 0.005 GiB at 23,040 bytes per token (30 layers x 3 KV heads x 64 x 2 x bf16): 233 tokens
KV_GIB = "0.005"
ANSWER = 120  # prompt (~37) + 120 fits once; two such answers at a time do not


@pytest.fixture(scope="module")
def small_kv() -> Iterator[ServerProcess]:
    proc = ServerProcess("--engine", "transformers", "--kv-cache-space", KV_GIB, name="hf-small-kv")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


async def test_requests_beyond_the_kv_budget_wait_their_turn(small_kv: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=small_kv.base_url, api_key="none", max_retries=0, timeout=120)
    spans: list[tuple[float, float, int]] = []
    peak = 0

    async def one(seed: int) -> None:
        stream = await client.chat.completions.create(
            model=MODEL, messages=FRANCE, max_tokens=ANSWER, seed=seed, stream=True,
            extra_body={"min_tokens": ANSWER}, stream_options={"include_usage": True},
        )
        first = last = 0.0
        tokens = 0
        async for chunk in stream:
            now = time.monotonic()
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or now
                last = now
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        spans.append((first, last, tokens))

    async def watch() -> None:
        nonlocal peak
        async with httpx.AsyncClient() as h:
            while len(spans) < 3:
                peak = max(peak, (await h.get(f"{small_kv.url}/health")).json()["running_requests"])
                await asyncio.sleep(0.2)

    await asyncio.gather(one(1), one(2), one(3), watch())
    assert [t for _, _, t in spans] == [ANSWER] * 3  # all served in full: nothing crashed or was cut
    assert peak == 3  # all three were in the engine (one generating, two waiting)
    spans.sort()
    for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
        assert start >= end  # each began only after the one before it had finished
    assert (await client.models.list()).data[0].model_extra["engine"] == "transformers"


def test_a_request_larger_than_the_whole_budget_is_a_400(small_kv: ServerProcess) -> None:
    client = openai.OpenAI(base_url=small_kv.base_url, api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=400)
    assert e.value.body["param"] == "max_tokens" and "--kv-cache-space" in e.value.body["message"]
    # and the engine still serves
    assert client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=5).choices[0].message.content
