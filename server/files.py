"""Files (`/v1/files`): what clients upload for batches, and the output and error files batches
make. Each file's row is in the database; its bytes are in the database too (PostgreSQL without
--files-dir) or in a folder, under its id (`Settings.files_folder`), where every replica that
shares the database must be able to read them.

Every method is one short synchronous transaction (the API calls them off the event loop),
retried on transient errors. Files the viewer may not see behave exactly as missing ones.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from server.store import Viewer, _retried, files_table, keyset_page, utcnow

# what a client may upload, and what batches make
UPLOAD_PURPOSES = ("batch", "user_data")
PURPOSES = (*UPLOAD_PURPOSES, "batch_output")


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


@dataclass(frozen=True)
class FileRow:
    id: str
    owner: str | None
    purpose: str
    filename: str
    bytes: int
    created: datetime
    expires: datetime | None

    def object(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": _epoch(self.created),
                "expires_at": _epoch(self.expires) if self.expires else None, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None}


def _epoch(t: datetime) -> int:
    return int(t.replace(tzinfo=timezone.utc).timestamp())


class Files:
    def __init__(self, db: sa.Engine, folder: Path | None) -> None:
        self.db = db
        self.folder = folder  # None: bytes in the database

    def _path(self, id: str) -> Path:
        assert self.folder is not None
        return self.folder / id

    def write(self, id: str, data: bytes) -> None:
        """A file's bytes in the folder (before its row exists: a row never names missing bytes)."""
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            part = self._path(id).with_suffix(".part")
            part.write_bytes(data)
            os.replace(part, self._path(id))

    def discard(self, id: str) -> None:
        if self.folder is not None:
            self._path(id).unlink(missing_ok=True)

    def insert(self, conn: sa.Connection, row: FileRow, data: bytes) -> None:
        """The row (and, in the database, the bytes), in the caller's transaction; `write` first."""
        conn.execute(files_table.insert().values(
            id=row.id, owner=row.owner, purpose=row.purpose, filename=row.filename, bytes=row.bytes,
            created=row.created, expires=row.expires, content=data if self.folder is None else None))

    @_retried
    def create(self, owner: str | None, purpose: str, filename: str, data: bytes, expires: datetime | None) -> FileRow:
        row = FileRow(new_file_id(), owner, purpose, filename, len(data), utcnow(), expires)
        self.write(row.id, data)
        try:
            with self.db.begin() as conn:
                self.insert(conn, row, data)
        except BaseException:
            self.discard(row.id)
            raise
        return row

    def _visible(self, viewer: Viewer) -> sa.ColumnElement[bool]:
        t = files_table
        return sa.and_(viewer.sees(t.c.owner), sa.or_(t.c.expires.is_(None), t.c.expires > utcnow()))

    @_retried
    def get(self, id: str, viewer: Viewer) -> FileRow | None:
        t = files_table
        with self.db.connect() as conn:
            row = conn.execute(sa.select(*_columns()).where(t.c.id == id, self._visible(viewer))).first()
        return None if row is None else FileRow(*row)

    @_retried
    def content(self, id: str, viewer: Viewer) -> bytes | None:
        t = files_table
        with self.db.connect() as conn:
            row = conn.execute(sa.select(t.c.content).where(t.c.id == id, self._visible(viewer))).first()
        if row is None:
            return None
        return bytes(row.content) if self.folder is None else self._path(id).read_bytes()

    @_retried
    def delete(self, id: str, viewer: Viewer) -> bool:
        t = files_table
        with self.db.begin() as conn:
            gone = conn.execute(t.delete().where(t.c.id == id, self._visible(viewer))).rowcount > 0
        if gone:
            self.discard(id)
        return gone

    @_retried
    def page(self, viewer: Viewer, purpose: str | None, limit: int, after: str | None,
             order: Literal["asc", "desc"]) -> tuple[list[FileRow], bool]:
        """A page ordered by (created, id), and whether more follow; KeyError for an unseen `after`."""
        t = files_table
        visible = self._visible(viewer)
        query = sa.select(*_columns()).where(visible)
        if purpose is not None:
            query = query.where(t.c.purpose == purpose)
        with self.db.connect() as conn:
            rows, more = keyset_page(conn, t, visible, query, limit, after, order)
        return [FileRow(*tuple(r)) for r in rows], more

    @_retried
    def sweep(self) -> int:
        """Delete files past their expiry (their bytes too); how many."""
        t = files_table
        with self.db.begin() as conn:
            ids = [r.id for r in conn.execute(sa.select(t.c.id).where(t.c.expires <= utcnow())).all()]
            if ids:
                conn.execute(t.delete().where(t.c.id.in_(ids)))
        for id in ids:
            self.discard(id)
        return len(ids)


def _columns() -> tuple[sa.Column[Any], ...]:
    t = files_table
    return (t.c.id, t.c.owner, t.c.purpose, t.c.filename, t.c.bytes, t.c.created, t.c.expires)
