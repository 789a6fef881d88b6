"""The request log: one row per `/v1/*` request, in SQLite (default) or PostgreSQL.

Rows are written off the request path: `record` only puts the row in a bounded buffer, and a
writer thread inserts them in batches. A slow or dead database never slows or fails a request:
the writer retries with backoff while rows wait in the buffer; when the buffer is full, further
rows are counted in `llm_request_log_dropped_total` (and logged), never dropped silently. On
shutdown everything buffered is written (for up to `FLUSH_SECONDS` if the database is down).

The schema is created at start and migrated forward: columns a newer version adds are added to
an existing table (all of them nullable), and `llm_service_schema` records the version.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
BATCH = 500
FLUSH_SECONDS = 10.0

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
    sa.Index("ix_llm_requests_key_time", "key_name", "time"),
)
schema_table = sa.Table(
    "llm_service_schema", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied", sa.DateTime, nullable=False),
)


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
    finish_reason: str | None = None
    prompt: str | None = None
    answer: str | None = None
    metadata: str | None = None
    safety_identifier: str | None = None
    constrained: str | None = None
    tool_calls: int | None = None


def engine_for(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # one writer thread and readers in other threads: allow that, and wait on locks
        return sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    return sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2,
                            connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {})


def migrate(db: sa.Engine) -> None:
    """Create what is missing; add columns a newer version introduced to an existing table."""
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
