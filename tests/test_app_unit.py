"""Route behaviour that a live engine cannot easily be made to show: failures mid-stream,
engine errors, loading and failed states. Uses the real tokenizer and a fake engine."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server import models
from server.app import create_app
from server.config import DEFAULT_EMBEDDING_MODEL_NAME, Settings
from server.registry import Served
from server.tokenizer import Tokenizer
from tests.fake_engine import FakeEngine

MODEL = "smollm2-135m-instruct"
# the apps' request logs go to a scratch file, not the user's cache folder
UNIT = Settings(embedding_model=None, database_url=f"sqlite:///{Path(tempfile.mkdtemp(prefix='llm-unit-')) / 'requests.db'}")
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(models.resolve(Settings()))


def _served(tokenizer: Tokenizer, engine: FakeEngine) -> Served:
    return Served(name=MODEL, engine=engine, tokenizer=tokenizer, created=0, fingerprint="fp_test")


def _client(tokenizer: Tokenizer, engine: FakeEngine, settings: Settings = UNIT) -> Iterator[TestClient]:
    app = create_app(settings, loader=lambda s, progress: _served(tokenizer, engine))
    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield c


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine([100, 101, 102, 103], ["a", "b", "c", "d"])


@pytest.fixture
def client(tokenizer: Tokenizer, engine: FakeEngine) -> Iterator[TestClient]:
    yield from _client(tokenizer, engine)


def test_non_stream_aggregates(client: TestClient) -> None:
    data = client.post("/v1/chat/completions", json=CHAT).json()
    assert data["choices"][0]["message"]["content"] == "abcd"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 4
    # the fake engine has no prefix cache: the object is omitted, not null
    assert "prompt_tokens_details" not in data["usage"]
    assert data["system_fingerprint"] == "fp_test"


def test_failure_after_stream_started_is_an_sse_error_event(tokenizer: Tokenizer) -> None:
    engine = FakeEngine([100, 101, 102, 103], ["a", "b", "c", "d"], fail_after=2)
    for c in _client(tokenizer, engine):
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status_code == 200
            frames = [f for f in r.read().decode().split("\n\n") if f.startswith("data: ")]
        last = json.loads(frames[-1][6:])
        assert last["error"]["type"] == "server_error"
        assert "failed on purpose" in last["error"]["message"]
        assert set(last["error"]) == {"message", "type", "param", "code"}
        assert "data: [DONE]" not in frames  # a failed stream does not look complete
        assert [json.loads(f[6:])["choices"][0]["delta"].get("content") for f in frames[1:3]] == ["a", "b"]
        # the failed request was aborted in the engine
        assert engine.aborted


def test_engine_failure_without_stream_is_a_500_in_openai_shape(tokenizer: Tokenizer) -> None:
    engine = FakeEngine([100, 101], ["a", "b"], fail_after=1)
    for c in _client(tokenizer, engine):
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error"


def test_n_fan_out_aborts_unfinished_siblings(tokenizer: Tokenizer) -> None:
    engine = FakeEngine([100, 101, 102, 103], ["a", "b", "c", "d"], fail_after=3)
    for c in _client(tokenizer, engine):
        assert c.post("/v1/chat/completions", json={**CHAT, "n": 3}).status_code == 500
        assert len(engine.aborted) == 3


def test_dead_engine_turns_health_503(client: TestClient, engine: FakeEngine) -> None:
    assert client.get("/health").status_code == 200
    engine.dead = True
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "failed"
    assert client.get("/ready").status_code == 503
    assert client.get("/live").status_code == 200
    err = client.post("/v1/chat/completions", json=CHAT)
    assert err.status_code == 503 and err.json()["error"]["code"] == "service_unavailable"


def test_the_optional_embedding_model_dying_leaves_the_server_ready(tokenizer: Tokenizer, engine: FakeEngine) -> None:
    vectors = FakeEngine([1], ["x"])

    def loader(settings: Settings, progress: object) -> Served:
        if settings.model_name == MODEL:
            return _served(tokenizer, engine)
        return Served(name=settings.model_name, engine=vectors, tokenizer=tokenizer, created=0,  # type: ignore[arg-type]
                      fingerprint="fp", kind="embed")

    settings = replace(UNIT, embedding_model="default")
    with TestClient(create_app(settings, loader=loader, estimator=lambda model, device, total: 1)) as c:
        deadline = time.monotonic() + 10
        while c.get("/health").json()["models"] != {MODEL: "ready", DEFAULT_EMBEDDING_MODEL_NAME: "ready"}:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        vectors.dead = True
        r = c.get("/health")
        assert r.status_code == 200 and r.json()["models"][DEFAULT_EMBEDDING_MODEL_NAME] == "failed"
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200  # the chat model serves on
        engine.dead = True  # the required chat model dying still takes the server out of rotation
        assert c.get("/health").status_code == 503


def test_loading_answers_503_then_serves(tokenizer: Tokenizer, engine: FakeEngine,
                                         caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def slow_loader(_: Settings, progress: object) -> Served:
        release.wait(10)
        return _served(tokenizer, engine)

    with TestClient(create_app(UNIT, loader=slow_loader)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        with caplog.at_level(logging.INFO, logger="server.errors"):
            err = c.post("/v1/chat/completions", json=CHAT)
            bad = c.post("/v1/chat/completions", json={**CHAT, "seed": 2**64})
        assert err.status_code == 503 and "loading" in err.json()["error"]["message"]
        assert bad.status_code == 400
        # the server's state (a 503) is one INFO line, a client's mistake none; ERROR is for faults
        records = [r for r in caplog.records if r.name == "server.errors"]
        assert [r.levelname for r in records] == ["INFO"] and "503" in records[0].getMessage()
        assert c.get("/v1/models").json()["data"][0]["id"] == MODEL
        release.set()
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_failed_load_reports_and_calls_on_fatal() -> None:
    fatal: list[str] = []

    def broken(_: Settings, progress: object) -> Served:
        raise models.ModelSourceError("no such model, do X")

    with TestClient(create_app(UNIT, loader=broken, on_fatal=fatal.append)) as c:
        deadline = time.monotonic() + 5
        while not fatal:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = c.get("/health")
        assert r.status_code == 503 and "no such model, do X" in r.json()["detail"]
    assert fatal == ["no such model, do X"]


def test_token_bytes_rebuild_multibyte_text(tokenizer: Tokenizer) -> None:
    for text in ("Привет, мир", "北京欢迎你", "سلام دوست من", "naïve café 🚀"):
        ids = tokenizer.hf.encode(text, add_special_tokens=False)
        assert b"".join(tokenizer.token_bytes(i) for i in ids).decode() == text


def test_chat_template_is_the_models_own(tokenizer: Tokenizer) -> None:
    ids = tokenizer.chat_prompt([{"role": "user", "content": "hi"}])
    text = tokenizer.hf.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")


def test_logprobs_above_the_servers_limit_are_refused_before_streaming(tokenizer: Tokenizer, engine: FakeEngine) -> None:
    app = create_app(replace(UNIT, max_logprobs=2), loader=lambda s, progress: _served(tokenizer, engine))
    with TestClient(app) as c:
        while c.get("/health").status_code != 200:
            time.sleep(0.01)
        r = c.post("/v1/chat/completions", json={**CHAT, "stream": True, "logprobs": True, "top_logprobs": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
        assert c.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2}).status_code == 200


def test_metrics_can_require_a_key(tokenizer: Tokenizer, engine: FakeEngine) -> None:
    settings = replace(UNIT, api_key=("sk-metrics-1",), metrics_require_key=True)
    for c in _client(tokenizer, engine, settings):
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer sk-metrics-1"}).status_code == 200
        assert c.get("/live").status_code == 200  # probes stay open
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 401
        ok = c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-metrics-1"})
        assert ok.status_code == 200 and ok.headers["x-request-id"]


def test_chat_page_is_open_and_can_be_turned_off(tokenizer: Tokenizer, engine: FakeEngine) -> None:
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    keyed = replace(UNIT, api_key=("sk-page-1",))
    for c in _client(tokenizer, engine, keyed):
        # the page holds no data: a browser's navigation (which cannot send a key) gets it; its data needs the key
        page = c.get("/", headers=browser)
        assert page.status_code == 200 and "/chat/assets/app.js" in page.text
        assert c.get("/chat").text == page.text and c.get("/chat/assets/app.css").status_code == 200
        assert c.get("/v1/conversations").status_code == 401
        assert c.get("/").json()["chat"] == "/chat"
    for c in _client(tokenizer, FakeEngine([100], ["a"]), replace(UNIT, chat_page=False)):
        assert c.get("/", headers=browser).json()["chat"] is None
        assert c.get("/chat").status_code == 404 and c.get("/chat/assets/app.js").status_code == 404
