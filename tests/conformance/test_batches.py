"""The Batch API through the openai SDK, on each engine: upload, create, poll, download; bad
files and bad lines; a failing line in the error file; cancel mid-batch; list and pages.
(Keys, priority and durability are engine-independent: tests/test_batches.py.)"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion

from tests.conftest import EMBED_MODEL, MODEL

ENDED = ("completed", "failed", "cancelled", "expired")


def chat_line(custom_id: str, content: str, max_tokens: int = 8, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     "temperature": 0, **body}}


def upload(client: openai.OpenAI, lines: list[dict[str, Any]] | list[str]) -> FileObject:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    return client.files.create(file=("requests.jsonl", text.encode()), purpose="batch")


def wait(client: openai.OpenAI, batch_id: str, timeout: float = 240, until: tuple[str, ...] = ENDED) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until or time.monotonic() > deadline:
            return batch
        time.sleep(0.3)


def results(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    lines = [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id appears twice"
    return by_id


def test_upload_create_poll_download(client: openai.OpenAI) -> None:
    prompts = {"france": "What is the capital of France?", "two": "What is 1 + 1?", "hi": "Say hello."}
    f = upload(client, [chat_line(k, v) for k, v in prompts.items()])
    assert (f.purpose, f.status, f.filename) == ("batch", "processed", "requests.jsonl") and f.bytes > 0
    created = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                    metadata={"job": "nightly"})
    assert created.status == "validating" and created.metadata == {"job": "nightly"}
    batch = wait(client, created.id)
    assert batch.status == "completed" and batch.error_file_id is None, batch
    assert batch.request_counts is not None and (batch.request_counts.total, batch.request_counts.completed) == (3, 3)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.expires_at
    out = results(client, batch.output_file_id)
    assert set(out) == set(prompts)
    for custom_id in prompts:
        response = out[custom_id]["response"]
        assert response["status_code"] == 200 and response["request_id"] and out[custom_id]["id"].startswith("batch_req_")
        ChatCompletion.model_validate(response["body"])  # the body a request gets (lines run side by side, so
        # bf16 batching may part greedy answers from a lone request's: what is checked is that they answer)
    assert "Paris" in out["france"]["response"]["body"]["choices"][0]["message"]["content"]
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in out.values())
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    output = client.files.retrieve(batch.output_file_id or "")
    assert output.purpose == "batch_output"


def test_embeddings_and_responses_batches(client: openai.OpenAI) -> None:
    texts = ["a cat", "a dog"]
    f = upload(client, [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": EMBED_MODEL, "input": t}} for i, t in enumerate(texts)])
    r = upload(client, [{"custom_id": "r", "method": "POST", "url": "/v1/responses",
                         "body": {"model": MODEL, "input": "Say hi.", "max_output_tokens": 8, "store": False}}])
    eb = client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    rb = client.batches.create(input_file_id=r.id, endpoint="/v1/responses", completion_window="24h")
    eb, rb = wait(client, eb.id), wait(client, rb.id)
    assert (eb.status, rb.status) == ("completed", "completed")
    vectors = results(client, eb.output_file_id)
    assert len(vectors["e0"]["response"]["body"]["data"][0]["embedding"]) == 384
    answer = results(client, rb.output_file_id)["r"]["response"]["body"]
    assert answer["object"] == "response" and answer["status"] in ("completed", "incomplete")


def test_bad_files_and_bad_lines(client: openai.OpenAI, http: httpx.Client) -> None:
    # not JSON Lines: a 400 at upload, naming the line
    with pytest.raises(openai.BadRequestError) as e:
        upload(client, [json.dumps(chat_line("a", "hi")), "{not json"])
    assert "line 2" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"
    # a missing file, or one that is not a batch file: a 400 at create
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert e.value.body["param"] == "input_file_id"
    data = client.files.create(file=("notes.txt", b"hello"), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=data.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert "purpose" in e.value.body["message"]
    r = http.post("/v1/batches", json={"input_file_id": data.id, "endpoint": "/v1/moderations", "completion_window": "24h"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "endpoint"
    # lines that are not requests: the batch fails, each error naming its line
    line = chat_line("dup", "hi")
    f = upload(client, [line, line, {**chat_line("u", "hi"), "url": "/v1/completions"}, {"custom_id": "m"},
                        chat_line("\ud800", "hi")])  # a lone surrogate: no database can store it
    batch = wait(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                               completion_window="24h").id)
    assert batch.status == "failed" and batch.failed_at and batch.errors is not None and batch.errors.data
    found = {(x.code, x.line) for x in batch.errors.data}
    assert {("duplicate_custom_id", 2), ("invalid_url", 3), ("missing_required_parameter", 4),
            ("invalid_custom_id", 5)} <= found, found


def test_a_failing_line_goes_to_the_error_file_and_the_batch_goes_on(client: openai.OpenAI) -> None:
    lines = [chat_line("good", "Say hi."), chat_line("bad", "Say hi.", seed=2**70),
             {**chat_line("stream", "hi"), "body": {**chat_line("s", "hi")["body"], "stream": True}},
             {**chat_line("nomodel", "hi"), "body": {**chat_line("n", "hi")["body"], "model": "no-such-model"}}]
    batch = wait(client, client.batches.create(input_file_id=upload(client, lines).id,
                                               endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 3)
    assert set(results(client, batch.output_file_id)) == {"good"}
    errors = results(client, batch.error_file_id)
    assert {k: v["response"]["status_code"] for k, v in errors.items()} == {"bad": 400, "stream": 400, "nomodel": 404}
    assert errors["stream"]["response"]["body"]["error"]["param"] == "stream"


def test_cancel_mid_batch_keeps_what_finished(client: openai.OpenAI) -> None:
    lines = [chat_line(f"c{i}", f"Write a long story about the number {i}.", max_tokens=200, ignore_eos=True)
             for i in range(24)]
    created = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    wait(client, created.id, until=("in_progress", *ENDED))
    cancelling = client.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait(client, created.id, timeout=120)
    assert batch.status == "cancelled" and batch.cancelled_at, batch
    done, failed = results(client, batch.output_file_id), results(client, batch.error_file_id)
    assert not set(done) & set(failed) and set(done) | set(failed) == {f"c{i}" for i in range(24)}
    assert len(done) < 24 and all(f["error"]["code"] == "batch_cancelled" for f in failed.values())
    assert batch.request_counts is not None and batch.request_counts.completed == len(done)


def test_list_and_pages(client: openai.OpenAI, http: httpx.Client) -> None:
    f = upload(client, [chat_line("x", "hi", max_tokens=1)])
    ids = [client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
           for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == ids[0]
    every = [b.id for b in client.batches.list(limit=1)]  # the SDK follows the pages
    assert every[:3] == ids[::-1]
    assert http.get("/v1/batches", params={"limit": 0}).status_code == 400
    assert http.get("/v1/batches/batch_nope").status_code == 404
    page = client.files.list(purpose="batch", limit=1)
    assert len(page.data) == 1 and page.data[0].purpose == "batch"
    assert client.files.retrieve(f.id).id == f.id
    for batch_id in ids:
        wait(client, batch_id)
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
