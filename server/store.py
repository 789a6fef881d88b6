"""The database, in SQLite (default) or PostgreSQL: the request log, stored responses and
conversations, and the Batch API's files and batches (their tables here, their operations in
`server.files` and `server.batches`).

The request log is one row per `/v1/*` request, written off the request path: `record` only puts
the row in a bounded buffer, and a writer thread inserts them in batches. A slow or dead database
never slows or fails a request: the writer retries with backoff while rows wait in the buffer;
when the buffer is full, further rows are counted in `llm_request_log_dropped_total` (and logged),
never dropped silently. On shutdown everything buffered is written (for up to `FLUSH_SECONDS` if
the database is down).

Stored responses and conversations (`Stored`) are the opposite: they are what a client asked to
keep, so each is written synchronously, in one short transaction, while the request waits. A
transient error is retried briefly; after that the failure reaches the caller (the API answers
503), never a silent loss.

The schema is created at start and migrated forward: tables a newer version adds are created,
columns it adds to the request log are added to an existing table (all of them nullable), and
`llm_service_schema` records the version.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import sqlalchemy as sa
import tenacity

log = logging.getLogger(__name__)

SCHEMA_VERSION = 6
BATCH = 500
FLUSH_SECONDS = 10.0
P = ParamSpec("P")
R = TypeVar("R")

metadata = sa.MetaData()
requests_table = sa.Table(
    "llm_requests",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("time", sa.DateTime, nullable=False, index=True),  # UTC, when the request arrived
    sa.Column("request_id", sa.String(128), nullable=False, index=True),
    sa.Column("key_name", sa.String(128), nullable=True),
    sa.Column("model", sa.String(256), nullable=True),
    sa.Column("engine", sa.String(32), nullable=True),
    sa.Column("alias", sa.String(256), nullable=True),  # the name the client asked for, when an alias
    sa.Column("route", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=True),
    sa.Column("completion_tokens", sa.Integer, nullable=True),
    sa.Column("ttft_ms", sa.Float, nullable=True),
    sa.Column("queued_ms", sa.Float, nullable=True),  # waiting for an engine slot (admitted at time + queued_ms)
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("finish_reason", sa.String(64), nullable=True),
    sa.Column("prompt", sa.Text, nullable=True),
    sa.Column("answer", sa.Text, nullable=True),
    # hints a client sent that an operator wants to see: its `metadata` (JSON) and end-user id
    sa.Column("metadata", sa.Text, nullable=True),
    sa.Column("safety_identifier", sa.String(256), nullable=True),
    # structured outputs: what the answer had to match (json, regex, grammar, structural_tag,
    # tools), and the tool calls the answers made
    sa.Column("constrained", sa.String(32), nullable=True),
    sa.Column("tool_calls", sa.Integer, nullable=True),
    sa.Column("batch_id", sa.String(64), nullable=True, index=True),  # a batch's line: the batch
    sa.Index("ix_llm_requests_key_time", "key_name", "time"),
)
schema_table = sa.Table(
    "llm_service_schema", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied", sa.DateTime, nullable=False),
)

# stored responses and conversations: the JSON columns hold what the API built; the store reads
# only the other columns
responses_table = sa.Table(
    "llm_responses", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=True),  # the key's name; NULL on a server without keys
    sa.Column("created", sa.DateTime, nullable=False, index=True),
    sa.Column("updated", sa.DateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("background", sa.Boolean, nullable=False),
    sa.Column("runner", sa.String(256), nullable=True),  # the instance running a background response
    sa.Column("previous_response_id", sa.String(64), nullable=True),
    sa.Column("conversation_id", sa.String(64), nullable=True),
    sa.Column("input", sa.Text, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("events", sa.Text, nullable=True),  # a background response's stream, for replay
)
conversations_table = sa.Table(
    "llm_conversations", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=True),
    sa.Column("created", sa.DateTime, nullable=False),
    sa.Column("updated", sa.DateTime, nullable=False, index=True),  # retention counts from here
    sa.Column("metadata", sa.Text, nullable=False),
)
items_table = sa.Table(
    "llm_conversation_items", metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("conversation_id", sa.String(64), nullable=False),
    sa.Column("item_id", sa.String(64), nullable=False, unique=True),
    sa.Column("created", sa.DateTime, nullable=False),
    sa.Column("item", sa.Text, nullable=False),
    # also serves lookups by conversation alone
    sa.Index("ix_llm_conversation_items_conversation_seq", "conversation_id", "seq"),
)


# the Batch API. A file's bytes are in `content` when the database is where they live (PostgreSQL
# without --files-dir), else in the files folder under the file's id
files_table = sa.Table(
    "llm_files", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=True),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created", sa.DateTime, nullable=False, index=True),
    sa.Column("expires", sa.DateTime, nullable=True, index=True),
    sa.Column("content", sa.LargeBinary, nullable=True),
)
# a batch's own columns; its request counts and usage are read off its lines, never stored twice
batches_table = sa.Table(
    "llm_batches", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("ending", sa.String(16), nullable=True),  # while finalizing: completed or expired
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("metadata", sa.Text, nullable=True),
    sa.Column("output_expires_seconds", sa.Integer, nullable=True),
    sa.Column("errors", sa.Text, nullable=True),
    sa.Column("output_file_id", sa.String(64), nullable=True),
    sa.Column("error_file_id", sa.String(64), nullable=True),
    sa.Column("created", sa.DateTime, nullable=False, index=True),
    sa.Column("expires", sa.DateTime, nullable=False),
    *(sa.Column(f"{phase}_at", sa.DateTime, nullable=True) for phase in
      ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")),
)
# one row per request of a batch: its state is what makes a batch durable (a line whose result
# is written is never run again; one claimed by a replica that died is claimed again when its
# lease runs out)
batch_lines_table = sa.Table(
    "llm_batch_lines", metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("line", sa.Integer, primary_key=True),  # 1-based, in the input file
    sa.Column("custom_id", sa.String(512), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # pending, running, done, failed
    sa.Column("runner", sa.String(256), nullable=True),  # the replica running it
    sa.Column("lease", sa.DateTime, nullable=True),  # its claim holds until then (renewed while it runs)
    sa.Column("not_before", sa.DateTime, nullable=True),  # a retry after a 429 or 503 waits till then
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("result", sa.Text, nullable=True),  # its output (or error) file line
    sa.Column("prompt_tokens", sa.Integer, nullable=True),
    sa.Column("completion_tokens", sa.Integer, nullable=True),
    sa.Column("cached_tokens", sa.Integer, nullable=True),
    sa.Index("ix_llm_batch_lines_state", "batch_id", "state"),
)


def keyset_page(conn: sa.Connection, table: sa.Table, visible: sa.ColumnElement[bool], query: sa.Select[Any],
                limit: int, after: str | None, order: Literal["asc", "desc"]) -> tuple[list[sa.Row[Any]], bool]:
    """A page of `query` over `table` ordered by (created, id), after the row `after` (KeyError when
    no `visible` row has that id), and whether more follow: the lists of conversations, files and
    batches."""
    key = sa.tuple_(table.c.created, table.c.id)
    if after is not None:
        mark = conn.execute(sa.select(table.c.created, table.c.id).where(table.c.id == after, visible)).first()
        if mark is None:
            raise KeyError(after)
        at = sa.tuple_(mark.created, mark.id)
        query = query.where(key > at if order == "asc" else key < at)
    by = (table.c.created.asc(), table.c.id.asc()) if order == "asc" else (table.c.created.desc(), table.c.id.desc())
    rows = conn.execute(query.order_by(*by).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zones, so both databases store UTC without one."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class Row:
    time: datetime
    request_id: str
    route: str
    status: int
    latency_ms: float
    key_name: str | None = None
    model: str | None = None
    engine: str | None = None
    alias: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    queued_ms: float | None = None
    finish_reason: str | None = None
    prompt: str | None = None
    answer: str | None = None
    metadata: str | None = None
    safety_identifier: str | None = None
    constrained: str | None = None
    tool_calls: int | None = None
    batch_id: str | None = None


def engine_for(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # one writer thread and readers in other threads: allow that, and wait on locks
        return sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    return sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2,
                            connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {})


_migrating = threading.Lock()  # the request log's writer, the response store and the batch runner all migrate


def migrate(db: sa.Engine) -> None:
    """Create what is missing; add columns a newer version introduced to an existing table."""
    with _migrating:
        _migrate(db)


def _migrate(db: sa.Engine) -> None:
    metadata.create_all(db)
    inspector = sa.inspect(db)
    have = {c["name"] for c in inspector.get_columns(requests_table.name)}
    with db.begin() as conn:
        for column in requests_table.columns:
            if column.name not in have:
                kind = column.type.compile(dialect=db.dialect)
                conn.execute(sa.text(f'ALTER TABLE {requests_table.name} ADD COLUMN "{column.name}" {kind}'))
                log.info("request log: added column %s", column.name)
        if conn.execute(sa.select(schema_table.c.version).where(schema_table.c.version == SCHEMA_VERSION)).first() is None:
            conn.execute(schema_table.insert().values(version=SCHEMA_VERSION, applied=utcnow()))


class RequestLog:
    """The buffer and its writer thread."""

    def __init__(self, url: str, buffer: int, on_dropped: Callable[[], None] = lambda: None,
                 on_error: Callable[[], None] = lambda: None) -> None:
        self.url = url
        self.db = engine_for(url)
        self.rows: queue.Queue[Row] = queue.Queue(maxsize=buffer)
        self.on_dropped, self.on_error = on_dropped, on_error
        self.stopping = threading.Event()
        self.idle = threading.Condition()
        self.pending = 0  # rows taken from the buffer but not yet committed
        self.ready = False  # schema in place
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, name="request-log", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def record(self, row: Row) -> None:
        """Never blocks: a full buffer counts the row as dropped."""
        try:
            self.rows.put_nowait(row)
        except queue.Full:
            self.dropped += 1
            self.on_dropped()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("request log buffer full (database slow or down): %d rows dropped so far", self.dropped)

    def backlog(self) -> int:
        return self.rows.qsize() + self.pending

    def wait_written(self, timeout: float) -> bool:
        """Wait until everything recorded so far is committed (or `timeout`)."""
        deadline = time.monotonic() + timeout
        with self.idle:
            while self.backlog():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.idle.wait(min(left, 0.1))
        return True

    def stop(self) -> None:
        """Write what is buffered (bounded by FLUSH_SECONDS when the database is down), then stop."""
        self.stopping.set()
        self.thread.join(FLUSH_SECONDS + 5)
        left = self.backlog()
        if left:
            log.error("request log: %d rows could not be written before shutdown", left)
        self.db.dispose()

    def _run(self) -> None:
        delay = 0.5
        batch: list[Row] = []
        flush_deadline: float | None = None
        while True:
            if self.stopping.is_set() and flush_deadline is None:
                flush_deadline = time.monotonic() + FLUSH_SECONDS
            if not batch:
                try:
                    batch.append(self.rows.get(timeout=0.2))
                except queue.Empty:
                    if self.stopping.is_set():
                        return
                    if not self.ready:
                        self._ensure_schema()
                    continue
                while len(batch) < BATCH:
                    try:
                        batch.append(self.rows.get_nowait())
                    except queue.Empty:
                        break
                self.pending = len(batch)
            try:
                if not self.ready:
                    migrate(self.db)
                    self.ready = True
                with self.db.begin() as conn:
                    conn.execute(requests_table.insert(), [asdict(r) for r in batch])
                batch = []
                delay = 0.5
                with self.idle:
                    self.pending = 0
                    self.idle.notify_all()
            except Exception as e:  # the database is down or slow: keep the batch, retry
                self.on_error()
                log.warning("request log: write of %d rows failed (%s: %s); retrying in %.1f s",
                            len(batch), type(e).__name__, str(e).splitlines()[0] if str(e) else "", delay)
                if flush_deadline is not None and time.monotonic() > flush_deadline:
                    return
                if self.stopping.is_set():
                    time.sleep(min(delay, 1.0))  # flushing at shutdown: keep trying until the deadline
                else:
                    self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def _ensure_schema(self) -> None:
        try:
            migrate(self.db)
            self.ready = True
        except Exception as e:
            self.on_error()
            log.warning("request log: database not ready (%s); rows wait in the buffer", type(e).__name__)
            self.stopping.wait(2.0)

    def usage(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Requests and tokens per key and model in [start, end)."""
        t = requests_table
        query = (
            sa.select(
                t.c.key_name, t.c.model,
                sa.func.count().label("requests"),
                sa.func.coalesce(sa.func.sum(t.c.prompt_tokens), 0).label("prompt_tokens"),
                sa.func.coalesce(sa.func.sum(t.c.completion_tokens), 0).label("completion_tokens"),
            )
            .where(t.c.time >= start, t.c.time < end)
            .group_by(t.c.key_name, t.c.model)
            .order_by(t.c.key_name, t.c.model)
        )
        with self.db.connect() as conn:
            rows = conn.execute(query).all()
        return [
            {"key_name": r.key_name, "model": r.model, "requests": int(r.requests),
             "prompt_tokens": int(r.prompt_tokens), "completion_tokens": int(r.completion_tokens),
             "total_tokens": int(r.prompt_tokens) + int(r.completion_tokens)}
            for r in rows
        ]


class MissingAncestor(LookupError):
    """A chain names a previous response that is gone (deleted, past retention) or not the
    viewer's."""

    def __init__(self, id: str) -> None:
        super().__init__(f"previous response {id!r} not found")
        self.id = id


class ChainTooLong(ValueError):
    """More previous responses than the limit (a loop ends here too)."""


@dataclass(frozen=True)
class Viewer:
    """Who asks: `owner` is the key's name (None without keys); `all` sees every row (an admin
    key, or a server without keys)."""
    owner: str | None
    all: bool = False

    def sees(self, owner: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        if self.all:
            return sa.true()
        if self.owner is None:
            return sa.false()  # rows without an owner come from a server without keys
        return owner == self.owner


@dataclass
class StoredResponse:
    """A response as the Responses API keeps it; `created` is naive UTC."""
    id: str
    owner: str | None
    created: datetime
    status: str
    background: bool
    input: list[dict[str, Any]]
    response: dict[str, Any]
    previous_response_id: str | None = None
    conversation_id: str | None = None
    runner: str | None = None
    events: list[dict[str, Any]] | None = None


@dataclass
class Conversation:
    id: str
    owner: str | None
    created: datetime
    metadata: dict[str, str]


def _json(value: Any) -> str:
    # compact, and text as UTF-8 rather than \u escapes: events of a long stream add up
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _transient(e: BaseException) -> bool:
    """Worth another try: a dropped connection, or a busy database (SQLite's lock)."""
    return isinstance(e, sa.exc.OperationalError) or (isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated)


_retrying = tenacity.Retrying(
    retry=tenacity.retry_if_exception(_transient), stop=tenacity.stop_after_attempt(3),
    wait=tenacity.wait_chain(tenacity.wait_fixed(0.2), tenacity.wait_fixed(0.5)),
    before_sleep=tenacity.before_sleep_log(log, logging.WARNING), reraise=True)


def _retried(method: Callable[P, R]) -> Callable[P, R]:
    """tenacity's retry typed as the method itself: its own decorator's type drops a method's
    parameters, and callers' arguments would go unchecked."""
    return _retrying.wraps(method)


class Stored:
    """Stored responses and conversations. Every method is one short synchronous transaction
    (the API calls them through `asyncio.to_thread`), retried on transient errors and otherwise
    raising. Rows the viewer may not see behave exactly as missing ones."""

    def __init__(self, db: sa.Engine) -> None:
        self.db = db

    @_retried
    def ensure_schema(self) -> None:
        migrate(self.db)

    # responses

    @_retried
    def put_response(self, r: StoredResponse) -> None:
        """Insert, or replace every column of the row with that id."""
        t = responses_table
        values = {
            "owner": r.owner, "created": r.created, "updated": utcnow(), "status": r.status,
            "background": r.background, "runner": r.runner, "previous_response_id": r.previous_response_id,
            "conversation_id": r.conversation_id, "input": _json(r.input), "response": _json(r.response),
            "events": None if r.events is None else _json(r.events),
        }
        with self.db.begin() as conn:
            # update, else insert: portable, and one writer per response id
            if conn.execute(t.update().where(t.c.id == r.id).values(values)).rowcount == 0:
                conn.execute(t.insert().values(id=r.id, **values))

    @_retried
    def get_response(self, id: str, viewer: Viewer) -> StoredResponse | None:
        t = responses_table
        with self.db.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == id, viewer.sees(t.c.owner))).first()
        return None if row is None else _stored_response(row)

    @_retried
    def delete_response(self, id: str, viewer: Viewer) -> bool:
        t = responses_table
        with self.db.begin() as conn:
            return conn.execute(t.delete().where(t.c.id == id, viewer.sees(t.c.owner))).rowcount > 0

    @_retried
    def chain(self, id: str, viewer: Viewer, limit: int = 1000) -> list[StoredResponse] | None:
        """The response `id` and its ancestors through previous_response_id, oldest first, in one
        recursive query. None when `id` is not visible; MissingAncestor when a link is gone or
        not the viewer's; ChainTooLong beyond `limit` hops."""
        t, parent = responses_table, responses_table.alias("parent")
        # a literal 0, not a parameter: PostgreSQL wants one type for `hops` in both terms
        links = (sa.select(t.c.id, t.c.previous_response_id, sa.literal_column("0", sa.Integer).label("hops"))
                 .where(t.c.id == id, viewer.sees(t.c.owner))
                 .cte("links", recursive=True))
        links = links.union_all(
            sa.select(parent.c.id, parent.c.previous_response_id, links.c.hops + 1)
            .join_from(links, parent, parent.c.id == links.c.previous_response_id)
            .where(viewer.sees(parent.c.owner), links.c.hops <= limit))  # one hop past: "too long"
        query = sa.select(t, links.c.hops).join(links, links.c.id == t.c.id).order_by(links.c.hops.desc())
        with self.db.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            return None
        oldest = rows[0]
        if oldest.hops > limit:
            raise ChainTooLong(f"more than {limit} previous responses")
        if oldest.previous_response_id is not None:
            raise MissingAncestor(oldest.previous_response_id)
        return [_stored_response(row) for row in rows]

    @_retried
    def fail_unfinished(self, runner: str, error: dict[str, Any], before: datetime) -> int:
        """Mark failed, with `error`, every queued or in-progress response `runner` was running,
        made before `before` (this start: what it makes from now on is its own). Called at start,
        so a restart never silently loses a response; a background one's replay ends with the
        failure too. Returns how many."""
        t = responses_table
        unfinished = sa.and_(t.c.runner == runner, t.c.status.in_(("queued", "in_progress")), t.c.created < before)
        failed = 0
        with self.db.begin() as conn:
            for row in conn.execute(sa.select(t.c.id, t.c.response, t.c.events).where(unfinished)).all():
                response = json.loads(row.response) | {"status": "failed", "error": error}
                events = json.loads(row.events) if row.events else None
                if events is not None:
                    events.append({"type": "response.failed", "response": response, "sequence_number": len(events)})
                # still unfinished: one that ended meanwhile keeps its ending
                failed += conn.execute(t.update().where(t.c.id == row.id, unfinished).values(
                    status="failed", response=_json(response), events=_json(events) if events is not None else None,
                    updated=utcnow())).rowcount
        return failed

    @_retried
    def sweep(self, before: datetime) -> tuple[int, int]:
        """Delete responses created before `before`, and conversations last changed before it
        with their items. Returns (responses, conversations) deleted."""
        r, c, i = responses_table, conversations_table, items_table
        with self.db.begin() as conn:
            responses = conn.execute(r.delete().where(r.c.created < before)).rowcount
            # conversations first: their rows stay locked to the commit, so `add_items` meanwhile
            # waits, then finds no conversation, rather than adding to one being deleted
            gone = list(conn.execute(c.delete().where(c.c.updated < before).returning(c.c.id)).scalars())
            for start in range(0, len(gone), 500):  # SQLite caps the parameters of one statement
                conn.execute(i.delete().where(i.c.conversation_id.in_(gone[start:start + 500])))
        return responses, len(gone)

    # conversations

    @_retried
    def create_conversation(self, c: Conversation, items: list[tuple[str, dict[str, Any]]]) -> None:
        """The conversation and its first items, (item_id, item) in order, together."""
        now = utcnow()
        with self.db.begin() as conn:
            conn.execute(conversations_table.insert().values(
                {"id": c.id, "owner": c.owner, "created": c.created, "updated": now, "metadata": _json(c.metadata)}))
            self._append(conn, c.id, items, now)

    @_retried
    def get_conversation(self, id: str, viewer: Viewer) -> Conversation | None:
        c = conversations_table
        with self.db.connect() as conn:
            row = conn.execute(sa.select(c).where(c.c.id == id, viewer.sees(c.c.owner))).first()
        return None if row is None else _conversation(row)

    @_retried
    def update_conversation(self, id: str, viewer: Viewer, metadata: dict[str, str]) -> Conversation | None:
        """Replace the metadata."""
        c = conversations_table
        with self.db.begin() as conn:
            mine = sa.and_(c.c.id == id, viewer.sees(c.c.owner))
            changed = c.update().where(mine).values({"metadata": _json(metadata), "updated": utcnow()})
            if conn.execute(changed).rowcount == 0:
                return None
            return _conversation(conn.execute(sa.select(c).where(mine)).one())

    @_retried
    def delete_conversation(self, id: str, viewer: Viewer) -> bool:
        """The conversation and its items."""
        c, i = conversations_table, items_table
        with self.db.begin() as conn:
            if conn.execute(c.delete().where(c.c.id == id, viewer.sees(c.c.owner))).rowcount == 0:
                return False
            conn.execute(i.delete().where(i.c.conversation_id == id))
        return True

    @_retried
    def list_conversations(self, viewer: Viewer, limit: int, after: str | None,
                           order: Literal["asc", "desc"]) -> tuple[list[Conversation], bool]:
        """A page ordered by (created, id), and whether more follow. `after` is a conversation id;
        KeyError when it is not visible."""
        c = conversations_table
        visible = viewer.sees(c.c.owner)
        with self.db.connect() as conn:
            rows, more = keyset_page(conn, c, visible, sa.select(c).where(visible), limit, after, order)
        return [_conversation(row) for row in rows], more

    @_retried
    def add_items(self, conversation_id: str, viewer: Viewer, items: list[tuple[str, dict[str, Any]]]) -> bool:
        """Append (item_id, item) pairs in order; False when the conversation is not visible."""
        c = conversations_table
        now = utcnow()
        with self.db.begin() as conn:
            # touch first: that locks the conversation against a concurrent delete or sweep
            touched = conn.execute(c.update().where(c.c.id == conversation_id, viewer.sees(c.c.owner))
                                   .values(updated=now)).rowcount
            if touched == 0:
                return False
            self._append(conn, conversation_id, items, now)
        return True

    @_retried
    def list_items(self, conversation_id: str, viewer: Viewer, limit: int | None, after: str | None,
                   order: Literal["asc", "desc"]) -> tuple[list[dict[str, Any]], bool] | None:
        """A page of the conversation's items in the order they were added (`limit` None: all of
        them), and whether more follow. None when the conversation is not visible; KeyError when
        `after` is not one of its items."""
        c, i = conversations_table, items_table
        query = sa.select(i.c.item).where(i.c.conversation_id == conversation_id)
        with self.db.connect() as conn:
            if conn.execute(sa.select(c.c.id).where(c.c.id == conversation_id, viewer.sees(c.c.owner))).first() is None:
                return None
            if after is not None:
                seq = conn.execute(sa.select(i.c.seq).where(i.c.conversation_id == conversation_id,
                                                             i.c.item_id == after)).scalar()
                if seq is None:
                    raise KeyError(after)
                query = query.where(i.c.seq > seq if order == "asc" else i.c.seq < seq)
            query = query.order_by(i.c.seq.asc() if order == "asc" else i.c.seq.desc())
            if limit is not None:
                query = query.limit(limit + 1)
            texts = conn.execute(query).scalars().all()
        return [json.loads(text) for text in texts[:limit]], limit is not None and len(texts) > limit

    @_retried
    def get_item(self, conversation_id: str, item_id: str, viewer: Viewer) -> dict[str, Any] | None:
        c, i = conversations_table, items_table
        query = (sa.select(i.c.item).join(c, c.c.id == i.c.conversation_id)
                 .where(i.c.conversation_id == conversation_id, i.c.item_id == item_id, viewer.sees(c.c.owner)))
        with self.db.connect() as conn:
            text = conn.execute(query).scalar()
        return None if text is None else json.loads(text)

    @_retried
    def delete_item(self, conversation_id: str, item_id: str, viewer: Viewer) -> bool:
        """Delete one item; the conversation counts as changed (its retention starts again)."""
        c, i = conversations_table, items_table
        visible = sa.select(c.c.id).where(c.c.id == conversation_id, viewer.sees(c.c.owner)).exists()
        with self.db.begin() as conn:
            deleted = conn.execute(i.delete().where(i.c.conversation_id == conversation_id, i.c.item_id == item_id,
                                                    visible)).rowcount
            if deleted:
                conn.execute(c.update().where(c.c.id == conversation_id).values(updated=utcnow()))
        return deleted > 0

    def _append(self, conn: sa.Connection, conversation_id: str, items: list[tuple[str, dict[str, Any]]],
                now: datetime) -> None:
        if items:  # one multi-row insert; `seq` follows the list's order
            conn.execute(items_table.insert(), [
                {"conversation_id": conversation_id, "item_id": item_id, "created": now, "item": _json(item)}
                for item_id, item in items])


def _stored_response(row: sa.Row[Any]) -> StoredResponse:
    return StoredResponse(
        id=row.id, owner=row.owner, created=row.created, status=row.status, background=row.background,
        input=json.loads(row.input), response=json.loads(row.response),
        previous_response_id=row.previous_response_id, conversation_id=row.conversation_id,
        runner=row.runner, events=None if row.events is None else json.loads(row.events))


def _conversation(row: sa.Row[Any]) -> Conversation:
    m = row._mapping  # `metadata` is a column here, not the table's MetaData
    return Conversation(id=m["id"], owner=m["owner"], created=m["created"], metadata=json.loads(m["metadata"]))
