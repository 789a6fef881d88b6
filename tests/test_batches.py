"""The Batch API's engine-independent promises, against live servers (the Transformers engine):
files and batches belong to their key; interactive requests are admitted before waiting batch
lines, and no more than --batch-concurrency lines run at once; a server killed mid-batch (SQLite
and PostgreSQL) resumes on restart with every custom_id exactly once and no written line run
again; two replicas on one PostgreSQL share a batch without running a line twice."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests.conformance.test_batches import chat_line, results, upload, wait
from tests.conftest import MODEL, POSTGRES, postgres_database
from tests.server_process import ServerProcess

KEYS = """keys:
  - {name: alice, key: sk-alice-123456}
  - {name: bob, key: sk-bob-1234567}
  - {name: ops, key: sk-ops-1234567, admin: true}
"""


def _client(proc: ServerProcess, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.base_url, api_key=key, max_retries=0, timeout=120)


def _long_lines(n: int, tokens: int = 24) -> list[dict[str, Any]]:
    return [chat_line(f"line-{i}", f"Count from {i}.", max_tokens=tokens, ignore_eos=True) for i in range(n)]


def _rows(url: str, query: str, **params: object) -> list[Any]:
    db = sa.create_engine(url)
    try:
        with db.connect() as conn:
            return list(conn.execute(sa.text(query), params).all())
    finally:
        db.dispose()


def _time(value: Any) -> float:
    """A request-log time (a datetime, or SQLite's text) as seconds."""
    from datetime import datetime

    t = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return t.timestamp()


def test_keys_priority_and_concurrency(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS)
    url = f"sqlite:///{tmp_path / 'log.db'}"
    # one engine slot, two batch lines at once: one runs, one waits in the model's queue, so an
    # interactive request always finds a batch line waiting ahead of it
    proc = ServerProcess("--engine", "transformers", "--api-keys-file", str(keys), "--database-url", url,
                         "--max-num-seqs", "1", "--batch-concurrency", "2", name="batch-keys")
    try:
        proc.wait_ready()
        alice, bob, ops = (_client(proc, k) for k in ("sk-alice-123456", "sk-bob-1234567", "sk-ops-1234567"))
        f = upload(alice, _long_lines(12, 32))
        batch = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        # another key sees none of it; an admin key sees all
        for call in (lambda: bob.files.retrieve(f.id), lambda: bob.files.content(f.id),
                     lambda: bob.batches.retrieve(batch.id), lambda: bob.batches.cancel(batch.id),
                     lambda: bob.files.delete(f.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        with pytest.raises(openai.BadRequestError) as e:
            bob.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert e.value.body["param"] == "input_file_id"
        assert batch.id not in [b.id for b in bob.batches.list()] and f.id not in [x.id for x in bob.files.list()]
        assert ops.batches.retrieve(batch.id).id == batch.id and f.id in [x.id for x in ops.files.list()]
        # interactive requests while the batch runs
        wait(alice, batch.id, until=("in_progress",))
        asked = []
        for i in range(3):
            time.sleep(0.4)
            asked.append(bob.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Hi {i}"}],
                                                     max_tokens=4).id)
        done = wait(alice, batch.id)
        assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 12
        assert set(results(alice, done.output_file_id)) == {f"line-{i}" for i in range(12)}
        with pytest.raises(openai.NotFoundError):
            bob.files.content(done.output_file_id or "")
        metrics = httpx.get(f"{proc.url}/metrics").text
    finally:
        proc.stop()
    rows = _rows(url, "SELECT time, queued_ms, latency_ms, batch_id, key_name FROM llm_requests "
                      "WHERE route = '/v1/chat/completions' AND status = 200")
    lines = [r for r in rows if r.batch_id == batch.id]
    interactive = [r for r in rows if r.batch_id is None]
    assert len(lines) == 12 and len(interactive) == 3 and {r.key_name for r in lines} == {"alice"}  # the owner's key
    # order: a batch line still waiting well after an interactive request arrived (0.2 s: its
    # rendering is over by then, so both were in the queue) was admitted after it
    overtaken = 0
    for i in interactive:
        arrived, admitted = _time(i.time), _time(i.time) + i.queued_ms / 1000
        for b in lines:
            b_arrived, b_admitted = _time(b.time), _time(b.time) + b.queued_ms / 1000
            if b_arrived < arrived and b_admitted > arrived + 0.2:
                assert b_admitted > admitted, "a waiting batch line went ahead of an interactive request"
                overtaken += 1
    assert overtaken >= 1  # an interactive request found a batch line waiting, and went first
    # never more than --batch-concurrency lines at once (and that many: the engine is kept busy)
    edges = sorted([(_time(b.time), 1) for b in lines] + [(_time(b.time) + b.latency_ms / 1000, -1) for b in lines])
    running, most = 0, 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert most == 2
    lines_total = {s.labels["outcome"]: s.value for fam in text_string_to_metric_families(metrics)
                   for s in fam.samples if s.name == "llm_batch_lines_total"}
    assert lines_total == {"ok": 12.0}


def _kill_and_resume(url: str, tmp_path: Path, name: str, *extra: str) -> None:
    """SIGKILL a server mid-batch; the restart (same host and port) finishes it: every custom_id
    once, and each line written before the kill kept as it was (never run again)."""
    first = ServerProcess("--engine", "transformers", "--database-url", url, "--batch-concurrency", "2", *extra,
                          name=f"{name}-before")
    try:
        client = _client(first.wait_ready())
        batch = client.batches.create(input_file_id=upload(client, _long_lines(10, 40)).id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 120
        while (client.batches.retrieve(batch.id).request_counts or batch.request_counts).completed < 3:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
    before = {r.custom_id: r.result for r in _rows(url, "SELECT custom_id, result, state FROM llm_batch_lines "
                                                        "WHERE batch_id = :id", id=batch.id) if r.state == "done"}
    running = _rows(url, "SELECT count(*) AS n FROM llm_batch_lines WHERE batch_id = :id AND state = 'running'",
                    id=batch.id)[0].n
    assert 3 <= len(before) < 10  # killed mid-batch (with lines in flight, but for a rare instant between two)
    second = ServerProcess("--engine", "transformers", "--database-url", url, "--batch-concurrency", "2", *extra,
                           name=f"{name}-after", port=first.port)
    try:
        client = _client(second.wait_ready())
        done = wait(client, batch.id)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (10, 10, 0)
        out = results(client, done.output_file_id)  # raises on a custom_id twice
        assert set(out) == {f"line-{i}" for i in range(10)}
        for custom_id, result in before.items():
            assert out[custom_id] == json.loads(result)  # written before the kill: kept, not run again
        if running:
            assert "go back to pending" in second.log_text()  # the restart took its lines back at once
    finally:
        second.stop()


def test_a_killed_server_resumes_its_batch_on_sqlite(tmp_path: Path) -> None:
    _kill_and_resume(f"sqlite:///{tmp_path / 'log.db'}", tmp_path, "batch-sqlite", "--files-dir", str(tmp_path / "files"))


@pytest.mark.skipif(POSTGRES is None, reason="needs LLM_SERVICE_TEST_POSTGRES (.ci/run starts one)")
def test_two_replicas_on_postgresql_share_a_batch_and_a_killed_one_resumes(tmp_path: Path) -> None:
    with postgres_database("batches") as url:
        a = ServerProcess("--engine", "transformers", "--database-url", url, "--batch-concurrency", "2", name="replica-a")
        b = ServerProcess("--engine", "transformers", "--database-url", url, "--batch-concurrency", "2", name="replica-b")
        try:
            client = _client(a.wait_ready())
            b.wait_ready()
            # the file's bytes are in the database: replica b reads what was uploaded to a
            f = upload(client, _long_lines(16, 8))
            assert _client(b).files.content(f.id).text == client.files.content(f.id).text
            batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            done = wait(_client(b), batch.id)
            assert done.status == "completed" and len(results(client, done.output_file_id)) == 16
            deadline = time.monotonic() + 15  # the request logs write their rows off the request path
            while True:
                ran = _rows(url, "SELECT count(*) AS n FROM llm_requests WHERE batch_id = :id AND status = 200",
                            id=batch.id)[0].n
                if ran >= 16 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            time.sleep(1)
            ran = _rows(url, "SELECT count(*) AS n FROM llm_requests WHERE batch_id = :id AND status = 200",
                        id=batch.id)[0].n
            assert ran == 16  # each line answered once, on one replica or the other
            for proc in (a, b):
                families = text_string_to_metric_families(httpx.get(f"{proc.url}/metrics").text)
                assert sum(s.value for fam in families for s in fam.samples if s.name == "llm_batch_lines_total") > 0
        finally:
            a.stop()
            b.stop()
        _kill_and_resume(url, tmp_path, "batch-postgres")
