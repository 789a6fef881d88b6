"""Operating it: API keys, per-key limits and their headers, the bounded queue, request caps,
request ids and metrics, on a live server (Transformers engine: it starts in seconds)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from server.auth import Keys, KeysFileError, digest, load_keys_file
from server.errors import Overloaded
from server.limits import Admission
from tests.conftest import MODEL
from tests.server_process import ROOT, ServerProcess

LIMITED, OPEN, SMALL, ONE = "sk-limited-0001", "sk-open-00000002", "sk-small-0003", "sk-one-at-a-time"
HI = [{"role": "user", "content": "Say hi."}]
LONG = [{"role": "user", "content": "Write a very long essay about the history of the world."}]


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "limited", "key": LIMITED, "requests_per_minute": 4, "max_concurrent": 1},
        {"name": "open", "key": OPEN},
        {"name": "small", "key": SMALL, "tokens_per_minute": 300},
        {"name": "one", "key": ONE, "max_concurrent": 1},
    ]}))
    proc = ServerProcess(
        "--engine", "transformers", "--api-keys-file", str(keys), "--max-num-seqs", "2",
        "--max-queued-requests", "1", "--max-request-bytes", "20000", "--max-messages", "5",
        "--max-tokens-limit", "300", name="operations",
    )
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def _client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"), ("GET", "/v1/no-such-route"), ("GET", "/v1/"),
    ("POST", "/tokenize"), ("POST", "/detokenize"),
])
def test_every_v1_path_needs_a_key(ops: ServerProcess, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-wrong-key-123"}, {"Authorization": LIMITED}):
        r = httpx.request(method, ops.url + path, headers=headers, json={})
        assert r.status_code == 401, (path, headers, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-request-id"]


def test_probes_and_metrics_stay_open(ops: ServerProcess) -> None:
    for path in ("/health", "/ready", "/live", "/metrics"):
        assert httpx.get(ops.url + path).status_code == 200, path


def test_the_sdk_with_a_key_works_and_without_one_gets_its_error(ops: ServerProcess) -> None:
    r = _client(ops, OPEN).chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        _client(ops, "sk-not-a-key-at-all").models.list()


def test_request_ids_are_returned_and_taken_from_the_client(ops: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {OPEN}"}
    r = httpx.get(ops.url + "/v1/models", headers={**auth, "x-request-id": "trace-abc.123"})
    assert r.headers["x-request-id"] == "trace-abc.123"
    made = httpx.get(ops.url + "/v1/models", headers=auth).headers["x-request-id"]
    assert len(made) == 32 and made != "trace-abc.123"
    # a header that could forge log lines is replaced, not echoed
    assert httpx.get(ops.url + "/health", headers={"x-request-id": "a b\tc"}).headers["x-request-id"] != "a b\tc"


# --------------------------------------------------------------------------- per-key limits


def test_requests_per_minute_trip_with_openai_headers(ops: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {LIMITED}"}
    body = {"model": MODEL, "messages": HI, "max_tokens": 2}
    remaining = []
    for _ in range(4):
        r = httpx.post(ops.base_url + "/chat/completions", headers=auth, json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-limit-requests"] == "4"
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [3, 2, 1, 0]
    r = httpx.post(ops.base_url + "/chat/completions", headers=auth, json=body, timeout=60)
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "requests" and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    # every response to the key carries the headers, not only generations
    assert httpx.get(ops.base_url + "/models", headers=auth).headers["x-ratelimit-remaining-requests"] == "0"
    # other keys are not affected
    assert _client(ops, OPEN).chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices


def test_tokens_per_minute_count_prompt_and_max_tokens(ops: ServerProcess) -> None:
    small = _client(ops, SMALL)
    with pytest.raises(openai.RateLimitError) as e:  # more than the whole minute's budget
        small.chat.completions.create(model=MODEL, messages=HI, max_tokens=290)
    assert e.value.body["type"] == "tokens"
    raw = small.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=30)
    assert raw.headers["x-ratelimit-limit-tokens"] == "300"
    # the reservation (prompt + 30) became what was really used once the answer ended
    used = raw.parse().usage.total_tokens
    left = int(httpx.get(ops.base_url + "/models", headers={"Authorization": f"Bearer {SMALL}"})
               .headers["x-ratelimit-remaining-tokens"])
    assert left == 300 - used


async def test_concurrent_requests_per_key(ops: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=ops.base_url, api_key=ONE, max_retries=0)
    stream = await client.chat.completions.create(model=MODEL, messages=LONG, max_tokens=200, stream=True)
    try:
        with pytest.raises(openai.RateLimitError) as e:
            await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        assert "concurrent" in e.value.message
    finally:
        await stream.close()
    # the stream's slot is given back when it closes
    for _ in range(50):
        try:
            await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
            break
        except openai.RateLimitError:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the key's concurrency slot was not given back")


# --------------------------------------------------------------------------- queue and caps


async def test_a_full_queue_answers_429_at_once_while_admitted_requests_finish(ops: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=ops.base_url, api_key=OPEN, max_retries=0, timeout=120)

    async def long_answer() -> int:
        r = await client.chat.completions.create(model=MODEL, messages=LONG, max_tokens=80,
                                                 extra_body={"min_tokens": 80})
        return r.usage.completion_tokens

    def gauge(name: str) -> float:
        lines = [x for x in httpx.get(ops.url + "/metrics").text.splitlines() if x.startswith(name + "{")]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    # 2 slots in the engine + 1 place in the queue: wait until they are taken
    admitted = [asyncio.create_task(long_answer()) for _ in range(3)]
    try:
        for _ in range(200):
            if gauge("llm_requests_running") == 2 and gauge("llm_requests_waiting") == 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the three requests never filled the engine and the queue")
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as e:
            await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        assert time.monotonic() - started < 2.0  # answered, not parked behind the queue
        assert e.value.body["type"] == "server_overloaded"
        assert e.value.response.headers["retry-after"] == "1"
        assert await asyncio.gather(*admitted) == [80, 80, 80]
    finally:
        for task in admitted:
            task.cancel()
        await asyncio.gather(*admitted, return_exceptions=True)


def test_request_caps(ops: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {OPEN}"}
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 30000}]}
    r = httpx.post(ops.base_url + "/chat/completions", headers=auth, json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    client = _client(ops, OPEN)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI * 6, max_tokens=2)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=301)
    assert e.value.body["param"] == "max_tokens"


def test_metrics_move_after_requests(ops: ServerProcess) -> None:
    def scrape() -> dict[str, float]:
        out: dict[str, float] = {}
        for line in httpx.get(ops.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    before = scrape()
    _client(ops, OPEN).chat.completions.create(model=MODEL, messages=HI, max_tokens=5, extra_body={"min_tokens": 5})
    assert httpx.get(ops.base_url + "/models").status_code == 401
    after = scrape()
    ok = f'llm_requests_total{{model="{MODEL}",route="/v1/chat/completions",status="200"}}'
    assert after[ok] == before.get(ok, 0) + 1
    unauthorized = 'llm_requests_total{model="",route="/v1/models",status="401"}'  # no model was chosen
    assert after[unauthorized] == before.get(unauthorized, 0) + 1
    assert after[f'llm_generation_tokens_total{{model="{MODEL}"}}'] >= before.get(f'llm_generation_tokens_total{{model="{MODEL}"}}', 0) + 5
    count = f'llm_time_to_first_token_seconds_count{{model="{MODEL}"}}'
    assert after[count] == before.get(count, 0) + 1
    assert after[f'llm_inter_token_latency_seconds_count{{model="{MODEL}"}}'] >= 4
    assert after[f'llm_requests_running{{model="{MODEL}"}}'] == 0
    assert f'llm_kv_cache_usage_ratio{{model="{MODEL}"}}' in after


# --------------------------------------------------------------------------- units


async def test_admission_is_fifo_and_bounded() -> None:
    adm = Admission(running=2, max_queued=2)
    await adm.acquire(2)
    order: list[str] = []

    async def wait(name: str, n: int) -> None:
        await adm.acquire(n)
        order.append(name)

    first = asyncio.create_task(wait("first", 1))
    second = asyncio.create_task(wait("second", 2))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await adm.acquire(1)
    adm.release(2)
    await asyncio.sleep(0.01)
    assert order == ["first"]  # the second needs 2 slots; only one is free
    adm.release(1)
    await asyncio.sleep(0.01)
    assert order == ["first", "second"] and adm.in_use == 2 and adm.waiting == 0
    await asyncio.gather(first, second)


async def test_admission_orders_waiting_requests_by_priority_then_arrival() -> None:
    adm = Admission(running=1, max_queued=8)
    await adm.acquire(1)
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await adm.acquire(1, priority)
        order.append(name)
        adm.release(1)

    tasks = []
    for name, priority in (("late-low", 5), ("a", 0), ("urgent", -3), ("b", 0)):
        tasks.append(asyncio.create_task(wait(name, priority)))
        await asyncio.sleep(0.01)
    adm.release(1)
    await asyncio.gather(*tasks)
    assert order == ["urgent", "a", "b", "late-low"]


async def test_admission_puts_every_interactive_request_before_waiting_batch_lines() -> None:
    adm = Admission(running=1, max_queued=8)
    await adm.acquire(1)
    order: list[str] = []

    async def wait(name: str, priority: int, background: bool) -> None:
        await adm.acquire(1, priority, background=background)
        order.append(name)
        adm.release(1)

    tasks = []
    for name, priority, background in (("line-1", -9, True), ("late-low", 5, False), ("line-2", 0, True), ("a", 0, False)):
        tasks.append(asyncio.create_task(wait(name, priority, background)))
        await asyncio.sleep(0.01)
    adm.release(1)
    await asyncio.gather(*tasks)
    assert order == ["a", "late-low", "line-1", "line-2"]  # a batch line's own priority orders only the lines


def test_keys_file_formats_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "keys.json"
    good.write_text(json.dumps({"keys": [{"name": "a", "sha256": digest("sk-abcdefgh").hex(), "admin": True}]}))
    keys = Keys(load_keys_file(good))
    assert keys.authenticate("Bearer sk-abcdefgh").name == "a"
    assert load_keys_file(ROOT / "deploy" / "keys.example.yaml")[0].name == "team-a"
    for text, message in [
        ("keys: []", "non-empty list"),
        ("keys: [{name: a}]", "exactly one of 'key' and 'sha256'"),
        ("keys: [{name: a, key: short}]", "at least 8"),
        ("keys: [{name: a, key: sk-12345678, requests_per_minute: 0}]", "positive integer"),
        ("keys: [{name: a, key: sk-12345678, colour: red}]", "unknown field(s) colour"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(KeysFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_keys_file(bad)


def test_a_bad_keys_file_stops_the_server_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "keys.yaml"
    bad.write_text("keys: [{name: a}]")
    r = subprocess.run([sys.executable, "-m", "server", "serve", "--api-keys-file", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "keys[0]" in r.stderr


def test_rejections_are_counted_by_reason(ops: ServerProcess) -> None:
    text = httpx.get(ops.url + "/metrics").text
    counted = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llm_rate_limit_rejections_total{")}
    # the module's tests above tripped each of these at least once
    assert counted.get("requests", 0) >= 1 and counted.get("tokens", 0) >= 1
    assert counted.get("concurrency", 0) >= 1 and counted.get("queue_full", 0) >= 1


# --------------------------------------------------------------------------- graceful shutdown


def test_sigterm_drains_running_requests_then_exits_0() -> None:
    import signal
    import threading

    proc = ServerProcess("--engine", "transformers", "--shutdown-timeout", "60", name="drain").wait_ready()
    try:
        body = {"model": MODEL, "messages": LONG, "max_tokens": 60, "min_tokens": 60, "stream": True,
                "stream_options": {"include_usage": True}}
        frames: list[str] = []
        started = threading.Event()

        def consume() -> None:
            with httpx.stream("POST", proc.base_url + "/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        frames.append(line[6:])
                        started.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert started.wait(60)
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # draining: not ready, new work refused, the running stream goes on
        health = httpx.get(proc.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "stopping"
        r = httpx.post(proc.base_url + "/chat/completions", json={"model": MODEL, "messages": HI}, timeout=5)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        reader.join(120)
        assert frames[-1] == "[DONE]"
        assert '"completion_tokens":60' in frames[-2]  # the whole answer, not a cut-off one
        assert proc.wait_exit(30) == 0
    finally:
        proc.stop()


def test_shutdown_timeout_aborts_what_is_left_and_still_exits_0() -> None:
    import signal

    proc = ServerProcess("--engine", "transformers", "--shutdown-timeout", "1", name="drain-timeout").wait_ready()
    try:
        body = {"model": MODEL, "messages": LONG, "max_tokens": 4000, "min_tokens": 4000, "stream": True}
        with httpx.stream("POST", proc.base_url + "/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            assert proc.wait_exit(30) == 0
        assert time.monotonic() - stopped < 15  # 1 s to drain, then uvicorn's 5 s, not 4000 tokens
        assert "Traceback" not in proc.log_text()
    finally:
        proc.stop()


def test_the_terminal_chat_with_keys(ops: ServerProcess) -> None:
    import subprocess
    import sys

    chat = [sys.executable, "-m", "clients.chat", "--base-url", ops.base_url, "--prompt", "Say hi."]
    refused = subprocess.run([*chat, "--api-key", "sk-wrong-key-123"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1 and "refused the API key" in refused.stderr
    ok = subprocess.run([*chat, "--api-key", OPEN, "--max-tokens", "8"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
