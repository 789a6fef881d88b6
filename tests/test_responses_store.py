"""Stored responses and conversations against live servers and real databases: a chain that
survives a restart (and a change of engine) with the same SQLite file, a crash that leaves a
background response unfinished (marked failed at the next start, never lost), retention deleting
expired rows, keys owning what they store (another key gets 404, an admin key reads all), a chain
on PostgreSQL, `--store-responses off`, and a database that fails answering 503, not losing a
response silently."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import openai
import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import MODEL, POSTGRES, postgres_database
from tests.server_process import ServerProcess

ADMIN, ALICE, BOB = "sk-admin-000001", "sk-alice-000002", "sk-bob-00000003"



def _client(server: ServerProcess, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def _chain(client: openai.OpenAI, n: int, previous: str | None = None) -> list[openai.types.responses.Response]:
    out = []
    for i in range(n):
        r = client.responses.create(model=MODEL, input=f"Turn {i}: say a word.", max_output_tokens=4, temperature=0,
                                    previous_response_id=previous)
        out.append(r)
        previous = r.id
    return out


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A fresh PostgreSQL database when the suite has one (.ci/run), else a SQLite file."""
    if not POSTGRES:
        yield f"sqlite:///{Path(os.environ.get('TMPDIR', '/tmp')) / f'responses-{uuid.uuid4().hex[:8]}.db'}"
        return
    with postgres_database("llm_responses") as url:
        yield url


@pytest.fixture(scope="module")
def keyed(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "ops", "key": ADMIN, "admin": True},
                                             {"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB}]}))
    proc = ServerProcess("--engine", "transformers", "--api-keys-file", str(keys), "--database-url", database,
                         name="responses-keyed")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_a_chain_of_three_on_the_database(keyed: ServerProcess, database: str) -> None:
    alice = _client(keyed, ALICE)
    first, second, third = _chain(alice, 3)
    assert third.usage.input_tokens > second.usage.input_tokens > first.usage.input_tokens
    db = sa.create_engine(database)
    try:
        with db.connect() as conn:
            rows = {r.id: r for r in conn.execute(sa.text("SELECT id, owner, status, previous_response_id "
                                                          "FROM llm_responses"))}
    finally:
        db.dispose()
    assert (rows[third.id].owner, rows[third.id].status, rows[third.id].previous_response_id) == \
        ("alice", "completed" if third.status == "completed" else "incomplete", second.id)


def test_another_keys_objects_are_404_and_an_admin_reads_all(keyed: ServerProcess) -> None:
    alice, bob, admin = _client(keyed, ALICE), _client(keyed, BOB), _client(keyed, ADMIN)
    r = alice.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    conv = alice.conversations.create(items=[{"type": "message", "role": "user", "content": "Secret."}])
    for attempt in (lambda: bob.responses.retrieve(r.id), lambda: bob.responses.input_items.list(r.id),
                    lambda: bob.responses.delete(r.id), lambda: bob.conversations.retrieve(conv.id),
                    lambda: bob.conversations.items.list(conv.id), lambda: bob.conversations.delete(conv.id),
                    lambda: bob.responses.create(model=MODEL, input="Go on", previous_response_id=r.id),
                    lambda: bob.responses.create(model=MODEL, input="Go on", conversation=conv.id)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert admin.responses.retrieve(r.id).id == r.id
    assert admin.conversations.items.list(conv.id).data[0].content[0].text == "Secret."
    mine = alice.get("/conversations", cast_to=object)
    theirs = bob.get("/conversations", cast_to=object)
    assert conv.id in [c["id"] for c in mine["data"]]  # type: ignore[index]
    assert conv.id not in [c["id"] for c in theirs["data"]]  # type: ignore[index]
    assert alice.responses.retrieve(r.id).id == r.id  # bob's delete deleted nothing


def _rewrite(url: str, statement: str, **params: object) -> None:
    db = sa.create_engine(url)
    try:
        with db.begin() as conn:
            conn.execute(sa.text(statement), params)
    finally:
        db.dispose()


def test_a_chain_survives_a_restart_a_crash_fails_what_ran_and_retention_deletes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'responses.db'}"
    first = ServerProcess("--engine", "transformers", "--database-url", url, name="responses-before")
    try:
        client = _client(first.wait_ready())
        chain = _chain(client, 2)
        old = client.responses.create(model=MODEL, input="Old news.", max_output_tokens=2)
        conv = client.conversations.create()
        numbers = {"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"},
                                                          "minItems": 500}}, "required": ["n"]}
        running = client.responses.create(model=MODEL, input="Count.", max_output_tokens=3000, background=True,
                                          text={"format": {"type": "json_schema", "name": "n", "schema": numbers}})
        deadline = time.monotonic() + 60
        while client.responses.retrieve(running.id).status == "queued" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.responses.retrieve(running.id).status == "in_progress"
    finally:  # a crash: no shutdown, no chance to write anything
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
    month_ago = datetime.now().replace(microsecond=0) - timedelta(days=31)
    _rewrite(url, "UPDATE llm_responses SET created = :t WHERE id = :id", t=month_ago, id=old.id)
    _rewrite(url, "UPDATE llm_conversations SET updated = :t WHERE id = :id", t=month_ago, id=conv.id)
    # the restart: vLLM where it is installed, so a chain moves between engines too
    engine = "vllm" if importlib.util.find_spec("vllm") else "transformers"
    second = ServerProcess("--engine", engine, "--enforce-eager", "--database-url", url, name="responses-after",
                           port=first.port)  # the same instance (host and port) starting again
    try:
        client = _client(second.wait_ready())
        (third,) = _chain(client, 1, previous=chain[-1].id)
        assert third.usage.input_tokens > chain[-1].usage.input_tokens + chain[-1].usage.output_tokens
        crashed = client.responses.retrieve(running.id)
        assert crashed.status == "failed" and "restarted" in crashed.error.message
        for gone in (lambda: client.responses.retrieve(old.id), lambda: client.conversations.retrieve(conv.id)):
            with pytest.raises(openai.NotFoundError):
                gone()
        assert client.responses.retrieve(chain[0].id).id == chain[0].id  # young rows stay
    finally:
        second.stop()


def test_storage_off_and_a_database_that_fails(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'off.db'}"
    proc = ServerProcess("--engine", "transformers", "--database-url", url, "--store-responses", "off",
                         name="responses-off")
    try:
        client = _client(proc.wait_ready())
        r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
        assert r.store is False  # answered, unstored, and it says so
        for refused in (lambda: client.responses.retrieve(r.id), lambda: client.conversations.create(),
                        lambda: client.responses.create(model=MODEL, input="Hi", background=True)):
            with pytest.raises(openai.BadRequestError, match="--store-responses off"):
                refused()
    finally:
        proc.stop()
    broken = tmp_path / "broken.db"
    proc = ServerProcess("--engine", "transformers", "--database-url", f"sqlite:///{broken}", name="responses-broken")
    try:
        client = _client(proc.wait_ready())
        assert client.responses.create(model=MODEL, input="Hi", max_output_tokens=2).status
        _rewrite(f"sqlite:///{broken}", "DROP TABLE llm_responses")  # the database can no longer take them
        with pytest.raises(openai.InternalServerError, match="could be stored") as e:
            client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
        assert e.value.status_code == 503
        assert client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False).store is False
    finally:
        proc.stop()


def test_the_request_log_has_one_row_per_response(keyed: ServerProcess, database: str) -> None:
    alice = _client(keyed, ALICE)
    whole = alice.responses.with_raw_response.create(model=MODEL, input="Hi", max_output_tokens=3,
                                                      extra_headers={"x-request-id": "resp-log-1"}).parse()
    queued = alice.responses.create(model=MODEL, input="Hi", max_output_tokens=3, background=True,
                                    extra_headers={"x-request-id": "resp-log-2"})
    deadline = time.monotonic() + 60
    while alice.responses.retrieve(queued.id).status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.1)
    done = alice.responses.retrieve(queued.id)
    db = sa.create_engine(database)
    try:
        rows: list[sa.Row] = []
        while time.monotonic() < deadline:  # the request log is written off the request path
            with db.connect() as conn:
                rows = list(conn.execute(sa.text(
                    "SELECT request_id, route, status, key_name, completion_tokens FROM llm_requests "
                    "WHERE request_id IN ('resp-log-1', 'resp-log-2') ORDER BY request_id")))
            if len(rows) == 2:
                break
            time.sleep(0.2)
    finally:
        db.dispose()
    # a background response is one row too, written when its work ended, with its tokens
    assert [tuple(r) for r in rows] == [
        ("resp-log-1", "/v1/responses", 200, "alice", whole.usage.output_tokens),
        ("resp-log-2", "/v1/responses", 200, "alice", done.usage.output_tokens)]
