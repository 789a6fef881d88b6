"""/v1/completions (the legacy text route) through the openai SDK."""

from __future__ import annotations

import json

import httpx
import openai
from openai.types import Completion

from tests.conftest import MODEL

PROMPT = "The capital of France is"


def test_plain_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_raw_matches_schema_and_default_max_tokens(http: httpx.Client) -> None:
    data = http.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "temperature": 0}).json()
    Completion.model_validate(data)
    assert data["choices"][0]["logprobs"] is None
    # OpenAI's default for this route is 16 tokens
    assert data["usage"]["completion_tokens"] == 16
    assert data["choices"][0]["finish_reason"] == "length"


def test_prompt_list_times_n(client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "One, two, three,"]
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0.8, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    single = [client.completions.create(model=MODEL, prompt=p, max_tokens=1).usage.prompt_tokens for p in prompts]
    assert r.usage.prompt_tokens == sum(single)
    assert r.usage.completion_tokens <= 16


def test_token_id_prompts_equal_text_prompts(client: openai.OpenAI) -> None:
    from transformers import AutoTokenizer

    root = client.models.retrieve(MODEL).model_extra["root"]
    ids = AutoTokenizer.from_pretrained(root).encode(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    both = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=5, temperature=0)
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert [c.text for c in both.choices] == [by_text.choices[0].text] * 2


def test_echo(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert val <= 0
        assert len(top) == 3
        assert max(top.values()) == top[tok]


def test_echo_with_logprobs_covers_the_prompt(http: httpx.Client) -> None:
    data = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1},
    ).json()
    choice = data["choices"][0]
    lp = choice["logprobs"]
    n_prompt = data["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == n_prompt + 2
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v is not None for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][n_prompt] == len(PROMPT)


def test_stop_and_seed(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert " 7" not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    kw = dict(model=MODEL, prompt="My favourite food is", max_tokens=10, temperature=1.0)
    assert client.completions.create(seed=9, **kw).choices[0].text == client.completions.create(seed=9, **kw).choices[0].text


def test_streaming_completion(http: httpx.Client, client: openai.OpenAI) -> None:
    with http.stream(
        "POST", "/v1/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}},
    ) as r:
        frames = [f for f in r.read().decode().split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    for c in chunks:
        assert c["object"] == "text_completion"
        for ch in c["choices"]:
            # as OpenAI streams it: finish_reason is null until the last chunk of a choice
            assert set(ch) == {"index", "text", "logprobs", "finish_reason"}
            Completion.model_validate({**c, "choices": [{**ch, "finish_reason": ch["finish_reason"] or "length"}]})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text


def test_streaming_echo_and_logprobs(client: openai.OpenAI) -> None:
    text, tokens = "", []
    for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True, echo=True, logprobs=1
    ):
        for ch in c.choices:
            text += ch.text
            if ch.logprobs:
                tokens += ch.logprobs.tokens
    assert text.startswith(PROMPT)
    assert "".join(tokens) == text
