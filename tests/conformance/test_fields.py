"""vLLM's request fields (and OpenAI's logit_bias) show their effect on every engine, through the SDK
(`extra_body`) and raw HTTP, against a live server: the README's field table says "implemented"
for each of these, and this module is where that claim is tested."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import MODEL

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
IM_START, IM_END = 1, 2  # the default model's special tokens: <|im_start|>, <|im_end|> (its EOS)


def _engine(client: openai.OpenAI) -> str:
    return str(client.models.retrieve(MODEL).model_extra["engine"])


def _chat(client: openai.OpenAI, **extra: object) -> dict:
    base = {"max_tokens": 12, "temperature": 0}
    fields = {k: extra.pop(k) for k in list(extra) if k in ("max_tokens", "temperature", "messages", "logprobs",
                                                          "top_logprobs", "stop", "n", "seed")}
    r = client.chat.completions.create(model=MODEL, messages=fields.pop("messages", FRANCE), **{**base, **fields},
                                       extra_body=extra)
    return r.model_dump()


def _greedy_ids(client: openai.OpenAI, n: int = 12) -> tuple[str, list[int]]:
    r = _chat(client, max_tokens=n, return_token_ids=True)
    return r["choices"][0]["message"]["content"], r["choices"][0]["token_ids"]


def test_ignore_eos_gives_exactly_max_tokens(client: openai.OpenAI) -> None:
    # greedy "capital of France" ends well before 40 tokens; with ignore_eos it runs to the limit
    plain = _chat(client, max_tokens=40)
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 40
    r = _chat(client, max_tokens=40, ignore_eos=True)
    assert r["usage"]["completion_tokens"] == 40 and r["choices"][0]["finish_reason"] == "length"


def test_allowed_token_ids_of_one_id_gives_only_that_id(client: openai.OpenAI) -> None:
    _, ids = _greedy_ids(client)
    only = ids[1]
    r = _chat(client, max_tokens=5, temperature=1.0, seed=3, allowed_token_ids=[only], return_token_ids=True)
    assert r["choices"][0]["token_ids"] == [only] * 5


def test_logit_bias_of_100_makes_a_token_dominate(client: openai.OpenAI) -> None:
    _, ids = _greedy_ids(client)
    token = ids[2]
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, temperature=0,
                                       logit_bias={str(token): 100}, extra_body={"return_token_ids": True})
    assert r.model_extra is not None
    assert r.choices[0].model_extra["token_ids"] == [token] * 4
    # OpenAI's bounds are -100..100
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=1, logit_bias={str(token): 101})
    assert e.value.body["param"].startswith("logit_bias")


def test_logit_bias_on_completions(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0)
    biased = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                       logit_bias={"28": -100, "30": 100})
    assert biased.choices[0].text != plain.choices[0].text


def test_stop_token_ids_stop_on_that_id(client: openai.OpenAI) -> None:
    text, ids = _greedy_ids(client)
    stop = ids[3]
    r = _chat(client, stop_token_ids=[stop], return_token_ids=True)
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["token_ids"] == ids[:4]  # the stop token is generated (counted), then it ends
    assert text.startswith(r["choices"][0]["message"]["content"])


def test_include_stop_str_in_output_keeps_the_stop_string(client: openai.OpenAI) -> None:
    text, _ = _greedy_ids(client)
    assert "Paris" in text
    cut = _chat(client, stop=["Paris"])["choices"][0]
    kept = _chat(client, stop=["Paris"], include_stop_str_in_output=True)["choices"][0]
    assert cut["finish_reason"] == kept["finish_reason"] == "stop"
    assert not cut["message"]["content"].endswith("Paris") and kept["message"]["content"].endswith("Paris")
    assert kept["message"]["content"] == cut["message"]["content"] + "Paris"


def test_skip_special_tokens_false_shows_special_tokens(client: openai.OpenAI) -> None:
    both = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "extra_body": {"allowed_token_ids": [IM_START]}}
    skipped = client.completions.create(model=MODEL, **both)
    shown = client.completions.create(model=MODEL, **{**both, "extra_body": {"allowed_token_ids": [IM_START],
                                                                              "skip_special_tokens": False}})
    assert skipped.choices[0].text == ""
    assert shown.choices[0].text.replace(" ", "") == "<|im_start|>" * 3


def test_bad_words_are_never_generated(client: openai.OpenAI) -> None:
    text, _ = _greedy_ids(client, 20)
    assert "Paris" in text
    r = _chat(client, max_tokens=20, bad_words=["Paris"])
    assert "Paris" not in r["choices"][0]["message"]["content"]


def test_prompt_logprobs_on_both_routes(client: openai.OpenAI, http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 1,
                                           "prompt_logprobs": 2, "return_token_ids": True}).json()
    choice = choice0 = r["choices"][0]
    lps = choice["prompt_logprobs"]
    assert len(lps) == len(choice0["prompt_token_ids"]) == r["usage"]["prompt_tokens"] and lps[0] is None
    for tid, position in zip(choice["prompt_token_ids"][1:], lps[1:], strict=True):
        assert str(tid) in position and all(v["logprob"] <= 0 for v in position.values())
        assert len(position) in (2, 3)  # the top 2, plus the prompt's own token when it is not among them
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": FRANCE, "max_tokens": 1,
                                                    "prompt_logprobs": 0}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    # not with streaming, as vLLM
    bad = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True, "prompt_logprobs": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_logprobs"


def test_truncate_prompt_tokens_keeps_the_last_tokens(client: openai.OpenAI) -> None:
    long = "one two three four five six seven eight nine ten eleven twelve"
    r = client.completions.create(model=MODEL, prompt=long, max_tokens=1, extra_body={
        "truncate_prompt_tokens": 5, "return_token_ids": True})
    full = client.completions.create(model=MODEL, prompt=long, max_tokens=1, extra_body={"return_token_ids": True})
    assert r.usage.prompt_tokens == 5
    assert r.choices[0].model_extra["prompt_token_ids"] == full.choices[0].model_extra["prompt_token_ids"][-5:]
    right = client.completions.create(model=MODEL, prompt=long, max_tokens=1, extra_body={
        "truncate_prompt_tokens": 5, "truncation_side": "right", "return_token_ids": True})
    assert right.choices[0].model_extra["prompt_token_ids"] == full.choices[0].model_extra["prompt_token_ids"][:5]


def test_continue_final_message_and_chat_echo(http: httpx.Client) -> None:
    partial = [*FRANCE, {"role": "assistant", "content": "The capital of France is"}]
    body = {"model": MODEL, "messages": partial, "max_tokens": 8, "temperature": 0,
            "continue_final_message": True, "add_generation_prompt": False, "return_prompt_text": True}
    r = http.post("/v1/chat/completions", json=body).json()
    # the prompt ends inside the assistant's turn, not with an end of turn and a new one
    assert r["prompt_text"].endswith("The capital of France is")
    answer = r["choices"][0]["message"]["content"]
    assert "Paris" in answer and not answer.startswith("The capital")
    echoed = http.post("/v1/chat/completions", json={**body, "echo": True}).json()
    assert echoed["choices"][0]["message"]["content"] == "The capital of France is" + answer
    both = http.post("/v1/chat/completions", json={**body, "add_generation_prompt": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


def test_add_generation_prompt_false_opens_no_assistant_turn(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 1, "return_prompt_text": True}
    opened = http.post("/v1/chat/completions", json=body).json()["prompt_text"]
    closed = http.post("/v1/chat/completions", json={**body, "add_generation_prompt": False}).json()["prompt_text"]
    assert opened == closed + "<|im_start|>assistant\n"


def test_return_token_ids_match_the_text_and_tokenize(client: openai.OpenAI, http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": FRANCE, "max_tokens": 8, "temperature": 0,
                                                "return_token_ids": True}).json()
    ids = r["choices"][0]["token_ids"]
    assert len(ids) == r["usage"]["completion_tokens"]
    text = http.post("/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]
    assert text == r["choices"][0]["message"]["content"]
    tokenized = http.post("/tokenize", json={"model": MODEL, "messages": FRANCE}).json()
    assert tokenized["tokens"] == r["prompt_token_ids"] and tokenized["count"] == r["usage"]["prompt_tokens"]
    # streamed: the prompt's ids on the first chunk, each chunk's own ids after
    with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": FRANCE, "max_tokens": 8,
                                                           "temperature": 0, "stream": True,
                                                           "return_token_ids": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["prompt_token_ids"] == r["prompt_token_ids"]
    assert [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []] == ids


def test_return_tokens_as_token_ids_in_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"return_tokens_as_token_ids": True,
                                                                   "return_token_ids": True})
    content = r.choices[0].logprobs.content
    ids = r.choices[0].model_extra["token_ids"]
    assert [c.token for c in content] == [f"token_id:{t}" for t in ids if t != IM_END]
    assert all(top.token.startswith("token_id:") for c in content for top in c.top_logprobs)


def test_request_id_names_the_response(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=1, extra_body={"request_id": "abc-123"})
    assert r.id == "chatcmpl-abc-123"
    c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body={"request_id": "xyz"})
    assert c.id == "cmpl-xyz"


def test_continuous_usage_stats_put_usage_on_every_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"stream_options": {"include_usage": True,
                                                                           "continuous_usage_stats": True}})
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks)
    completions = [c.usage.completion_tokens for c in chunks]
    assert completions == sorted(completions) and completions[-1] == chunks[-1].usage.total_tokens - chunks[-1].usage.prompt_tokens


def test_cache_salt_keeps_prefix_cache_hits_apart(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "Salted list: " + ", ".join(f"entry {i}" for i in range(120))}]
    first = client.chat.completions.create(model=MODEL, messages=long, max_tokens=1, extra_body={"cache_salt": "a"})
    again = client.chat.completions.create(model=MODEL, messages=long, max_tokens=1, extra_body={"cache_salt": "a"})
    other = client.chat.completions.create(model=MODEL, messages=long, max_tokens=1, extra_body={"cache_salt": "b"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_tokenize_and_detokenize(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] > 0 and "".join(r["token_strs"]) == "Hello world"
    assert http.post("/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    # the model may be left out: the server's first model
    assert http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"] == r["tokens"]
    bad = http.post("/detokenize", json={"model": MODEL, "tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


async def test_priority_orders_the_waiting_queue(server: object, aclient: openai.AsyncOpenAI, http: httpx.Client) -> None:
    """Each request takes every engine slot (n = the server's --max-num-seqs), so they run one
    at a time: the better (lower) priority, queued later, runs before the worse one. The first
    one (long) holds the engine until both wait, then its client leaves, which frees it."""
    import asyncio
    import time

    slots = 16  # tests/conftest.py starts the conformance servers with --max-num-seqs 16
    finished: dict[str, float] = {}
    started: dict[str, float] = {}

    async def occupy(name: str, priority: int, tokens: int) -> None:
        stream = await aclient.completions.create(
            model=MODEL, prompt="Count:", max_tokens=tokens, n=slots, temperature=1.0, seed=1, stream=True,
            extra_body={"ignore_eos": True, "priority": priority})
        try:
            async for _ in stream:
                started.setdefault(name, time.monotonic())
            finished[name] = time.monotonic()
        finally:
            await stream.close()

    def waiting() -> float:
        lines = [x for x in http.get("/metrics").text.splitlines() if x.startswith("llm_requests_waiting{")]
        return sum(float(x.rsplit(" ", 1)[1]) for x in lines)

    async def until(ready: Callable[[], bool], what: str) -> None:
        for _ in range(1000):
            if ready():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"never: {what}")

    hog = asyncio.create_task(occupy("hog", 0, 1000))
    await until(lambda: "hog" in started, "the first request streams")
    late = asyncio.create_task(occupy("worse", 5, 12))
    await until(lambda: waiting() >= 1, "the worse request waits")
    early = asyncio.create_task(occupy("better", -5, 12))
    await until(lambda: waiting() >= 2, "both wait")
    assert "hog" not in finished
    hog.cancel()
    await asyncio.gather(hog, return_exceptions=True)
    await asyncio.gather(late, early)
    # the better one's first token comes first; when its last slots free, the worse one may be
    # scheduled while the better one's final chunks are still on the wire, so ends are not compared
    assert started["better"] < started["worse"]
    assert set(finished) == {"worse", "better"}
