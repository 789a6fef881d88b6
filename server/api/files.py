"""`/v1/files`: OpenAI's Files API, for the Batch API's input and output files.

    POST   /v1/files                 multipart: file, purpose (batch, user_data), expires_after
    GET    /v1/files                 purpose, limit, order, after
    GET    /v1/files/{id}            DELETE
    GET    /v1/files/{id}/content

A batch input file must be JSON Lines (each line an object): anything else is a 400 naming the
line at upload. Whether each line is a valid request is the batch's validation (`batches.py`).
Files belong to the key that uploaded them (`responses.viewer`); another key's is a 404.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.types import Message

from server.api.responses import stored, viewer
from server.batches import check_jsonl
from server.errors import ClientClosedRequest, InvalidRequest, NotFound, PayloadTooLarge
from server.files import UPLOAD_PURPOSES, Files
from server.protocol.batches import FileDeleted, FileList, FileObject
from server.store import utcnow

router = APIRouter()
ROUTE = "/v1/files"
# OpenAI's bounds on expires_after.seconds (one hour to 30 days), and batch files' default expiry
MIN_EXPIRY, MAX_EXPIRY = 3600, 2_592_000
BATCH_FILE_DAYS = 30
FIELDS = {"file", "purpose", "expires_after[anchor]", "expires_after[seconds]"}


def files(request: Request) -> Files:
    store: Files | None = request.app.state.server.files
    if store is None:
        raise InvalidRequest("Files are not available before the server has started.")
    return store


def _not_found(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id[:128]}", param="file_id")


async def _form(request: Request) -> Any:
    """The multipart form, its bytes counted as they arrive: 413 past --max-file-bytes (and a
    little for the form's own fields), before anything large is kept."""
    limit = request.app.state.server.settings.max_file_bytes
    cap, seen = limit + (64 << 10), 0
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge(f"The file is larger than this server's limit of {limit} bytes (--max-file-bytes).")

    async def receive() -> Message:
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > cap:
            raise PayloadTooLarge(f"The file is larger than this server's limit of {limit} bytes (--max-file-bytes).")
        return message

    try:
        return await Request(request.scope, receive).form(max_files=1, max_fields=8)
    except (PayloadTooLarge, ClientClosedRequest):
        raise
    except Exception as e:  # not multipart, or a broken one
        raise InvalidRequest(f"The body must be multipart/form-data with 'file' and 'purpose' ({e}).") from None


@router.post(ROUTE, response_model=None)
async def create(request: Request) -> Response:
    form = await _form(request)
    unknown = sorted(set(form) - FIELDS)
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                             code="unknown_parameter")
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("Missing required parameter: 'file' (a file part).", param="file")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"Invalid value for 'purpose': {purpose!r}; this server takes "
                             f"{' and '.join(UPLOAD_PURPOSES)} files.", param="purpose")
    limit = request.app.state.server.settings.max_file_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"The file is larger than this server's limit of {limit} bytes (--max-file-bytes).")
    if not data:
        raise InvalidRequest("The file is empty.", param="file")
    if purpose == "batch":
        try:
            check_jsonl(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequest(f"A batch input file must be JSON Lines, one request object per line: {e}.",
                                 param="file", code="invalid_file_format") from None
    seconds = _expiry(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"))
    if seconds is None and purpose == "batch":
        seconds = BATCH_FILE_DAYS * 86400  # OpenAI's default for batch files
    expires = utcnow() + timedelta(seconds=seconds) if seconds is not None else None
    owner = viewer(request).owner
    name = (upload.filename or "upload")[:512]
    row = await stored(request, lambda: files(request).create(owner, purpose, name, data, expires))
    return JSONResponse(FileObject.model_validate(row.object()).model_dump())


def _expiry(anchor: Any, seconds: Any) -> int | None:
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest("Invalid value for 'expires_after.anchor': must be 'created_at'.", param="expires_after.anchor")
    try:
        value = int(str(seconds))
    except ValueError:
        value = -1
    if not MIN_EXPIRY <= value <= MAX_EXPIRY:
        raise InvalidRequest(f"Invalid value for 'expires_after.seconds': between {MIN_EXPIRY} and {MAX_EXPIRY}.",
                             param="expires_after.seconds")
    return value


@router.get(ROUTE, response_model=None)
async def list_files(request: Request, purpose: str | None = None, limit: int = 10000, order: Literal["asc", "desc"] = "desc",
                     after: str | None = None) -> Response:
    if not 1 <= limit <= 10000:
        raise InvalidRequest("Invalid value for 'limit': between 1 and 10000.", param="limit")
    try:
        rows, more = await stored(request, lambda: files(request).page(viewer(request), purpose, limit, after, order))
    except KeyError:
        raise _not_found(after or "") from None
    return JSONResponse(FileList.of([FileObject.model_validate(r.object()) for r in rows], more))


@router.get(ROUTE + "/{file_id}", response_model=None)
async def retrieve(request: Request, file_id: str) -> Response:
    row = await stored(request, lambda: files(request).get(file_id, viewer(request)))
    if row is None:
        raise _not_found(file_id)
    return JSONResponse(FileObject.model_validate(row.object()).model_dump())


@router.get(ROUTE + "/{file_id}/content", response_model=None)
async def content(request: Request, file_id: str) -> Response:
    data = await stored(request, lambda: files(request).content(file_id, viewer(request)))
    if data is None:
        raise _not_found(file_id)
    return Response(data, media_type="application/octet-stream")


@router.delete(ROUTE + "/{file_id}", response_model=None)
async def delete(request: Request, file_id: str) -> Response:
    if not await stored(request, lambda: files(request).delete(file_id, viewer(request))):
        raise _not_found(file_id)
    return JSONResponse(FileDeleted(id=file_id, deleted=True).model_dump())
