"""Many models in one server, live: the default model on the engine under test beside a tiny
Llama on the Transformers engine, loaded lazily, through the admin API, and unloaded under
traffic; aliases with weighted, sticky variants; failing loads; memory refusal and eviction."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import ENGINE_ARGS, ENGINES, MODEL
from tests.server_process import ServerProcess
from tests.tiny_model import make_tiny_llama

ADMIN, USER = "sk-admin-many-models", "sk-user-many-models"
HI = [{"role": "user", "content": "hi"}]
ENGINE = ENGINES[0]  # the default model runs on the first engine under test; the tiny one on transformers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


class Many:
    def __init__(self, proc: ServerProcess, db: Path) -> None:
        self.proc, self.db = proc, db
        self.admin = httpx.Client(base_url=proc.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=120)
        self.sdk = openai.OpenAI(base_url=proc.base_url, api_key=USER, max_retries=0, timeout=120)

    def state(self, name: str) -> dict[str, Any]:
        r = self.admin.get(f"/v1/admin/models/{name}")
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    def wait_state(self, name: str, *states: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            data = self.state(name)
            if data["state"] in states:
                return data
            assert time.monotonic() < deadline, data
            time.sleep(0.1)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        self.admin.get("/v1/usage")  # waits until the request log has written what it holds
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql).fetchall()


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Iterator[Many]:
    folder = tmp_path_factory.mktemp("many")
    settings: dict[str, Any] = {"kv_cache_space": 1}
    if ENGINE == "vllm":
        settings["enforce_eager"] = True
    (folder / "models.yaml").write_text(yaml.safe_dump({
        "models": [
            {"name": MODEL, "engine": ENGINE, "settings": settings},
            {"name": "tiny", "source": str(tiny), "engine": "transformers", "preload": False,
             "settings": {"kv_cache_space": 0.1, "max_num_seqs": 8}},
        ],
        "aliases": {"chat": MODEL, "trial": {MODEL: 3, "tiny": 1}},
    }))
    (folder / "keys.yaml").write_text(yaml.safe_dump({"keys": [
        {"name": "ops", "key": ADMIN, "admin": True}, {"name": "app", "key": USER}]}))
    db = folder / "requests.db"
    proc = ServerProcess("--models-file", str(folder / "models.yaml"), "--api-keys-file", str(folder / "keys.yaml"),
                         "--database-url", f"sqlite:///{db}", name="many-models")
    try:
        yield Many(proc.wait_ready(), db)
    finally:
        proc.stop()


def test_lazy_model_is_listed_and_loaded_by_its_first_request(many: Many) -> None:
    metrics = httpx.get(many.proc.url + "/metrics").text  # each arm of an alias is counted from 0
    for model in (MODEL, "tiny"):
        assert f'llm_alias_requests_total{{alias="trial",model="{model}"}} 0.0' in metrics
    listed = {m.id: m for m in many.sdk.models.list().data}
    assert set(listed) == {MODEL, "tiny", "chat", "trial"}
    assert listed["tiny"].model_extra["state"] == "unloaded"  # type: ignore[index]
    assert listed["trial"].model_extra["variants"] == {MODEL: 0.75, "tiny": 0.25}  # type: ignore[index]
    health = httpx.get(many.proc.url + "/health").json()
    assert health["status"] == "ready" and health["models"] == {MODEL: "ready", "tiny": "unloaded"}

    r = many.sdk.chat.completions.create(model="tiny", messages=HI, max_tokens=3)  # waits for the load
    assert r.model == "tiny" and r.usage is not None and r.usage.completion_tokens == 3
    tiny = many.state("tiny")
    assert tiny["state"] == "ready" and tiny["engine"] == "transformers" and tiny["requests_served"] == 1
    assert tiny["memory"]["estimated_bytes"] > 0 and tiny["memory"]["measured_bytes"] is not None
    assert tiny["load_seconds"] is not None and tiny["max_model_len"] == 1024
    main = many.state(MODEL)
    assert main["engine"] == ENGINE and main["preload"] is True and main["memory"]["footprint_bytes"] > 0


def test_admin_api_needs_an_admin_key(many: Many) -> None:
    user = {"authorization": f"Bearer {USER}"}
    for method, path in (("GET", "/v1/admin/models"), ("GET", f"/v1/admin/models/{MODEL}"), ("POST", "/v1/admin/models"),
                         ("DELETE", f"/v1/admin/models/{MODEL}"), ("GET", "/v1/admin/system")):
        r = httpx.request(method, many.proc.url + path, headers=user, json={"name": "x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_permissions", (method, path)
        assert httpx.request(method, many.proc.url + path).status_code == 401
    assert many.state(MODEL)["state"] == "ready"  # nothing was unloaded


def test_system_reports_the_machine_and_what_the_models_hold(many: Many) -> None:
    data = many.admin.get("/v1/admin/system").json()
    assert data["cpu"]["count"] >= 1 and data["memory"]["total_bytes"] > data["memory"]["available_bytes"] > 0
    assert data["memory"]["server_bytes"] > 0 and isinstance(data["gpus"], list)
    budget = data["memory_budget"]
    assert budget["budget_bytes"] > budget["used_bytes"] > 0
    held = {m["id"]: m["footprint_bytes"] for m in data["models"]}
    assert set(held) == {MODEL, "tiny"} and sum(held.values()) == budget["used_bytes"]


def test_alias_weights_sticky_users_and_where_the_variant_is_recorded(many: Many) -> None:
    def ask(user: str) -> str:
        raw = many.sdk.chat.completions.with_raw_response.create(model="trial", messages=HI, max_tokens=1, user=user)
        served = raw.headers["x-llm-model"]
        assert raw.parse().model == served  # the response names the variant, as OpenAI names a snapshot
        return served

    users = [f"user-{i}" for i in range(120)]
    with ThreadPoolExecutor(8) as pool:
        chosen = dict(zip(users, pool.map(ask, users), strict=True))
    counts = Counter(chosen.values())
    assert 15 <= counts["tiny"] <= 45 and counts["tiny"] + counts[MODEL] == 120  # 25% of 120 = 30
    for user in users[:5]:  # sticky: the same user keeps the same variant
        assert {ask(user) for _ in range(3)} == {chosen[user]}
    counts.update(chosen[u] for u in users[:5] for _ in range(3))

    assert many.sdk.chat.completions.with_raw_response.create(model="chat", messages=HI, max_tokens=1).headers["x-llm-model"] == MODEL
    metrics = httpx.get(many.proc.url + "/metrics").text
    for model, n in counts.items():
        assert f'llm_alias_requests_total{{alias="trial",model="{model}"}} {float(n)}' in metrics
    logged = dict(many.rows("SELECT model, count(*) FROM llm_requests WHERE alias = 'trial' GROUP BY model"))  # type: ignore[arg-type]
    assert logged == dict(counts)


def _load(many: Many, body: dict[str, Any]) -> httpx.Response:
    return many.admin.post("/v1/admin/models", json=body)


def test_failing_loads_are_reported_and_the_server_serves_on(many: Many, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file" * 100)
    cases = {"missing": ("/no/such/model", "No such model folder or file: /no/such/model"),
             "broken": (str(broken), ""), "garbage": (str(garbage), "")}
    for name, (source, _) in cases.items():
        r = _load(many, {"name": name, "source": source, "engine": "transformers"})
        assert r.status_code == 202 and r.json()["state"] == "loading", r.text
    for name, (_, reason) in cases.items():
        failed = many.wait_state(name, "failed", "ready")
        assert failed["state"] == "failed" and failed["detail"], failed
        assert reason in failed["detail"]
        with pytest.raises(openai.APIStatusError) as e:
            many.sdk.chat.completions.create(model=name, messages=HI, max_tokens=1)
        assert e.value.status_code == 503 and "failed to load" in e.value.message
    assert httpx.get(many.proc.url + "/health").status_code == 200  # a failed run-time load is not a failed server
    assert many.sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).usage.completion_tokens == 2  # type: ignore[union-attr]
    assert "missing" not in {m.id for m in many.sdk.models.list().data}
    r = many.admin.delete("/v1/admin/models/missing")
    assert r.status_code == 200 and r.json()["state"] == "removed"
    assert many.admin.get("/v1/admin/models/missing").status_code == 404
    # a failed model's name can be loaded again (here, with a source that works)
    assert _load(many, {"name": "broken", "source": "/still/missing"}).status_code == 202


def test_refusals(many: Many, tiny: Path) -> None:
    r = _load(many, {"name": "huge", "source": str(tiny), "engine": "transformers", "settings": {"kv_cache_space": 100000}})
    assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_memory"
    assert "does not fit" in r.json()["error"]["message"] and "--memory-budget" in r.json()["error"]["message"]
    assert many.admin.get("/v1/admin/models/huge").status_code == 404  # refused: not declared
    for name in (MODEL, "trial"):
        r = _load(many, {"name": name, "source": str(tiny)})
        assert r.status_code == 409 and r.json()["error"]["param"] == "name"
    for body, param in (({"name": "x", "source": str(tiny), "settings": {"port": 1}}, None),
                        ({"name": "x", "source": str(tiny), "settings": {"max_num_seqs": 0}}, "settings.max_num_seqs"),
                        ({"source": str(tiny)}, None)):
        r = _load(many, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_load_and_unload_under_traffic(many: Many, tiny: Path) -> None:
    stop, errors, done = threading.Event(), [], Counter()

    def traffic() -> None:  # the default model keeps streaming while another model comes and goes
        while not stop.is_set():
            try:
                text = "".join(c.choices[0].delta.content or "" for c in many.sdk.chat.completions.create(
                    model=MODEL, messages=HI, max_tokens=8, stream=True) if c.choices)
                done["ok" if text else "empty"] += 1
            except Exception as e:  # collected and asserted on below
                errors.append(e)

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        r = _load(many, {"name": "tiny2", "source": str(tiny), "engine": "transformers", "settings": {"kv_cache_space": 0.1}})
        assert r.status_code == 202 and r.headers["location"] == "/v1/admin/models/tiny2"
        assert "phase" in r.json()["progress"]
        many.wait_state("tiny2", "ready")
        assert tiny2_listed(many)

        # a long answer is running on tiny2 when it is unloaded: it finishes, new requests are refused
        stream = many.sdk.chat.completions.create(model="tiny2", messages=HI, max_tokens=600, stream=True,
                                                  stream_options={"include_usage": True}, extra_body={"min_tokens": 600})
        chunks = iter(stream)
        next(chunks)
        r = many.admin.delete("/v1/admin/models/tiny2")
        assert r.status_code == 202 and r.json()["state"] == "unloading" and r.json()["running"] == 1
        with pytest.raises(openai.APIStatusError) as e:
            many.sdk.chat.completions.create(model="tiny2", messages=HI, max_tokens=1)
        assert e.value.status_code == 503 and e.value.code == "model_unloading"
        assert e.value.response.headers["retry-after"]
        rest = list(chunks)
        assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 600
        assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
        deadline = time.monotonic() + 30
        while many.admin.get("/v1/admin/models/tiny2").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(openai.NotFoundError):
            many.sdk.chat.completions.create(model="tiny2", messages=HI, max_tokens=1)
        assert not tiny2_listed(many)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not errors and done["ok"] >= 2, (errors, done)


def tiny2_listed(many: Many) -> bool:
    return "tiny2" in {m.id for m in many.sdk.models.list().data}


def test_metrics_and_request_log_carry_the_model(many: Many) -> None:
    many.sdk.completions.create(model="tiny", prompt="hello", max_tokens=2)
    metrics = httpx.get(many.proc.url + "/metrics").text
    for line in ('llm_requests_total{model="tiny",route="/v1/completions",status="200"}',
                 'llm_model_state{model="tiny",state="ready"} 1.0', f'llm_model_state{{model="{MODEL}",state="ready"}} 1.0',
                 'llm_model_memory_bytes{model="tiny"}', 'llm_generation_tokens_total{model="tiny"}',
                 'llm_requests_running{model="tiny"} 0.0', 'llm_time_to_first_token_seconds_count{model="tiny"}'):
        assert line in metrics, line
    rows = dict(many.rows("SELECT engine, count(*) FROM llm_requests WHERE model = 'tiny' GROUP BY engine"))  # type: ignore[arg-type]
    assert set(rows) == {"transformers"} and rows["transformers"] >= 2


# --------------------------------------------------------------------------- a small server of lazy models


@pytest.fixture(scope="module")
def lazy(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Iterator[ServerProcess]:
    """Two lazy tiny models with room for one (each ~0.36 GiB by estimate, budget 0.5 GiB)."""
    folder = tmp_path_factory.mktemp("lazy")
    lazy_model = {"source": str(tiny), "preload": False, "settings": {"kv_cache_space": 0.1}}
    (folder / "models.yaml").write_text(yaml.safe_dump({"models": [{"name": "one", **lazy_model}, {"name": "two", **lazy_model}]}))
    proc = ServerProcess("--engine", "transformers", *ENGINE_ARGS["transformers"], "--models-file", str(folder / "models.yaml"),
                         "--memory-budget", "0.5", "--evict-idle", "--idle-unload", "3", name="lazy-models")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_eviction_and_idle_unload(lazy: ServerProcess) -> None:
    sdk = openai.OpenAI(base_url=lazy.base_url, api_key="none", max_retries=0, timeout=120)

    def states() -> dict[str, tuple[str, str | None]]:
        return {m["id"]: (m["state"], m["detail"]) for m in httpx.get(lazy.url + "/v1/admin/models").json()["data"]}

    assert states() == {"one": ("unloaded", None), "two": ("unloaded", None)}
    assert sdk.chat.completions.create(model="one", messages=HI, max_tokens=1).model == "one"
    assert sdk.chat.completions.create(model="two", messages=HI, max_tokens=1).model == "two"  # no room: one goes
    assert states() == {"one": ("unloaded", "evicted to make room for two"), "two": ("ready", None)}
    deadline = time.monotonic() + 30
    while states()["two"][0] != "unloaded":  # idle for 3 s
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert states()["two"] == ("unloaded", "idle for 3 s")
    assert sdk.chat.completions.create(model="one", messages=HI, max_tokens=1).model == "one"  # loads again


def test_a_preloaded_model_that_does_not_fit_stops_the_start() -> None:
    proc = ServerProcess("--engine", "transformers", "--model", "a=default", "--model", "b=default",
                         "--memory-budget", "0.6", name="does-not-fit")
    try:
        assert proc.wait_exit(120) == 1
    finally:
        proc.stop()
    log = proc.log_text()
    # each needs its weights (0.25 GiB) + the default KV cache (4 GiB): the refusal names model and budget
    assert "could not serve a, b:" in log and "does not fit" in log and "0.60 GiB memory budget" in log
