"""The exception tree and its single mapping to OpenAI's error JSON.

Errors are raised where they happen, typed by what went wrong; `install_handlers` converts every
one of them (and FastAPI's own validation and HTTP errors) to
`{"error": {"message", "type", "param", "code"}}` in one place. `code` is a string or null, as
OpenAI sends it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)


class APIError(Exception):
    """Base of every error the API reports to a client."""

    status_code = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(APIError):
    """The client sent something we cannot serve: a bad value, a missing or unsupported field."""

    status_code = 400
    type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    default_code = "unsupported_parameter"

    def __init__(self, param: str, why: str = "") -> None:
        detail = f" {why}" if why else ""
        super().__init__(f"Unsupported parameter: '{param}' is not supported by this server.{detail}", param=param)


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class ModelNotFound(APIError):
    status_code = 404
    type = "invalid_request_error"
    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.", param="model"
        )


class NotFound(APIError):
    status_code = 404
    type = "invalid_request_error"


class MethodNotAllowed(APIError):
    status_code = 405
    type = "invalid_request_error"


class AuthenticationError(APIError):
    """No key, or not a configured one (OpenAI's 401)."""

    status_code = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(APIError):
    status_code = 403
    type = "invalid_request_error"
    default_code = "insufficient_permissions"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(APIError):
    """A key's requests, tokens or concurrency are over its limit (OpenAI's 429)."""

    status_code = 429
    type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, headers: dict[str, str], reason: str) -> None:
        super().__init__(message, headers=headers)
        self.reason = reason  # requests | tokens | concurrency (a metrics label)


class Overloaded(APIError):
    """The server's queue is full: retry later (429, so clients back off as for rate limits)."""

    status_code = 429
    type = "server_overloaded"
    default_code = "server_overloaded"


class ClientClosedRequest(APIError):
    """The client left before its answer was ready; nobody reads this (499, as proxies log it)."""

    status_code = 499
    type = "invalid_request_error"


class ServiceUnavailable(APIError):
    """The engine is still loading, shutting down, or has died."""

    status_code = 503
    type = "server_error"
    default_code = "service_unavailable"


class Conflict(APIError):
    """The request clashes with the server's state: a model by that name exists already."""

    status_code = 409
    type = "invalid_request_error"
    default_code = "conflict"


class InsufficientMemory(APIError):
    """A model does not fit in the memory budget beside the models already loaded (507, as
    WebDAV's Insufficient Storage: the request is fine, the server has no room for it)."""

    status_code = 507
    type = "server_error"
    default_code = "insufficient_memory"


class EngineError(APIError):
    """The engine failed while serving a request that was valid."""

    status_code = 500
    type = "server_error"


def invalid_request_from(errors: Sequence[Any]) -> InvalidRequest:
    """A 400 for the first validation problem (pydantic's error list), phrased for a person."""
    message, param = _validation_message(errors)
    code = "unsupported_parameter" if message.startswith("Unsupported parameter") else None
    return InvalidRequest(message, param=param, code=code)


def _validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    if not errors:
        return "Invalid request.", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # pydantic puts the union member's type name into the location; drop those for readability
    loc = [p for p in loc if not p[:1].isupper() and p not in {"str", "list[str]", "int"}]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return (
            "We could not parse the JSON body of your request. The body must be valid JSON "
            f"({err.get('ctx', {}).get('error', 'syntax error')}).",
            None,
        )
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param
    if kind == "extra_forbidden":
        return (
            f"Unsupported parameter: '{param}' is not supported by this server.",
            param,
        )
    msg = err.get("msg", "Invalid value")
    return f"Invalid value for '{param}': {msg}.", param


def _log(request: Request, exc: APIError) -> None:
    """ERROR is for what an operator must look at: a 500, the engine or the server failed. A 503
    (loading, unloading, shutting down) or 507 (no room for a model) is the server's state, not a
    fault, and a client that left is the client's doing: one INFO line each. Other 4xx are the
    client's business: no line."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 500:
        log.error("%s %s: %s", where, type(exc).__name__, exc.message)
    elif exc.status_code > 500 or isinstance(exc, ClientClosedRequest):
        log.info("%s: %d %s", where, exc.status_code, exc.message)


def install_handlers(app: FastAPI) -> None:
    """Route every error the app can produce through OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _log(request, exc)
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _left(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # the client left while its body was being read (a route that reads it itself)
        err = ClientClosedRequest("The client closed the connection while sending the request.")
        _log(request, err)
        return JSONResponse(err.to_dict(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = invalid_request_from(exc.errors())
        return JSONResponse(err.to_dict(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err: APIError
        if exc.status_code == 404:
            err = NotFound("Not found. See GET / for the routes this server offers.")
        elif exc.status_code == 405:
            err = MethodNotAllowed(f"Method not allowed: {exc.detail}")
        else:
            err = APIError(str(exc.detail))
            err.status_code = exc.status_code
            err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(err.to_dict(), status_code=err.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = EngineError(f"Internal server error: {type(exc).__name__}: {exc}")
        return JSONResponse(err.to_dict(), status_code=500)
