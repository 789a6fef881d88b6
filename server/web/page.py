"""The chat page: `GET /chat`, `GET /` for a browser (ops.root asks `wanted`), and its assets.

The page is static code with no data in it, so it is served without a key: a browser's
navigation cannot send an `Authorization` header, and a key in a URL would end up in logs and
history. Everything the page shows comes from `/v1/*`, under the keys and limits every client
has; the key a person enters is kept in the browser's storage and sent as a header.

Built from web/ (marked, DOMPurify and highlight.js from npm, bundled by esbuild) into assets/,
which is checked in: serving needs no Node.js, and CI fails when the build is stale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

HERE = Path(__file__).parent
ASSETS = "/chat/assets"
# no inline script or style and nothing from another origin: model output that slipped past the
# sanitiser still cannot run; the page talks only to this server
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "cache-control": "no-cache"}

router = APIRouter(include_in_schema=False)


def wanted(request: Request) -> bool:
    """A browser's navigation (it asks for HTML by name); API clients and curl send `*/*` or JSON."""
    return request.app.state.server.settings.chat_page and "text/html" in request.headers.get("accept", "")


def page() -> Response:
    return FileResponse(HERE / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/chat")
async def chat() -> Response:
    return page()


class _Assets(StaticFiles):
    """The bundle, revalidated on each load (ETag: a rebuilt page is picked up at once)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(ASSETS, _Assets(directory=HERE / "assets"), name="chat-assets")
