"""Batches (`/v1/batches`): their state in the database, and the runner that works through them.

A batch's life, each step one transaction that changes its status only from the one expected
(so that of several replicas sharing a database exactly one makes each step):

    validating -> in_progress -> finalizing -> completed
         |             |  \\-> finalizing (its window ran out) -> expired
         v             \\-> cancelling -> cancelled
       failed (bad lines: `errors.data` names each)

Validation reads the input file once and stores each line (`llm_batch_lines`) with its state.
A runner claims pending lines (PostgreSQL: `FOR UPDATE SKIP LOCKED`; on both databases the claim
is an update that succeeds only on a line still claimable), runs each through the server's own
HTTP app, so a line passes the gate and the pipeline exactly as a request does (its key's limits,
metrics, the request log with its `batch_id`), and writes its result only while its claim is its
own. A claim is a lease that the runner renews while the line runs; a replica killed mid-line
leaves a lease that runs out, and the line is claimed again. So a line whose result was written
is never sent again, and each `custom_id` is in the output exactly once.

Batch lines wait behind interactive requests in every model's queue (`Admission`), and at most
`--batch-concurrency` run at once here. A line already running is not preempted: a new
interactive request takes a free slot beside it (the cap leaves slots free). On SIGTERM the
runner pauses: its lines in flight are aborted and go back to pending, for the restart (or
another replica) to run.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import sqlalchemy as sa

from server.files import FileRow, Files, new_file_id
from server.store import (
    Viewer,
    _retried,
    batch_lines_table,
    batches_table,
    keyset_page,
    migrate,
    utcnow,
)

if TYPE_CHECKING:
    import httpx

    from server.app import ServerState

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MAX_LINES = 50_000  # OpenAI's cap on requests in one batch
MAX_ERRORS = 100  # validation errors listed in `errors.data`
LEASE = timedelta(seconds=15)  # a claim lasts this long unless renewed (every RENEW_SECONDS)
RENEW_SECONDS = 4.0
TICK_SECONDS = 0.5
# the runner's requests carry these; the gate trusts them only with this process's secret
HEADER, BATCH_HEADER, OWNER_HEADER = "x-llm-service-batch", "x-llm-service-batch-id", "x-llm-service-batch-owner"
ENDED = ("completed", "failed", "expired", "cancelled")


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def _epoch(t: datetime | None) -> int | None:
    return None if t is None else int(t.replace(tzinfo=timezone.utc).timestamp())


@dataclass(frozen=True)
class Line:
    batch_id: str
    line: int
    custom_id: str
    body: dict[str, Any]
    endpoint: str
    owner: str | None


@dataclass(frozen=True)
class Outcome:
    """What running a line came to: its output or error file line, and its tokens."""

    ok: bool
    result: dict[str, Any]
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


class Batches:
    """The batches' rows and their lines. Every method is one short synchronous transaction."""

    def __init__(self, db: sa.Engine, files: Files, window: float) -> None:
        self.db = db
        self.files = files
        self.window = timedelta(seconds=window)
        self.postgres = db.dialect.name == "postgresql"

    # ------------------------------------------------------------------ the API's calls

    @_retried
    def create(self, owner: str | None, endpoint: str, input_file_id: str, metadata: dict[str, str] | None,
               output_expires_seconds: int | None) -> dict[str, Any]:
        now, id = utcnow(), new_batch_id()
        with self.db.begin() as conn:
            conn.execute(batches_table.insert().values(
                id=id, owner=owner, status="validating", endpoint=endpoint, input_file_id=input_file_id,
                completion_window="24h", metadata=json.dumps(metadata) if metadata is not None else None,
                output_expires_seconds=output_expires_seconds, created=now, expires=now + self.window))
            return self._objects(conn, [self._row(conn, id)])[0]

    @_retried
    def get(self, id: str, viewer: Viewer) -> dict[str, Any] | None:
        t = batches_table
        with self.db.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == id, viewer.sees(t.c.owner))).first()
            return None if row is None else self._objects(conn, [row])[0]

    @_retried
    def page(self, viewer: Viewer, limit: int, after: str | None) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; KeyError for an `after` the viewer cannot see."""
        t = batches_table
        visible = viewer.sees(t.c.owner)
        with self.db.connect() as conn:
            rows, more = keyset_page(conn, t, visible, sa.select(t).where(visible), limit, after, "desc")
            return self._objects(conn, rows), more

    @_retried
    def cancel(self, id: str, viewer: Viewer) -> dict[str, Any] | None:
        """in_progress or validating -> cancelling (the runners stop its lines); others as they are."""
        t = batches_table
        with self.db.begin() as conn:
            conn.execute(t.update().where(t.c.id == id, viewer.sees(t.c.owner), t.c.status.in_(("validating", "in_progress")))
                         .values(status="cancelling", cancelling_at=utcnow()))
            row = conn.execute(sa.select(t).where(t.c.id == id, viewer.sees(t.c.owner))).first()
            return None if row is None else self._objects(conn, [row])[0]

    # ------------------------------------------------------------------ the runners' calls

    @_retried
    def validating(self) -> list[str]:
        t = batches_table
        with self.db.connect() as conn:
            return [r.id for r in conn.execute(sa.select(t.c.id).where(t.c.status == "validating")
                                               .order_by(t.c.created)).all()]

    def validate(self, id: str) -> None:
        """Check the input file line by line; store the lines (in_progress) or the errors (failed)."""
        t = batches_table
        with self.db.connect() as conn:
            batch = conn.execute(sa.select(t).where(t.c.id == id)).first()
        if batch is None or batch.status != "validating":
            return
        data = self.files.content(batch.input_file_id, Viewer(None, all=True))
        lines, errors = _parse(data, batch.endpoint) if data is not None else (
            [], [{"code": "missing_file", "message": f"The input file {batch.input_file_id} was deleted.", "param": "input_file_id",
              "line": None}])
        now = utcnow()
        with self.db.begin() as conn:
            # a CAS: of several replicas validating at once, one stores the lines
            if errors:
                conn.execute(t.update().where(t.c.id == id, t.c.status == "validating").values(
                    status="failed", failed_at=now, errors=json.dumps({"object": "list", "data": errors[:MAX_ERRORS]})))
                return
            if conn.execute(t.update().where(t.c.id == id, t.c.status == "validating")
                            .values(status="in_progress", in_progress_at=now)).rowcount == 1:
                conn.execute(batch_lines_table.insert(), [
                    {"batch_id": id, "line": n, "custom_id": custom_id, "body": json.dumps(body), "state": "pending",
                     "attempts": 0} for n, custom_id, body in lines])

    @_retried
    def fail_validation(self, id: str, message: str) -> None:
        t = batches_table
        error = {"code": "validation_error", "message": message, "param": None, "line": None}
        with self.db.begin() as conn:
            conn.execute(t.update().where(t.c.id == id, t.c.status == "validating").values(
                status="failed", failed_at=utcnow(), errors=json.dumps({"object": "list", "data": [error]})))

    @_retried
    def claim(self, runner: str, n: int) -> list[Line]:
        """Up to `n` lines of in-progress batches for `runner`: pending ones, and running ones whose
        lease ran out (their replica died), oldest batch first."""
        b, t = batches_table, batch_lines_table
        now = utcnow()
        # a running line whose lease ran out belongs to a replica that died (never to this one: its
        # task may still be running it); and the batch must still be in progress when it is taken
        claimable = sa.and_(sa.or_(t.c.state == "pending",
                                   sa.and_(t.c.state == "running", t.c.lease < now, t.c.runner != runner)),
                            sa.or_(t.c.not_before.is_(None), t.c.not_before <= now),
                            _batch_is(t, ("in_progress",)))
        query = (sa.select(t.c.batch_id, t.c.line, t.c.custom_id, t.c.body, b.c.endpoint, b.c.owner)
                 .join(b, b.c.id == t.c.batch_id)
                 .where(b.c.status == "in_progress", claimable)
                 .order_by(b.c.created, t.c.batch_id, t.c.line).limit(n))
        if self.postgres:
            query = query.with_for_update(of=t, skip_locked=True)
        out = []
        with self.db.begin() as conn:
            for r in conn.execute(query).all():
                mine = conn.execute(t.update().where(t.c.batch_id == r.batch_id, t.c.line == r.line, claimable).values(
                    state="running", runner=runner, lease=now + LEASE, attempts=t.c.attempts + 1)).rowcount
                if mine:
                    out.append(Line(r.batch_id, r.line, r.custom_id, json.loads(r.body), r.endpoint, r.owner))
        return out

    @_retried
    def ensure_schema(self) -> None:
        migrate(self.db)

    @_retried
    def reclaim(self, replica: str, runner: str) -> int:
        """Lines an earlier process of `replica` was running go back to pending (it is gone)."""
        t = batch_lines_table
        with self.db.begin() as conn:
            return conn.execute(t.update().where(t.c.state == "running", t.c.runner.startswith(replica + "/", autoescape=True),
                                                 t.c.runner != runner)
                                .values(state="pending", runner=None, lease=None)).rowcount

    @_retried
    def renew(self, runner: str) -> None:
        t = batch_lines_table
        with self.db.begin() as conn:
            conn.execute(t.update().where(t.c.runner == runner, t.c.state == "running").values(lease=utcnow() + LEASE))

    @_retried
    def finish(self, line: Line, runner: str, outcome: Outcome) -> bool:
        """Write a line's result, if its claim is still `runner`'s (else another replica took it
        over, and its result is the one that counts)."""
        t = batch_lines_table
        with self.db.begin() as conn:
            if self.postgres:  # wait for a finalize in progress (it holds the batch row), then see its status
                conn.execute(sa.select(batches_table.c.status).where(batches_table.c.id == line.batch_id)
                             .with_for_update(read=True))
            # one statement (atomic on SQLite too): nothing is written to a batch that has ended, so
            # its files and counts always agree
            return conn.execute(t.update().where(
                t.c.batch_id == line.batch_id, t.c.line == line.line, t.c.runner == runner, t.c.state == "running",
                _batch_is(t, ("in_progress", "finalizing", "cancelling")),
            ).values(state="done" if outcome.ok else "failed", runner=None, lease=None, result=json.dumps(outcome.result),
                     prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                     cached_tokens=outcome.cached_tokens)).rowcount == 1

    @_retried
    def release(self, line: Line, runner: str, wait: float = 0.0) -> None:
        """Give a line back (pending), to run again after `wait` seconds."""
        t = batch_lines_table
        with self.db.begin() as conn:
            conn.execute(t.update().where(t.c.batch_id == line.batch_id, t.c.line == line.line, t.c.runner == runner,
                                          t.c.state == "running")
                         .values(state="pending", runner=None, lease=None,
                                 not_before=utcnow() + timedelta(seconds=wait) if wait else None))

    @_retried
    def statuses(self, ids: Iterable[str]) -> dict[str, str]:
        t = batches_table
        with self.db.connect() as conn:
            return {r.id: r.status for r in conn.execute(sa.select(t.c.id, t.c.status).where(t.c.id.in_(list(ids)))).all()}

    @_retried
    def settle(self) -> list[tuple[str, str]]:
        """Move batches on: in_progress with every line ended, or past its window -> finalizing;
        finalizing or cancelling with no line running -> completed, expired or cancelled, their
        output and error files written in the same transaction. Returns (id, status) of the
        batches that ended."""
        b, t = batches_table, batch_lines_table
        now, ended = utcnow(), []
        live = sa.or_(t.c.state == "pending", t.c.state == "running")
        running = sa.and_(t.c.state == "running", t.c.lease >= now)
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(b.c.id, b.c.status, b.c.expires).where(
                b.c.status.in_(("in_progress", "finalizing", "cancelling")))).all()
        for row in rows:
            with self.db.begin() as conn:
                def left(which: sa.ColumnElement[bool], id: str = row.id) -> int:
                    return int(conn.execute(sa.select(sa.func.count()).select_from(t)
                                            .where(t.c.batch_id == id, which)).scalar_one())

                if row.status == "in_progress":
                    ending = "completed" if left(live) == 0 else "expired" if row.expires <= now else None
                    if ending is not None:
                        conn.execute(b.update().where(b.c.id == row.id, b.c.status == "in_progress").values(
                            status="finalizing", ending=ending, finalizing_at=now))
                    continue
                if left(running):
                    continue  # its lines in flight are given back first (their runners stop them)
            status = self._finalize(row.id, row.status)
            if status is not None:
                ended.append((row.id, status))
        return ended

    def _finalize(self, id: str, status: str) -> str | None:
        """End a batch: its status first (a compare-and-set that also holds off `finish`), then its
        lines read in the same transaction, its output and error files written with it."""
        b, t = batches_table, batch_lines_table
        made: list[FileRow] = []
        try:
            with self.db.begin() as conn:
                batch = conn.execute(sa.select(b).where(b.c.id == id)).first()
                if batch is None or batch.status != status:
                    return None
                final = "cancelled" if status == "cancelling" else batch.ending or "completed"
                now = utcnow()
                if conn.execute(b.update().where(b.c.id == id, b.c.status == status)
                                .values(status=final, **{f"{final}_at": now})).rowcount != 1:
                    return None  # another replica ended it
                lines = conn.execute(sa.select(t.c.line, t.c.custom_id, t.c.state, t.c.result)
                                     .where(t.c.batch_id == id).order_by(t.c.line)).all()
                why = {"cancelled": ("batch_cancelled", "This request was not run: its batch was cancelled."),
                       "expired": ("batch_expired", "This request could not be executed before the completion "
                                                    "window expired.")}.get(final, ("batch_failed", "This request was not run."))
                output, errors = [], []
                for line in lines:
                    if line.state == "done":
                        output.append(line.result)
                    elif line.state == "failed":
                        errors.append(line.result)
                    else:
                        errors.append(json.dumps({"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": line.custom_id,
                                                  "response": None, "error": {"code": why[0], "message": why[1]}}))
                expires = now + timedelta(seconds=batch.output_expires_seconds) if batch.output_expires_seconds else None
                ids: dict[str, str | None] = {"output": None, "error": None}
                for kind, content in (("output", output), ("error", errors)):
                    if content:
                        data = ("\n".join(content) + "\n").encode()
                        row = FileRow(new_file_id(), batch.owner, "batch_output", f"{id}_{kind}.jsonl", len(data), now,
                                      expires)
                        self.files.write(row.id, data)
                        made.append(row)
                        self.files.insert(conn, row, data)
                        ids[kind] = row.id
                conn.execute(b.update().where(b.c.id == id).values(output_file_id=ids["output"],
                                                                   error_file_id=ids["error"]))
        except BaseException:
            for row in made:
                self.files.discard(row.id)
            raise
        return final

    # ------------------------------------------------------------------ the batch object

    def _row(self, conn: sa.Connection, id: str) -> sa.Row[Any]:
        return conn.execute(sa.select(batches_table).where(batches_table.c.id == id)).one()

    def _objects(self, conn: sa.Connection, rows: list[sa.Row[Any]]) -> list[dict[str, Any]]:
        """OpenAI's batch objects; request counts and usage are read off the lines (one query)."""
        t = batch_lines_table
        counts: dict[str, dict[str, int]] = {r.id: {} for r in rows}
        tokens: dict[str, tuple[int, int, int]] = {}
        if rows:
            for c in conn.execute(sa.select(t.c.batch_id, t.c.state, sa.func.count().label("n"),
                                            sa.func.coalesce(sa.func.sum(t.c.prompt_tokens), 0).label("p"),
                                            sa.func.coalesce(sa.func.sum(t.c.completion_tokens), 0).label("c"),
                                            sa.func.coalesce(sa.func.sum(t.c.cached_tokens), 0).label("k"))
                                  .where(t.c.batch_id.in_(list(counts))).group_by(t.c.batch_id, t.c.state)).all():
                counts[c.batch_id][c.state] = int(c.n)
                p, o, k = tokens.get(c.batch_id, (0, 0, 0))
                tokens[c.batch_id] = (p + int(c.p), o + int(c.c), k + int(c.k))
        out = []
        for r in rows:
            n = counts[r.id]
            total, done, failed = sum(n.values()), n.get("done", 0), n.get("failed", 0)
            if r.status in ENDED:  # what never ran is in the error file, so it counts as failed
                failed = total - done
            p, o, k = tokens.get(r.id, (0, 0, 0))
            out.append({
                "id": r.id, "object": "batch", "endpoint": r.endpoint,
                "errors": json.loads(r.errors) if r.errors else None,
                "input_file_id": r.input_file_id, "completion_window": r.completion_window, "status": r.status,
                "output_file_id": r.output_file_id, "error_file_id": r.error_file_id,
                "created_at": _epoch(r.created), "in_progress_at": _epoch(r.in_progress_at),
                "expires_at": _epoch(r.expires), "finalizing_at": _epoch(r.finalizing_at),
                "completed_at": _epoch(r.completed_at), "failed_at": _epoch(r.failed_at),
                "expired_at": _epoch(r.expired_at), "cancelling_at": _epoch(r.cancelling_at),
                "cancelled_at": _epoch(r.cancelled_at),
                "request_counts": {"total": total, "completed": done, "failed": failed},
                "metadata": json.loads(r.metadata) if r.metadata else None,
                "usage": {"input_tokens": p, "input_tokens_details": {"cached_tokens": k}, "output_tokens": o,
                          "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": p + o},
            })
        return out


def _batch_is(t: sa.Table, statuses: tuple[str, ...]) -> sa.ColumnElement[bool]:
    """The line's batch has one of `statuses` (a correlated EXISTS, so it holds within the statement)."""
    b = batches_table
    return sa.exists().where(b.c.id == t.c.batch_id, b.c.status.in_(statuses)).correlate(t)


def _parse(data: bytes, endpoint: str) -> tuple[list[tuple[int, str, dict[str, Any]]], list[dict[str, Any]]]:
    """The input file's requests (line number, custom_id, body), and what is wrong with it, as
    OpenAI names it: each error has a code, a message and the 1-based line."""
    lines: list[tuple[int, str, dict[str, Any]]] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}

    def bad(n: int, code: str, message: str, param: str | None = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": n})

    for n, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as e:
            bad(n, "invalid_json_line", f"This line is not valid JSON: {e.msg}.")
            continue
        if not isinstance(item, dict):
            bad(n, "invalid_json_line", "Each line must be a JSON object.")
            continue
        unknown = sorted(set(item) - {"custom_id", "method", "url", "body"})
        if unknown:
            bad(n, "invalid_request", f"Unknown field(s) {', '.join(unknown)}: a line has custom_id, method, url and body.",
                unknown[0])
        custom_id, method, url, body = item.get("custom_id"), item.get("method"), item.get("url"), item.get("body")
        for name, value in (("custom_id", custom_id), ("method", method), ("url", url), ("body", body)):
            if value is None:
                bad(n, "missing_required_parameter", f"Missing required parameter: '{name}'.", name)
        if custom_id is not None and (not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512
                                      or not _storable(custom_id)):
            bad(n, "invalid_custom_id", "'custom_id' must be a non-empty string of at most 512 characters (valid "
                "Unicode, without NUL).", "custom_id")
        elif isinstance(custom_id, str) and custom_id in seen:
            bad(n, "duplicate_custom_id", f"The custom_id {custom_id!r} is also on line {seen[custom_id]}; each must be "
                "unique within a batch.", "custom_id")
        if method is not None and method != "POST":
            bad(n, "invalid_method", f"'method' must be POST, not {method!r}.", "method")
        if url is not None and url != endpoint:
            bad(n, "invalid_url", f"'url' must be this batch's endpoint {endpoint}, not {url!r}.", "url")
        if body is not None and not isinstance(body, dict):
            bad(n, "invalid_body", "'body' must be a JSON object (the request's body).", "body")
        if isinstance(custom_id, str) and custom_id:
            seen.setdefault(custom_id, n)
        if not errors or errors[-1]["line"] != n:
            lines.append((n, str(custom_id), body if isinstance(body, dict) else {}))
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "The input file has no requests.", "param": None, "line": None})
    if len(lines) > MAX_LINES:
        errors.append({"code": "too_many_requests", "message": f"A batch may hold at most {MAX_LINES} requests, "
                       f"not {len(lines)}.", "param": None, "line": None})
    return lines, errors


def _storable(text: str) -> bool:
    """Text both databases can store: valid UTF-8 (no lone surrogates) and no NUL (PostgreSQL's)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def check_jsonl(data: bytes) -> None:
    """An upload for batches must be JSON Lines (each line an object): ValueError naming the line."""
    for n, raw in enumerate(data.decode("utf-8", errors="strict").splitlines(), 1):
        if raw.strip():
            try:
                item = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise ValueError(f"line {n} is not a JSON object")


# ---------------------------------------------------------------------------------------- the runner


class Runner:
    """Works through the batches on this replica: validates new ones, claims lines while fewer
    than --batch-concurrency run here, runs each through the app, and settles finished batches."""

    def __init__(self, state: ServerState, batches: Batches, client: httpx.AsyncClient) -> None:
        self.state = state
        self.batches = batches
        self.client = client
        self.secret = secrets.token_urlsafe(32)
        # this process: its claims are its own (a restart of the same replica is another runner)
        self.id = f"{state.runner}/{secrets.token_hex(4)}"
        self.running: dict[asyncio.Task[None], Line] = {}
        self.wake = asyncio.Event()
        self.paused = False

    def trusted(self, header: str | None) -> bool:
        return header is not None and hmac.compare_digest(header.encode(), self.secret.encode())

    async def run(self) -> None:
        await self._start()
        renewing = asyncio.create_task(self._renew())
        try:
            await self._rounds()
        finally:
            renewing.cancel()

    async def _renew(self) -> None:
        """The leases of the lines running here, renewed on their own clock: a long round (a big
        validation, a database that stalls) must not let them run out while the lines run."""
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            if self.running:
                try:
                    await asyncio.to_thread(self.batches.renew, self.id)
                except Exception as e:
                    log.warning("batch runner: lease renewal failed (%s); retrying", type(e).__name__)

    async def _rounds(self) -> None:
        while not self.paused:
            self.wake.clear()
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the database is down: the next round retries
                self.state.metrics.log_errors.inc()
                log.warning("batch runner: %s: %s; retrying", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                await asyncio.sleep(2.0)
            try:
                await asyncio.wait_for(self.wake.wait(), TICK_SECONDS)
            except TimeoutError:
                pass

    async def _start(self) -> None:
        """The schema in place, and lines this replica was running when it last stopped (killed:
        their claims are still there) given back at once instead of when their leases run out."""
        while True:
            try:
                await asyncio.to_thread(self.batches.ensure_schema)
                n = await asyncio.to_thread(self.batches.reclaim, self.state.runner, self.id)
                if n:
                    log.warning("%d batch line(s) in flight at this server's last stop go back to pending", n)
                return
            except Exception as e:
                log.warning("batch runner: database not ready (%s); retrying", type(e).__name__)
                await asyncio.sleep(2.0)

    async def _round(self) -> None:
        b = self.batches
        for id in await asyncio.to_thread(b.validating):
            try:
                await asyncio.to_thread(b.validate, id)
            except (sa.exc.OperationalError, sa.exc.InterfaceError):
                raise  # the database: the next round retries
            except Exception as e:  # this batch cannot be read or stored: it fails, the others go on
                log.exception("batch %s: validation failed", id)
                await asyncio.to_thread(b.fail_validation, id, f"The input file could not be validated: {e}")
        if self.running:  # lines of batches cancelled or past their window stop here
            statuses = await asyncio.to_thread(b.statuses, {line.batch_id for line in self.running.values()})
            for task, line in list(self.running.items()):
                if statuses.get(line.batch_id) != "in_progress":
                    task.cancel()
        free = self.state.settings.batch_concurrency - len(self.running)
        if free > 0 and self.state.status == "ready" and not self.paused:
            for line in await asyncio.to_thread(b.claim, self.id, free):
                task = asyncio.create_task(self._line(line))
                self.running[task] = line
                task.add_done_callback(self._ended)
            self.state.metrics.batch_running.set(len(self.running))
        for id, status in await asyncio.to_thread(b.settle):
            log.info("batch %s %s", id, status)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.running.pop(task, None)
        self.state.metrics.batch_running.set(len(self.running))
        self.wake.set()

    async def _line(self, line: Line) -> None:
        runner, b = self.id, self.batches
        try:
            outcome, retry = await self._send(line)
        except asyncio.CancelledError:  # paused (shutdown) or its batch stopped: it has not run
            await asyncio.shield(asyncio.to_thread(b.release, line, runner))
            raise
        except Exception as e:
            log.exception("batch %s line %d failed in the runner", line.batch_id, line.line)
            outcome, retry = _error(line, 500, None, "server_error", f"The server failed on this request: {e!r}"), None
        if retry is not None:
            await asyncio.to_thread(b.release, line, runner, retry)
            return
        if not await asyncio.to_thread(b.finish, line, runner, outcome):
            log.warning("batch %s line %d: not written (another replica took the line over, or its batch ended)",
                        line.batch_id, line.line)
            return
        self.state.metrics.batch_lines.labels(line.endpoint, "ok" if outcome.ok else "failed").inc()

    async def _send(self, line: Line) -> tuple[Outcome, float | None]:
        """Run one line through the app; a 429 or 503 (limits, a loading model) is tried again
        later (the float: seconds to wait), everything else is its result."""
        body = line.body
        if body.get("stream"):
            return _error(line, 400, None, "invalid_request_error", "'stream' is not supported in a batch: "
                          "its answer goes to the output file.", "stream"), None
        if line.endpoint == "/v1/responses" and body.get("background"):
            return _error(line, 400, None, "invalid_request_error", "'background' is not supported in a batch: "
                          "a batch is already run in the background.", "background"), None
        headers = {HEADER: self.secret, BATCH_HEADER: line.batch_id, OWNER_HEADER: quote(line.owner or "")}
        r = await self.client.post(line.endpoint, json=body, headers=headers)
        request_id = r.headers.get("x-request-id")
        try:
            answer = r.json()
        except ValueError:
            answer = {"error": {"message": r.text[:1000], "type": "server_error", "param": None, "code": None}}
        code = (answer.get("error") or {}).get("code") if isinstance(answer, dict) else None
        if r.status_code == 429 or (r.status_code == 503 and code != "model_failed"):  # limits, a loading model
            wait = float(r.headers.get("retry-after", "1") or 1)
            return _error(line, r.status_code, request_id, "", ""), min(max(wait, 0.5), 30.0)
        result = {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": line.custom_id,
                  "response": {"status_code": r.status_code, "request_id": request_id, "body": answer}, "error": None}
        if not 200 <= r.status_code < 300:
            return Outcome(False, result), None
        usage = answer.get("usage") or {}
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens", 0 if prompt is not None else None))
        return Outcome(True, result, prompt, completion, details.get("cached_tokens")), None

    async def pause(self) -> None:
        """Shutdown: claim nothing more; the lines in flight are aborted and given back."""
        self.paused = True
        tasks = list(self.running)
        batches = sorted({line.batch_id for line in self.running.values()})
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            log.info("batch work paused: %d line(s) in flight of %s went back to pending, for the next start "
                     "(or another replica)", len(tasks), ", ".join(batches))


def owner_of(header: str | None) -> str | None:
    return unquote(header) if header else None


def _error(line: Line, status: int, request_id: str | None, kind: str, message: str,
           param: str | None = None) -> Outcome:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return Outcome(False, {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": line.custom_id,
                           "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None})
