"""Typed errors of the SDK: every failure a caller can act on has its own class.

``WhamError`` is the root; HTTP answers become ``APIError`` subclasses carrying the status and
the server's ``detail``; the CLI prints ``str(error)`` (one line) and, when set, ``hint``.
"""

from __future__ import annotations

from typing import Any


class WhamError(Exception):
    """Base of every SDK error. ``hint`` says how to fix it, when there is a fix."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class InvalidURL(WhamError, ValueError):
    """A base URL that is not http(s)://host[…]."""


class TransportError(WhamError):
    """The server could not be reached, or the connection broke (after retries)."""


class UnexpectedAnswer(WhamError):
    """The server answered 2xx with a body that is not the documented shape."""


class AuthError(WhamError):
    """Credentials are missing, expired for good, or were refused."""


class NotLoggedIn(AuthError):
    """No credentials for the chosen profile."""


class SessionExpired(AuthError):
    """The sign-in can no longer be renewed (the refresh token expired, was reused or was
    revoked; a personal access token was refused): only a new login helps."""


class APIError(WhamError):
    """The server answered with an error status."""

    def __init__(self, status: int, detail: Any, *, method: str = "", url: str = "") -> None:
        self.status = status
        self.detail = detail
        self.method = method
        self.url = url
        text = detail if isinstance(detail, str) else _detail_text(detail)
        super().__init__(f"{status}: {text}" if text else f"HTTP {status}")


class BadRequest(APIError):
    """400/422: the request was refused as invalid; nothing changed."""


class Unauthorized(APIError, AuthError):
    """401: the token was refused (and a refresh, where possible, did not help)."""


class Forbidden(APIError):
    """403."""


class NotFound(APIError):
    """404: no such task, turn or environment (or not visible to this account)."""


class Conflict(APIError):
    """409: the resource is in a state that does not allow this (e.g. still running)."""


class RateLimited(APIError):
    """429: the usage window is exhausted; ``detail`` carries the server's payload."""


class ServerError(APIError):
    """5xx."""


def _detail_text(detail: Any) -> str:
    if isinstance(detail, dict):
        for key in ("detail", "message", "error"):
            value = detail.get(key)
            if isinstance(value, str):
                return value
            if isinstance(value, dict):
                return _detail_text(value)
    if detail is None:
        return ""
    return str(detail)


def error_for(status: int, detail: Any, *, method: str = "", url: str = "") -> APIError:
    """The ``APIError`` subclass for an HTTP status."""
    cls: type[APIError]
    if status in (400, 422):
        cls = BadRequest
    elif status == 401:
        cls = Unauthorized
    elif status == 403:
        cls = Forbidden
    elif status == 404:
        cls = NotFound
    elif status == 409:
        cls = Conflict
    elif status == 429:
        cls = RateLimited
    elif status >= 500:
        cls = ServerError
    else:
        cls = APIError
    return cls(status, detail, method=method, url=url)
