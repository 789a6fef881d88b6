"""`/v1/embeddings` through the SDK, on each engine's server (its embedding model served beside
the chat model): shapes, base64, usage, token-id input, meaning, agreement with the model's own
library, errors, and embedding traffic beside chat streams."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL

EMBED = "all-minilm-l6-v2"
TEXTS = ["A man is eating food.", "A man is eating a piece of bread.",
         "The quarterly report shows revenue growth in every region, led by new customers in Asia."]


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_vectors_shapes_base64_and_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    r = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    assert r.model == EMBED and [d.index for d in r.data] == [0, 1, 2]
    assert all(len(d.embedding) == 384 and abs(math.sqrt(sum(x * x for x in d.embedding)) - 1) < 1e-3 for d in r.data)
    tokens = http.post("/tokenize", json={"model": EMBED, "prompt": TEXTS[0]}).json()["tokens"]
    assert tokens[0] == 101 and tokens[-1] == 102  # [CLS] ... [SEP]
    assert r.usage.prompt_tokens == r.usage.total_tokens > len(tokens)
    # base64: little-endian float32, the same vector
    raw = http.post("/v1/embeddings", json={"model": EMBED, "input": TEXTS[0], "encoding_format": "base64"}).json()
    decoded = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"
    assert max(abs(x - y) for x, y in zip(decoded, r.data[0].embedding, strict=True)) < 1e-6
    # token ids in: the same vector as the text
    by_ids = client.embeddings.create(model=EMBED, input=[tokens], encoding_format="float")
    assert by_ids.usage.prompt_tokens == len(tokens) and _cos(by_ids.data[0].embedding, r.data[0].embedding) > 0.9999
    # cutting token ids from the left keeps the last k; an input shorter than k is kept whole
    for keep, expect in [(len(tokens) + 2, len(tokens)), (3, 3)]:
        cut = http.post("/v1/embeddings", json={"model": EMBED, "input": [tokens], "truncate_prompt_tokens": keep,
                                               "truncation_side": "left"}).json()
        assert cut["usage"]["prompt_tokens"] == expect, keep
    # the model card says what it serves
    assert client.models.retrieve(EMBED).model_extra["kind"] == "embed"
    assert client.models.retrieve(MODEL).model_extra["kind"] == "generate"


def test_meaning_and_the_models_own_library(client: openai.OpenAI) -> None:
    """A paraphrase is nearer than an unrelated text; and every engine's vectors are
    sentence-transformers' own (within 1e-3 cosine), so the engines agree with each other."""
    from sentence_transformers import SentenceTransformer

    r = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    v = [d.embedding for d in r.data]
    assert _cos(v[0], v[1]) > _cos(v[0], v[2]) + 0.3
    folder = client.models.retrieve(EMBED).model_extra["root"]
    reference = SentenceTransformer(folder, device="cpu").encode(TEXTS + ["word " * 400])
    long = client.embeddings.create(model=EMBED, input="word " * 400, encoding_format="float",
                                    extra_body={"truncate_prompt_tokens": -1})
    assert long.usage.prompt_tokens == 256  # cut to the model's context, as sentence-transformers cuts it
    for ours, theirs in zip([*v, long.data[0].embedding], reference, strict=True):
        assert _cos(ours, [float(x) for x in theirs]) > 1 - 1e-3


def test_errors(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="hi")
    assert e.value.body["code"] == "wrong_model_kind" and "/v1/chat/completions" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert e.value.body["param"] == "model" and "/v1/embeddings" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBED, input=["fine", "word " * 300])
    assert e.value.body["code"] == "context_length_exceeded" and "input[1]" in e.value.body["message"]
    for body, param in [({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [[]]}, "input"),
                        ({"input": "x", "dimensions": 64}, "dimensions"), ({"input": [10**6]}, "input"),
                        ({"input": "x", "truncate_prompt_tokens": 10**4}, "truncate_prompt_tokens"),
                        ({"input": [5, 6], "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                        ({"input": " ", "add_special_tokens": False}, "input"),  # no tokens at all
                        ({"input": "x", "use_activation": False}, "use_activation"), ({"input": "x", "encoding_format": "int8"},
                                                                            "encoding_format")]:
        r = http.post("/v1/embeddings", json={"model": EMBED, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


async def test_embedding_traffic_beside_chat_streams(aclient: openai.AsyncOpenAI, http: httpx.Client) -> None:
    """A batch of 64 inputs and 16 concurrent embedding requests beside 4 chat streams: all of it
    finishes, every chat stream to its end; the requests are counted per route."""

    async def chat(i: int) -> str | None:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 5}."}], max_tokens=24, stream=True,
            extra_body={"ignore_eos": True})
        finish = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish

    async def embed(texts: list[str]) -> Any:
        return await aclient.embeddings.create(model=EMBED, input=texts, encoding_format="float")

    before = _counted(http)
    many = [f"Sentence number {i} is about {'cats' if i % 2 else 'the stock market'}." for i in range(64)]
    results = await asyncio.gather(*(chat(i) for i in range(4)), embed(many),
                                   *(embed([f"Request {i}.", TEXTS[i % 3]]) for i in range(16)))
    assert results[:4] == ["length"] * 4
    assert len(results[4].data) == 64 and all(len(r.data) == 2 for r in results[5:])
    # the same text in different batches (different padding) gets the same vector
    assert _cos(results[5].data[1].embedding, results[8].data[1].embedding) > 0.9999
    assert _counted(http) - before == 17
    prefix = f'llm_prompt_tokens_total{{model="{EMBED}"'  # input tokens are counted like prompts
    assert any(x.startswith(prefix) and float(x.rsplit(" ", 1)[1]) > 0 for x in _metrics(http))


def _metrics(http: httpx.Client) -> list[str]:
    return http.get("/metrics").text.splitlines()


def _counted(http: httpx.Client) -> float:
    lines = [x for x in _metrics(http)
             if x.startswith("llm_requests_total{") and 'route="/v1/embeddings"' in x and 'status="200"' in x]
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines)


def test_langchain_openai_embeddings(embedding_server: Any) -> None:
    """LangChain's OpenAIEmbeddings, as the README tells users to configure it (it would send
    tiktoken's ids otherwise, and tiktoken downloads its vocabulary)."""
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model=EMBED, base_url=embedding_server.base_url, api_key="none",
                          check_embedding_ctx_length=False, max_retries=0)
    docs = lc.embed_documents(TEXTS)
    query = lc.embed_query("Someone is having a meal.")
    assert len(docs) == 3 and len(query) == 384
    assert _cos(query, docs[0]) > _cos(query, docs[2])
