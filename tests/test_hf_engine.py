"""The Transformers engine's own parts: text assembly, sampling filters, `--engine auto`, and
its KV budget (requests wait for room instead of crashing) on a live server."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch

from server import engines
from server.engines.base import SamplingSpec
from server.engines.hf_engine import _filtered_probs, _Text
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


def _run(pieces: list[bytes], stop: tuple[str, ...], ids: list[int] | None = None) -> tuple[list[str], bool]:
    text = _Text(_Pieces(pieces), stop)  # type: ignore[arg-type]
    out: list[str] = []
    for tid in ids if ids is not None else range(len(pieces)):
        piece, stopped = text.feed(tid, check_stop=True)
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


def test_sampling_filters_break_ties_like_argmax() -> None:
    scores = torch.tensor([[0.0, 2.0, 2.0, 1.0], [0.0, 2.0, 2.0, 1.0], [3.0, 2.9, -5.0, -5.0]])
    specs = [SamplingSpec(max_tokens=1, top_k=1), SamplingSpec(max_tokens=1, top_p=1e-6),
             SamplingSpec(max_tokens=1, min_p=0.5)]
    probs = _filtered_probs(torch, scores.clone(), specs)
    # a tie for the top: exactly one token survives, the lower id, as argmax would pick
    assert probs[0].nonzero().flatten().tolist() == [1]
    assert probs[1].nonzero().flatten().tolist() == [1]
    # min_p keeps tokens at least half as likely as the best one
    assert probs[2].nonzero().flatten().tolist() == [0, 1]


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
