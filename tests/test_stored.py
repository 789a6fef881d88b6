"""`store.Stored`, the stored responses and conversations, against a real SQLite file and, when
`LLM_SERVICE_TEST_POSTGRES` is set, a real PostgreSQL (a throwaway database per test): upsert,
owners' visibility, chains of previous responses, failing a restarted runner's background
responses, retention, conversations and their items' pages, migration of a v4 database, and a
locked database retried and then reported."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from server.store import (
    SCHEMA_VERSION,
    ChainTooLong,
    Conversation,
    MissingAncestor,
    Stored,
    StoredResponse,
    Viewer,
    engine_for,
    utcnow,
)
from tests.conftest import POSTGRES, postgres_database

ADMIN, ALICE, BOB = Viewer("ops", all=True), Viewer("alice"), Viewer("bob")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    if not POSTGRES:
        pytest.skip("LLM_SERVICE_TEST_POSTGRES is not set (.ci/run sets it)")
    with postgres_database("llm_test") as url:
        yield url


@pytest.fixture
def db(url: str) -> Iterator[sa.Engine]:
    engine = engine_for(url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def stored(db: sa.Engine) -> Stored:
    s = Stored(db)
    s.ensure_schema()
    return s


def _response(id: str, owner: str | None = "alice", previous: str | None = None, status: str = "completed",
              runner: str | None = None, created_ago: timedelta = timedelta()) -> StoredResponse:
    return StoredResponse(
        id=id, owner=owner, created=(utcnow() - created_ago).replace(microsecond=0), status=status,
        background=runner is not None, input=[{"type": "message", "role": "user", "content": f"to {id}"}],
        response={"id": id, "object": "response", "status": status, "output": [{"type": "message", "text": "é"}]},
        previous_response_id=previous, runner=runner)


def _conversation(id: str, owner: str | None = "alice", created_ago: timedelta = timedelta()) -> Conversation:
    return Conversation(id=id, owner=owner, created=(utcnow() - created_ago).replace(microsecond=0),
                        metadata={"topic": id})


def _items(prefix: str, n: int) -> list[tuple[str, dict[str, str]]]:
    return [(f"{prefix}_{k}", {"id": f"{prefix}_{k}", "type": "message", "text": str(k)}) for k in range(n)]


def _count(db: sa.Engine, sql: str) -> int:
    with db.connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())


def test_put_response_inserts_then_replaces_every_column(stored: Stored, db: sa.Engine) -> None:
    first = _response("resp_1", status="in_progress", runner="host:8000")
    stored.put_response(first)
    assert stored.get_response("resp_1", ALICE) == first
    with db.connect() as conn:
        updated = conn.execute(sa.text("SELECT updated FROM llm_responses")).scalar_one()

    time.sleep(0.01)
    second = StoredResponse(id="resp_1", owner="alice", created=first.created, status="completed", background=True,
                            input=[{"type": "message", "role": "user", "content": "again"}],
                            response={"id": "resp_1", "status": "completed", "output": []},
                            previous_response_id="resp_0", conversation_id="conv_1", runner="other:8001",
                            events=[{"type": "response.created", "sequence_number": 0}])
    stored.put_response(second)
    assert stored.get_response("resp_1", ALICE) == second
    assert _count(db, "SELECT count(*) FROM llm_responses") == 1
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT updated FROM llm_responses")).scalar_one() > updated
    # events back to none: every column is replaced, not merged
    stored.put_response(first)
    assert stored.get_response("resp_1", ALICE) == first


def test_rows_of_another_owner_behave_as_missing(stored: Stored, db: sa.Engine) -> None:
    stored.put_response(_response("resp_a", owner="alice"))
    stored.put_response(_response("resp_n", owner=None))  # from a server without keys
    conv = _conversation("conv_a")
    stored.create_conversation(conv, _items("item", 2))

    assert stored.get_response("resp_a", BOB) is None
    assert stored.get_response("resp_n", ALICE) is None and stored.get_response("resp_n", Viewer(None)) is None
    assert stored.chain("resp_a", BOB) is None
    assert stored.delete_response("resp_a", BOB) is False
    assert stored.get_conversation("conv_a", BOB) is None
    assert stored.update_conversation("conv_a", BOB, {"x": "y"}) is None
    assert stored.add_items("conv_a", BOB, _items("bob", 1)) is False
    assert stored.list_items("conv_a", BOB, None, None, "asc") is None
    assert stored.get_item("conv_a", "item_0", BOB) is None
    assert stored.delete_item("conv_a", "item_0", BOB) is False
    assert stored.delete_conversation("conv_a", BOB) is False
    assert stored.list_conversations(BOB, 10, None, "asc") == ([], False)
    with pytest.raises(KeyError):
        stored.list_conversations(BOB, 10, "conv_a", "asc")
    # nothing changed underneath
    assert _count(db, "SELECT count(*) FROM llm_responses") == 2
    assert _count(db, "SELECT count(*) FROM llm_conversation_items") == 2
    assert stored.get_conversation("conv_a", ALICE) == conv

    # an admin (or a server without keys) sees every row
    assert stored.get_response("resp_a", ADMIN) is not None and stored.get_response("resp_n", ADMIN) is not None
    assert stored.get_item("conv_a", "item_1", ADMIN) == {"id": "item_1", "type": "message", "text": "1"}
    assert [c.id for c in stored.list_conversations(ADMIN, 10, None, "asc")[0]] == ["conv_a"]
    assert stored.delete_response("resp_a", ALICE) is True
    assert stored.get_response("resp_a", ADMIN) is None


def test_chain_is_oldest_first_and_reports_a_missing_link(stored: Stored) -> None:
    stored.put_response(_response("r1"))
    stored.put_response(_response("r2", previous="r1"))
    stored.put_response(_response("r3", previous="r2"))
    stored.put_response(_response("r4", previous="r3"))

    chain = stored.chain("r4", ALICE)
    assert chain is not None and [r.id for r in chain] == ["r1", "r2", "r3", "r4"]
    assert chain[1].previous_response_id == "r1" and chain[1].input[0]["content"] == "to r2"
    assert [r.id for r in stored.chain("r1", ALICE) or []] == ["r1"]
    assert stored.chain("nothing", ALICE) is None
    assert [r.id for r in stored.chain("r4", ALICE, limit=3) or []] == ["r1", "r2", "r3", "r4"]  # 3 hops
    with pytest.raises(ChainTooLong):
        stored.chain("r4", ALICE, limit=2)

    # a link to another owner's response is as good as missing
    stored.put_response(_response("bobs", owner="bob"))
    stored.put_response(_response("r5", previous="bobs"))
    with pytest.raises(MissingAncestor) as e:
        stored.chain("r5", ALICE)
    assert e.value.id == "bobs"

    assert stored.delete_response("r2", ALICE)
    with pytest.raises(MissingAncestor) as e:
        stored.chain("r4", ALICE)
    assert e.value.id == "r2" and isinstance(e.value, LookupError)
    assert [r.id for r in stored.chain("r1", ALICE) or []] == ["r1"]

    # a loop (no API makes one) ends at the limit instead of running forever
    stored.put_response(_response("loop_a", previous="loop_b"))
    stored.put_response(_response("loop_b", previous="loop_a"))
    with pytest.raises(ChainTooLong):
        stored.chain("loop_a", ALICE, limit=50)


def test_fail_unfinished_touches_only_its_runners_unfinished_responses(stored: Stored) -> None:
    mine = {"queued": "bg_q", "in_progress": "bg_p", "completed": "bg_c", "cancelled": "bg_x"}
    for status, id in mine.items():
        stored.put_response(_response(id, status=status, runner="host:8000", created_ago=timedelta(minutes=1)))
    stored.put_response(_response("elsewhere", status="in_progress", runner="host:8001"))
    stored.put_response(_response("foreground", status="in_progress"))
    error = {"code": "server_error", "message": "restarted"}
    started = utcnow()
    stored.put_response(dataclasses.replace(_response("after_start", status="queued", runner="host:8000"),
                                            created=started + timedelta(seconds=1)))  # this start's own

    assert stored.fail_unfinished("host:8000", error, before=started) == 2
    for id in ("bg_q", "bg_p"):
        r = stored.get_response(id, ADMIN)
        assert r is not None and r.status == "failed"
        assert r.response["status"] == "failed" and r.response["error"] == error
        assert r.response["output"] == [{"type": "message", "text": "é"}]  # the rest is kept
    for id, status in (("bg_c", "completed"), ("bg_x", "cancelled"), ("elsewhere", "in_progress"),
                       ("foreground", "in_progress"), ("after_start", "queued")):
        r = stored.get_response(id, ADMIN)
        assert r is not None and r.status == status and r.response["status"] == status and "error" not in r.response
    assert stored.fail_unfinished("host:8000", error, before=started) == 0


def test_sweep_deletes_only_old_rows_and_the_items_of_swept_conversations(stored: Stored, db: sa.Engine) -> None:
    stored.put_response(_response("old", created_ago=timedelta(days=31)))
    stored.put_response(_response("new", created_ago=timedelta(days=29)))
    stored.create_conversation(_conversation("conv_old", created_ago=timedelta(days=40)), _items("old", 3))
    stored.create_conversation(_conversation("conv_used", created_ago=timedelta(days=40)), _items("used", 2))
    stored.create_conversation(_conversation("conv_new"), _items("new", 1))
    with db.begin() as conn:  # last changed 31 days ago: past a 30-day retention
        conn.execute(sa.text("UPDATE llm_conversations SET updated = :t WHERE id IN ('conv_old', 'conv_used')"),
                     {"t": utcnow() - timedelta(days=31)})
    assert stored.add_items("conv_used", ALICE, _items("later", 1))  # used again: kept

    assert stored.sweep(utcnow() - timedelta(days=30)) == (1, 1)
    assert stored.get_response("old", ADMIN) is None and stored.get_response("new", ADMIN) is not None
    assert stored.get_conversation("conv_old", ADMIN) is None
    with db.connect() as conn:
        left = set(conn.execute(sa.text("SELECT item_id FROM llm_conversation_items")).scalars())
    assert left == {"used_0", "used_1", "later_0", "new_0"}
    assert stored.sweep(utcnow() - timedelta(days=30)) == (0, 0)


def test_conversation_create_read_update_delete(stored: Stored, db: sa.Engine) -> None:
    conv = _conversation("conv_1")
    stored.create_conversation(conv, _items("item", 2))
    assert stored.get_conversation("conv_1", ALICE) == conv
    assert stored.list_items("conv_1", ALICE, None, None, "asc") == ([item for _, item in _items("item", 2)], False)
    with pytest.raises(sa.exc.IntegrityError):  # not transient: reported at once, nothing half-written
        stored.create_conversation(_conversation("conv_2"), _items("item", 1))
    assert stored.get_conversation("conv_2", ALICE) is None

    with db.connect() as conn:
        before = conn.execute(sa.text("SELECT updated FROM llm_conversations")).scalar_one()
    time.sleep(0.01)
    updated = stored.update_conversation("conv_1", ALICE, {"topic": "new", "lang": "fr"})
    assert updated == Conversation("conv_1", "alice", conv.created, {"topic": "new", "lang": "fr"})
    assert stored.get_conversation("conv_1", ALICE) == updated
    assert stored.update_conversation("conv_1", ALICE, {}) == Conversation("conv_1", "alice", conv.created, {})
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT updated FROM llm_conversations")).scalar_one() > before

    assert stored.delete_conversation("conv_1", ALICE) is True
    assert stored.get_conversation("conv_1", ADMIN) is None
    assert _count(db, "SELECT count(*) FROM llm_conversation_items") == 0
    assert stored.delete_conversation("conv_1", ALICE) is False
    assert stored.update_conversation("conv_1", ALICE, {"a": "b"}) is None


def test_items_are_paged_in_order_with_after_and_has_more(stored: Stored, db: sa.Engine) -> None:
    stored.create_conversation(_conversation("conv_1"), _items("item", 3))
    stored.create_conversation(_conversation("conv_2"), _items("other", 1))
    assert stored.add_items("conv_1", ALICE, _items("more", 2))
    assert stored.add_items("conv_1", ALICE, [])
    order = ["item_0", "item_1", "item_2", "more_0", "more_1"]

    def ids(limit: int | None, after: str | None, direction: str = "asc") -> tuple[list[str], bool]:
        page = stored.list_items("conv_1", ALICE, limit, after, "asc" if direction == "asc" else "desc")
        assert page is not None
        return [item["id"] for item in page[0]], page[1]

    assert ids(None, None) == (order, False)
    assert ids(2, None) == (order[:2], True)
    assert ids(2, "item_1") == (order[2:4], True)
    assert ids(2, "more_0") == (["more_1"], False)
    assert ids(3, "item_1") == (order[2:], False)  # exactly the rest: no more
    assert ids(2, None, "desc") == (["more_1", "more_0"], True)
    assert ids(None, "item_2", "desc") == (["item_1", "item_0"], False)
    assert ids(10, "item_0", "desc") == ([], False)
    with pytest.raises(KeyError):
        ids(2, "nothing")
    with pytest.raises(KeyError):
        ids(2, "other_0")  # another conversation's item

    assert stored.get_item("conv_1", "more_0", ALICE) == {"id": "more_0", "type": "message", "text": "0"}
    assert stored.get_item("conv_2", "more_0", ALICE) is None
    assert stored.delete_item("conv_2", "item_1", ALICE) is False  # not in that conversation
    assert stored.delete_item("conv_1", "item_1", ALICE) is True
    assert stored.delete_item("conv_1", "item_1", ALICE) is False
    assert stored.get_item("conv_1", "item_1", ALICE) is None
    assert ids(None, None) == ([x for x in order if x != "item_1"], False)
    assert _count(db, "SELECT count(*) FROM llm_conversation_items") == 5


def test_conversations_are_listed_by_creation_then_id(stored: Stored) -> None:
    same = timedelta(minutes=5)
    for id, ago in (("conv_c", timedelta(minutes=9)), ("conv_b", same), ("conv_a", same), ("conv_d", timedelta())):
        stored.create_conversation(_conversation(id, created_ago=ago), [])
    stored.create_conversation(_conversation("conv_bob", owner="bob", created_ago=-same), [])
    order = ["conv_c", "conv_a", "conv_b", "conv_d"]

    def ids(viewer: Viewer, limit: int, after: str | None, direction: str = "asc") -> tuple[list[str], bool]:
        page, more = stored.list_conversations(viewer, limit, after, "asc" if direction == "asc" else "desc")
        return [c.id for c in page], more

    assert ids(ALICE, 10, None) == (order, False)
    assert ids(ALICE, 2, None) == (order[:2], True)
    assert ids(ALICE, 2, "conv_a") == (order[2:], False)
    assert ids(ALICE, 1, "conv_a") == (["conv_b"], True)
    assert ids(ALICE, 2, "conv_b", "desc") == (["conv_a", "conv_c"], False)
    assert ids(ALICE, 1, None, "desc") == (["conv_d"], True)
    assert ids(BOB, 10, None) == (["conv_bob"], False)
    assert ids(ADMIN, 10, "conv_d") == (["conv_bob"], False)
    with pytest.raises(KeyError):
        ids(ALICE, 10, "conv_bob")


def test_a_v4_database_gains_the_tables_and_keeps_its_rows(url: str) -> None:
    old = sa.create_engine(url)
    with old.begin() as conn:  # what version 4 left behind: the request log only
        conn.execute(sa.text("CREATE TABLE llm_requests (id INTEGER PRIMARY KEY, time TIMESTAMP NOT NULL, "
                             "request_id VARCHAR(128) NOT NULL, route VARCHAR(64) NOT NULL, "
                             "status INTEGER NOT NULL, latency_ms FLOAT NOT NULL, tool_calls INTEGER)"))
        conn.execute(sa.text("CREATE TABLE llm_service_schema (version INTEGER PRIMARY KEY, applied TIMESTAMP NOT NULL)"))
        conn.execute(sa.text("INSERT INTO llm_service_schema VALUES (4, :t)"), {"t": utcnow()})
        conn.execute(sa.text("INSERT INTO llm_requests (id, time, request_id, route, status, latency_ms) "
                             "VALUES (1, :t, 'old-1', '/v1/chat/completions', 200, 12.5)"), {"t": utcnow()})
    old.dispose()

    db = engine_for(url)
    try:
        stored = Stored(db)
        stored.ensure_schema()
        stored.ensure_schema()  # idempotent
        tables = set(sa.inspect(db).get_table_names())
        assert {"llm_responses", "llm_conversations", "llm_conversation_items", "llm_files", "llm_batches",
                "llm_batch_lines"} <= tables
        with db.connect() as conn:
            assert conn.execute(sa.text("SELECT request_id FROM llm_requests")).scalars().all() == ["old-1"]
            assert sorted(conn.execute(sa.text("SELECT version FROM llm_service_schema")).scalars()) == [4, SCHEMA_VERSION]
        assert SCHEMA_VERSION == 6
        columns = {c["name"] for c in sa.inspect(db).get_columns("llm_requests")}
        assert {"queued_ms", "batch_id"} <= columns  # v6's request log columns, added to the old table
        stored.put_response(_response("resp_1"))
        stored.create_conversation(_conversation("conv_1"), _items("item", 1))
        assert stored.get_response("resp_1", ALICE) is not None
        assert stored.list_items("conv_1", ALICE, None, None, "asc") == ([_items("item", 1)[0][1]], False)
    finally:
        db.dispose()


def test_a_locked_database_is_retried_then_reported(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    setup = engine_for(f"sqlite:///{path}")
    Stored(setup).ensure_schema()
    setup.dispose()
    # SQLite's lock wait cut to 50 ms, so that the retries are what is measured
    stored = Stored(sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05}))
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")

    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError):
        stored.put_response(_response("resp_1"))
    assert time.monotonic() - started >= 0.7  # three tries, 0.2 s and 0.5 s apart

    # released during the waits: the write goes through
    release = threading.Timer(0.3, holder.execute, ["COMMIT"])
    release.start()
    started = time.monotonic()
    stored.put_response(_response("resp_1"))
    assert time.monotonic() - started >= 0.2
    release.join()
    holder.close()
    assert stored.get_response("resp_1", ALICE) is not None
    stored.db.dispose()
