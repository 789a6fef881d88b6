"""`/v1/conversations`: OpenAI's Conversations API, stored in the database.

    POST   /v1/conversations                      create (with up to 20 items, metadata)
    GET    /v1/conversations                      ours: the caller's conversations, newest first
    GET    /v1/conversations/{id}                 POST: replace its metadata    DELETE
    GET    /v1/conversations/{id}/items           POST: add up to 20 items
    GET    /v1/conversations/{id}/items/{item}    DELETE

A response created with `conversation` reads the conversation's items as its context and appends
its input and output items when it completes (`api/responses.py`). Ownership is the responses'
(`responses.viewer`): another key's conversation is a 404.
"""

from __future__ import annotations

import json
from datetime import timezone
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server import pipeline
from server.api.responses import check_storage, send, stored, viewer
from server.errors import InvalidRequest, NotFound
from server.gate import access
from server.protocol.responses import (
    AddItems,
    ConversationDeleted,
    ConversationObject,
    CreateConversation,
    ItemList,
    UpdateConversation,
    new_id,
)
from server.store import Conversation, utcnow


async def _storage_on(request: Request) -> None:
    check_storage(request, "A conversation")


# every route here needs the store: one check, before any of them runs
router = APIRouter(dependencies=[Depends(_storage_on)])
ROUTE = "/v1/conversations"


def _object(c: Conversation) -> dict[str, Any]:
    return ConversationObject(id=c.id, created_at=int(c.created.replace(tzinfo=timezone.utc).timestamp()), metadata=c.metadata).model_dump()


def _not_found(conversation_id: str) -> NotFound:
    return NotFound(f"Conversation with id '{conversation_id[:128]}' not found.", param="conversation_id")


def _limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise InvalidRequest("Invalid value for 'limit': between 1 and 100.", param="limit")
    return limit


def _page(data: list[dict[str, Any]], has_more: bool) -> Response:
    return send(ItemList(data=data, first_id=data[0]["id"] if data else None,
                          last_id=data[-1]["id"] if data else None, has_more=has_more).model_dump())


@router.post(ROUTE, response_model=None)
async def create(request: Request) -> Response:
    body = await pipeline.parse(request, CreateConversation)
    record = access(request)
    record.safety_identifier = body.safety_identifier
    if body.metadata:
        record.metadata = json.dumps(body.metadata, ensure_ascii=False)
    key = record.key
    conversation = Conversation(id=new_id("conv"), owner=key.name if key is not None else None, created=utcnow(),
                                metadata=body.metadata or {})
    items = [item.item() for item in body.items or []]
    db = request.app.state.server.stored
    await stored(request, lambda: db.create_conversation(conversation, [(i["id"], i) for i in items]))
    return send(_object(conversation))


@router.get(ROUTE, response_model=None)
async def list_conversations(request: Request, limit: int = 20, after: str | None = None,
                             order: Literal["asc", "desc"] = "desc") -> Response:
    """Not in OpenAI's API (it cannot list conversations): ours, for chat pages. Only the
    caller's key's own (an admin key's: all), newest first."""
    db = request.app.state.server.stored
    try:
        found, more = await stored(request, lambda: db.list_conversations(viewer(request), _limit(limit), after, order))
    except KeyError:
        raise InvalidRequest(f"Invalid value for 'after': no conversation {after!r}.", param="after") from None
    return _page([_object(c) for c in found], more)


@router.get(ROUTE + "/{conversation_id}", response_model=None)
async def retrieve(request: Request, conversation_id: str) -> Response:
    db = request.app.state.server.stored
    found = await stored(request, lambda: db.get_conversation(conversation_id, viewer(request)))
    if found is None:
        raise _not_found(conversation_id)
    return send(_object(found))


@router.post(ROUTE + "/{conversation_id}", response_model=None)
async def update(request: Request, conversation_id: str) -> Response:
    body = await pipeline.parse(request, UpdateConversation)
    db = request.app.state.server.stored
    found = await stored(request, lambda: db.update_conversation(conversation_id, viewer(request), body.metadata))
    if found is None:
        raise _not_found(conversation_id)
    return send(_object(found))


@router.delete(ROUTE + "/{conversation_id}", response_model=None)
async def delete(request: Request, conversation_id: str) -> Response:
    db = request.app.state.server.stored
    if not await stored(request, lambda: db.delete_conversation(conversation_id, viewer(request))):
        raise _not_found(conversation_id)
    return send(ConversationDeleted(id=conversation_id, deleted=True).model_dump())


@router.get(ROUTE + "/{conversation_id}/items", response_model=None)
async def list_items(request: Request, conversation_id: str, limit: int = 20, after: str | None = None,
                     order: Literal["asc", "desc"] = "desc") -> Response:
    db = request.app.state.server.stored
    try:
        found = await stored(request, lambda: db.list_items(conversation_id, viewer(request), _limit(limit), after, order))
    except KeyError:
        raise InvalidRequest(f"Invalid value for 'after': no item {after!r} in this conversation.", param="after") from None
    if found is None:
        raise _not_found(conversation_id)
    return _page(*found)


@router.post(ROUTE + "/{conversation_id}/items", response_model=None)
async def add_items(request: Request, conversation_id: str) -> Response:
    body = await pipeline.parse(request, AddItems)
    items = [item.item() for item in body.items]
    db = request.app.state.server.stored
    if not await stored(request, lambda: db.add_items(conversation_id, viewer(request), [(i["id"], i) for i in items])):
        raise _not_found(conversation_id)
    return _page(items, False)


@router.get(ROUTE + "/{conversation_id}/items/{item_id}", response_model=None)
async def get_item(request: Request, conversation_id: str, item_id: str) -> Response:
    db = request.app.state.server.stored
    found = await stored(request, lambda: db.get_item(conversation_id, item_id, viewer(request)))
    if found is None:
        raise NotFound(f"Item with id '{item_id[:128]}' not found in conversation '{conversation_id[:128]}'.",
                       param="item_id")
    return send(found)


@router.delete(ROUTE + "/{conversation_id}/items/{item_id}", response_model=None)
async def delete_item(request: Request, conversation_id: str, item_id: str) -> Response:
    db = request.app.state.server.stored
    if not await stored(request, lambda: db.delete_item(conversation_id, item_id, viewer(request))):
        raise NotFound(f"Item with id '{item_id[:128]}' not found in conversation '{conversation_id[:128]}'.",
                       param="item_id")
    found = await stored(request, lambda: db.get_conversation(conversation_id, viewer(request)))
    if found is None:
        raise _not_found(conversation_id)
    return send(_object(found))
