"""Domain errors; each carries the HTTP status the server answers with."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status_code = 400

    def __init__(self, detail: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}


class BadRequest(ServiceError):
    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401


class Forbidden(ServiceError):
    status_code = 403


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class PayloadTooLarge(ServiceError):
    status_code = 413


class RateLimited(ServiceError):
    status_code = 429


class Unavailable(ServiceError):
    """The server cannot do this now (e.g. it cannot run tasks); the detail says why."""

    status_code = 503


class BadGateway(ServiceError):
    """A remote openwham talks to for the caller (a git remote) failed."""

    status_code = 502
