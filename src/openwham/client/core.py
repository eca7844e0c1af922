"""The one core both clients share: requests as data, their parsing, and the retry rule.

Every API operation is a :class:`Call` (method, path, body, parser, idempotent?) built by a
function in :mod:`openwham.client.endpoints`; operations that need several requests are
generators yielding ``Call``/``Sleep`` steps (:data:`Op`). ``WhamClient`` and
``AsyncWhamClient`` only *execute* those, each with its own I/O, so the sync and async twins
cannot drift apart (httpx's own layering).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
from pydantic import ValidationError

from openwham.client.errors import APIError, UnexpectedAnswer, error_for

T = TypeVar("T")

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
STREAM_TIMEOUT = httpx.Timeout(60.0, connect=10.0)  # the server sends a keep-alive every 15 s
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
USER_AGENT = "openwham-sdk"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request relative to the API root, and how to read its answer."""

    method: str
    path: str
    parse: Callable[[Any], T]
    params: dict[str, Any] | None = None
    json: Any = None
    idempotent: bool = False
    expect_body: bool = True
    text: bool = False  # the answer is text (a diff), given to ``parse`` as a string

    def request(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        params = {k: v for k, v in (self.params or {}).items() if v is not None}
        return client.build_request(
            self.method,
            self.path.lstrip("/"),
            params=params or None,
            json=self.json if self.json is not None else None,
        )

    def result(self, response: httpx.Response) -> T:
        if response.status_code >= 400:
            raise api_error(response)
        if self.text:
            return self.parse(response.text)
        if not self.expect_body or response.status_code == 204 or not response.content:
            return self.parse(None)
        where = f"{self.method} {response.url}"
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            kind = response.headers.get("content-type", "?")
            raise UnexpectedAnswer(f"{where} answered {kind}, not JSON") from e
        try:
            return self.parse(data)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "body"
            raise UnexpectedAnswer(
                f"{where} answered an unexpected shape ({field}: {first['msg']})"
            ) from e


@dataclass(frozen=True)
class Sleep:
    """A pause inside an operation (polling); each client sleeps its own way."""

    seconds: float


Op = Generator["Call[Any] | Sleep", Any, T]
"""A multi-request operation: send it each step's result, it returns the final value."""


def api_error(response: httpx.Response) -> APIError:
    """The typed error for an error answer, with the server's ``detail`` when it sent one."""
    try:
        body: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = response.text.strip()[:500] or None
    detail = body.get("detail", body) if isinstance(body, dict) else body
    request = response.request
    return error_for(response.status_code, detail, method=request.method, url=str(request.url))


@dataclass
class RetryPolicy:
    """Retries idempotent calls after 429, 5xx and network errors, with capped backoff."""

    retries: int = 3
    backoff: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds before retry ``attempt`` (1-based): ``Retry-After`` when given, else
        exponential with jitter."""
        if response is not None:
            after = response.headers.get("retry-after", "")
            if after.replace(".", "", 1).isdigit():
                return min(float(after), self.max_delay)
        base: float = self.backoff * (2 ** (attempt - 1))
        return float(min(base * (0.75 + random.random() / 2), self.max_delay))

    def should_retry(self, call: Call[Any], attempt: int, response: httpx.Response | None) -> bool:
        if not call.idempotent or attempt > self.retries:
            return False
        return response is None or response.status_code in RETRY_STATUSES


def default_headers(account_id: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if account_id:
        headers["ChatGPT-Account-Id"] = account_id
    return headers
