"""`/v1/batches`: OpenAI's Batch API over this server's own endpoints.

    POST   /v1/batches                 input_file_id, endpoint, completion_window, metadata
    GET    /v1/batches                 after, limit (newest first)
    GET    /v1/batches/{id}
    POST   /v1/batches/{id}/cancel

Creating a batch answers at once (`validating`); the runner (`server.batches`) checks its lines,
runs them behind interactive traffic and writes the output and error files. Only a missing input
file, or one that is not a batch file, is a 400 here. Batches belong to their key, as files do.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server import pipeline
from server.api.files import files
from server.api.responses import stored, viewer
from server.batches import Batches
from server.errors import InvalidRequest, NotFound
from server.protocol.batches import Batch, BatchCreate, BatchList

router = APIRouter()
ROUTE = "/v1/batches"


def batches(request: Request) -> Batches:
    store: Batches | None = request.app.state.server.batches
    if store is None:
        raise InvalidRequest("Batches are not available before the server has started.")
    return store


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"No batch found with id '{batch_id[:128]}'.", param="batch_id")


@router.post(ROUTE, response_model=None)
async def create(request: Request) -> Response:
    body = await pipeline.parse(request, BatchCreate)
    who = viewer(request)
    source = await stored(request, lambda: files(request).get(body.input_file_id, who))
    if source is None:
        raise InvalidRequest(f"The input file {body.input_file_id[:128]!r} was not found.", param="input_file_id")
    if source.purpose != "batch":
        raise InvalidRequest(f"The input file {source.id} was uploaded with purpose {source.purpose!r}; a batch's "
                             "input file needs purpose 'batch'.", param="input_file_id")
    expires = body.output_expires_after.seconds if body.output_expires_after is not None else None
    obj = await stored(request, lambda: batches(request).create(who.owner, body.endpoint, source.id, body.metadata, expires))
    runner = request.app.state.server.batch_runner
    if runner is not None:
        runner.wake.set()  # validate it now, not at the next round
    return JSONResponse(Batch.model_validate(obj).model_dump())


@router.get(ROUTE, response_model=None)
async def list_batches(request: Request, after: str | None = None, limit: int = 20) -> Response:
    if not 1 <= limit <= 100:
        raise InvalidRequest("Invalid value for 'limit': between 1 and 100.", param="limit")
    try:
        data, more = await stored(request, lambda: batches(request).page(viewer(request), limit, after))
    except KeyError:
        raise _not_found(after or "") from None
    return JSONResponse(BatchList.of([Batch.model_validate(b) for b in data], more))


@router.get(ROUTE + "/{batch_id}", response_model=None)
async def retrieve(request: Request, batch_id: str) -> Response:
    obj = await stored(request, lambda: batches(request).get(batch_id, viewer(request)))
    if obj is None:
        raise _not_found(batch_id)
    return JSONResponse(Batch.model_validate(obj).model_dump())


@router.post(ROUTE + "/{batch_id}/cancel", response_model=None)
async def cancel(request: Request, batch_id: str) -> Response:
    obj = await stored(request, lambda: batches(request).cancel(batch_id, viewer(request)))
    if obj is None:
        raise _not_found(batch_id)
    runner = request.app.state.server.batch_runner
    if runner is not None:
        runner.wake.set()  # its lines in flight here stop now
    return JSONResponse(Batch.model_validate(obj).model_dump())
