"""`GET /v1/models` and `GET /v1/models/{model}`: every name a request may use now."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.errors import ModelNotFound
from server.protocol.models import ModelCard, ModelList
from server.registry import Entry

router = APIRouter()


def _card(entry: Entry) -> ModelCard:
    served = entry.served
    return ModelCard(
        id=entry.name,
        created=served.created if served else int(entry.since),
        owned_by="llm-service",
        engine=entry.engine,
        kind=entry.kind,
        max_model_len=served.engine.info.max_model_len if served else None,
        root=served.path if served else None,
        state=entry.state,
    )


def _cards(request: Request) -> list[ModelCard]:
    """Models that are ready, loading, or lazy (their first request loads them), and the aliases
    with a usable variant. Failed and unloading models are left out: a request for them would fail."""
    state = request.app.state.server
    registry = state.registry
    cards = [_card(e) for e in registry.entries.values() if e.usable]
    for alias in registry.aliases.values():
        if registry.usable_variants(alias):
            cards.append(ModelCard(id=alias.name, created=state.started, owned_by="llm-service",
                                   kind=registry.kind_of(alias.name), variants=alias.describe()))
    return cards


@router.get("/v1/models", response_model=None)
async def list_models(request: Request) -> Response:
    return Response(ModelList(data=_cards(request)).model_dump_json(), media_type="application/json")


@router.get("/v1/models/{model_id:path}", response_model=None)
async def get_model(model_id: str, request: Request) -> Response:
    for card in _cards(request):
        if card.id == model_id:
            return Response(card.model_dump_json(), media_type="application/json")
    raise ModelNotFound(model_id)
