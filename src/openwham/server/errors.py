"""Every error is JSON with a ``detail``; client mistakes are 4xx, never 500."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from openwham.service.errors import ServiceError, Unauthorized
from openwham.wire import ErrorBody

log = logging.getLogger("openwham.server")

# What each error status means on this API; the OpenAPI document declares them (``responses``).
ERROR_MEANINGS = {
    400: "Bad input: the detail names the field and the problem",
    401: "Missing, invalid, expired or revoked bearer token",
    403: "ChatGPT-Account-Id names an account this user is not in",
    404: "No such object for this account (or not this account's)",
    409: "Not possible in the object's current state: the detail says why",
    413: "Request body (or prompt) over the server's limit",
    429: "Task rate limit reached: the body carries the limit's state",
    502: "A remote openwham talks to for the caller (a git remote) failed",
    503: "This server cannot do this now (busy: retry after Retry-After; or it cannot run"
    " tasks): the detail says why",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses`` for a route: each status with the ``{"detail": ...}`` body."""
    return {code: {"model": ErrorBody, "description": ERROR_MEANINGS[code]} for code in codes}


def _loc(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts)


def validation_detail(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = []
    messages = []
    for err in exc.errors():
        where = _loc(err.get("loc", ()))
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "json_invalid":
            msg, where = "Request body is not valid JSON", ""
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field"
        errors.append({"loc": [str(p) for p in err.get("loc", ())], "msg": msg})
        messages.append(f"{where}: {msg}" if where else msg)
    return "; ".join(messages[:5]) or "Invalid request", errors


def _printable(text: str) -> str:
    """``text`` without unpaired surrogates, which cannot be written out as UTF-8."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _transient(exc: OperationalError) -> bool:
    """A database that is busy or unreachable, as opposed to a broken statement (a missing
    table or column stays a 500: it is a bug)."""
    if type(exc.orig).__module__.startswith("sqlite3"):  # its OperationalError is both
        message = str(exc.orig).lower()
        return "locked" in message or "busy" in message
    return True  # psycopg's: connection lost, lock or statement timeout, serialization


def _busy(request: Request, exc: Exception) -> JSONResponse:
    # Only the error class: the message may echo the statement's parameters (user data).
    reason = type(getattr(exc, "orig", None) or exc).__name__
    log.warning("database busy on %s %s: %s", request.method, request.url.path, reason)
    return JSONResponse(
        {"detail": "The database is busy: retry after Retry-After"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "Internal server error"}, status_code=500)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse(
            {"detail": _printable(exc.detail), **exc.extra},
            status_code=exc.status_code,
            headers=headers,
        )

    @app.exception_handler(DataError)
    async def data_error(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the request carried (a case validation missed):
        # still the client's input, so 400, and logged so the gap gets closed.
        # Only the error class: the message would echo the statement's parameters (user data).
        reason = type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__
        log.warning(
            "database refused a value on %s %s: %s", request.method, request.url.path, reason
        )
        return JSONResponse(
            {"detail": "A value in the request cannot be stored (invalid characters or size)"},
            status_code=400,
        )

    @app.exception_handler(OperationalError)
    async def database_busy(request: Request, exc: OperationalError) -> JSONResponse:
        # SQLite's write lock not had within its busy timeout, or a PostgreSQL server gone:
        # the server's state, not the client's input, and passing (the request changed
        # nothing: its transaction rolled back), so 503 with Retry-After, not 500.
        if not _transient(exc):
            return _internal(request, exc)
        return _busy(request, exc)

    @app.exception_handler(PoolTimeout)
    async def pool_exhausted(request: Request, exc: PoolTimeout) -> JSONResponse:
        return _busy(request, exc)

    @app.exception_handler(RequestValidationError)
    async def request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail, errors = validation_detail(exc)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _internal(request, exc)
