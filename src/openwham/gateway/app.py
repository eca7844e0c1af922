"""The gateway: per-attempt tokens, forwarding with the real credential, metering, limits.

``Gateway`` is thread-safe: the engine registers and revokes attempts and reads their usage
from any thread while ``Gateway.app()`` serves requests on the gateway's event loop.

Routes (everything else is 404): ``POST /v1/responses`` (streamed through chunk by chunk) and
``GET /v1/models`` (passed through). Every request needs ``Authorization: Bearer <attempt
token>``. Errors have the OpenAI shape ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from openwham.config import Settings
from openwham.gateway.sse import JSONBody, SSEParser, usage_numbers
from openwham.gateway.upstream import (
    PERMANENT_FAILURE_STATUS,
    Upstream,
    UpstreamError,
    make_upstream,
)

log = logging.getLogger("openwham.gateway")

# Hop-by-hop headers (RFC 9110 §7.6.1) and everything the client must not choose upstream.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "cookie",
    "accept-encoding",
    "chatgpt-account-id",
    "openai-organization",
    "openai-project",
    "api-key",
    "x-api-key",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
}
_DROP_RESPONSE = HOP_BY_HOP | {
    "content-length",
    "content-encoding",
    "set-cookie",
    "www-authenticate",
    "server",
    "date",
}

DEFAULT_TOKEN_TTL_SECONDS = 6 * 3600.0
RETAIN_SECONDS = 3600.0
HOLD_POLL_SECONDS = 0.005  # a held request checks this often whether it may go on


@dataclass(frozen=True)
class Usage:
    """What one attempt consumed: model requests and tokens from ``response.completed``."""

    requests: int = 0
    responses: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_output_tokens: int = 0
    total_tokens: int = 0

    def plus(self, numbers: Mapping[str, int]) -> Usage:
        return replace(
            self,
            responses=self.responses + 1,
            input_tokens=self.input_tokens + numbers["input_tokens"],
            cached_input_tokens=self.cached_input_tokens + numbers["cached_input_tokens"],
            output_tokens=self.output_tokens + numbers["output_tokens"],
            reasoning_output_tokens=self.reasoning_output_tokens
            + numbers["reasoning_output_tokens"],
            total_tokens=self.total_tokens + numbers["total_tokens"],
        )


@dataclass
class _Attempt:
    attempt_id: str
    digest: bytes
    model: str | None
    max_requests: int | None
    max_total_tokens: int | None
    expires_at: float
    usage: Usage = field(default_factory=Usage)
    last_error: str | None = None
    revoked_at: float | None = None
    held: bool = False
    on_final: Callable[[], None] | None = None
    on_first: Callable[[], None] | None = None  # fired when a model request is let through
    final_seen: bool = False  # a response that ends the agent's turn went through
    continued: bool = False  # ... and yet another request came after it

    def active(self, now: float) -> bool:
        return self.revoked_at is None and now < self.expires_at


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def error_body(message: str, type: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code}}


def _error(status: int, message: str, type: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, type, code), status_code=status)


class Gateway:
    """The registry of attempt tokens and the ASGI app that serves them."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        token_ttl_seconds: float = DEFAULT_TOKEN_TTL_SECONDS,
        transport: httpx.AsyncBaseTransport | None = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        max_body_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.upstream = upstream
        self.token_ttl_seconds = token_ttl_seconds
        self.max_body_bytes = max_body_bytes
        self._transport = transport
        self._timeout = httpx.Timeout(idle_timeout, connect=connect_timeout, pool=connect_timeout)
        self._lock = threading.Lock()
        self._by_attempt: dict[str, _Attempt] = {}
        self._by_digest: dict[bytes, _Attempt] = {}
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Gateway:
        """A gateway for the configured upstream (``GatewayConfigError`` if misconfigured)."""
        return cls(make_upstream(settings), **kwargs)

    # ------------------------------------------------------------------ registry

    def register_attempt(
        self,
        attempt_id: str,
        *,
        model: str | None = None,
        max_requests: int | None = None,
        max_total_tokens: int | None = None,
        ttl_seconds: float | None = None,
    ) -> str:
        """A new bearer token for ``attempt_id`` (replacing any earlier one, usage reset).

        ``model`` pins the upstream model: every request of the attempt is sent with it,
        whatever the agent asks for. ``max_requests`` / ``max_total_tokens`` make further
        requests fail with 429 once reached. The token is valid until revoked or expired.
        """
        token = secrets.token_urlsafe(32)
        now = time.time()
        ttl = self.token_ttl_seconds if ttl_seconds is None else ttl_seconds
        record = _Attempt(
            attempt_id=attempt_id,
            digest=_digest(token),
            model=model,
            max_requests=max_requests,
            max_total_tokens=max_total_tokens,
            expires_at=now + ttl,
        )
        with self._lock:
            self._prune(now)
            old = self._by_attempt.pop(attempt_id, None)
            if old is not None:
                self._by_digest.pop(old.digest, None)
            self._by_attempt[attempt_id] = record
            self._by_digest[record.digest] = record
        return token

    def reassign(
        self, old_id: str, new_id: str, *, ttl_seconds: float | None = None, hold: bool = False
    ) -> bool:
        """Hand a standby's token to the attempt that takes the standby: the same token now
        counts for ``new_id`` (usage starts at zero, validity from now). ``False`` if the old
        token is unknown, revoked or expired. With ``hold`` its requests wait (they are not
        sent upstream) until :meth:`release`, or fail with 401 once it is revoked: the engine
        starts a standby's agent before it has checked that the standby fits."""
        now = time.time()
        ttl = self.token_ttl_seconds if ttl_seconds is None else ttl_seconds
        with self._lock:
            record = self._by_attempt.get(old_id)
            if record is None or not record.active(now):
                return False
            del self._by_attempt[old_id]
            replaced = self._by_attempt.pop(new_id, None)
            if replaced is not None:
                self._by_digest.pop(replaced.digest, None)
            record.attempt_id = new_id
            record.usage = Usage()
            record.last_error = None
            record.expires_at = now + ttl
            record.held = hold
            record.on_final, record.final_seen, record.continued = None, False, False
            record.on_first = None
            self._by_attempt[new_id] = record
        return True

    def on_final_response(self, attempt_id: str, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (on the gateway's loop: keep it quick) when a response that ends
        the agent's turn passes through: a completed response whose output is only messages
        and reasoning, no tool call. It fires before the agent has the response's last
        bytes; the engine starts the attempt's diff then. An agent that sends yet another
        request afterwards shows in :meth:`continued_after_final`."""
        with self._lock:
            record = self._by_attempt.get(attempt_id)
            if record is not None:
                record.on_final = callback

    def on_first_request(self, attempt_id: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` once (on the gateway's loop: keep it quick) when one of the
        attempt's model requests is let through to the upstream (after any hold), or now if
        one already was: the agent's start-up is behind it then (the engine gives the next
        standby's fill the normal CPU weight from then on)."""
        with self._lock:
            record = self._by_attempt.get(attempt_id)
            if record is None:
                return
            if not record.usage.requests:
                record.on_first = callback
                return
        callback()

    def continued_after_final(self, attempt_id: str) -> bool:
        """Whether the attempt sent a model request after a turn-ending response."""
        with self._lock:
            record = self._by_attempt.get(attempt_id)
            return record is not None and record.continued

    def _final_response(self, record: _Attempt) -> None:
        with self._lock:
            record.final_seen = True
            callback = record.on_final
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("model gateway, attempt %s: final-response hook", record.attempt_id)

    def release(self, attempt_id: str) -> None:
        """Let a held attempt's requests (waiting ones too) through to the upstream."""
        with self._lock:
            record = self._by_attempt.get(attempt_id)
            if record is not None:
                record.held = False

    def revoke(self, attempt_id: str) -> None:
        """End the attempt's token (in-flight streams stop); usage stays readable."""
        with self._lock:
            record = self._by_attempt.get(attempt_id)
            if record is not None and record.revoked_at is None:
                record.revoked_at = time.time()

    def forget(self, attempt_id: str) -> None:
        """Drop everything about the attempt (revoked records also go an hour after revoke)."""
        with self._lock:
            record = self._by_attempt.pop(attempt_id, None)
            if record is not None:
                self._by_digest.pop(record.digest, None)

    def usage(self, attempt_id: str) -> Usage:
        """Requests and tokens so far (``KeyError`` for an unknown attempt)."""
        with self._lock:
            return self._by_attempt[attempt_id].usage

    def last_error(self, attempt_id: str) -> str | None:
        """The last upstream failure seen for the attempt: a message naming what to fix."""
        with self._lock:
            record = self._by_attempt.get(attempt_id)
            return None if record is None else record.last_error

    def _prune(self, now: float) -> None:
        for record in list(self._by_attempt.values()):
            ended = record.revoked_at if record.revoked_at is not None else record.expires_at
            if now - ended > RETAIN_SECONDS:
                del self._by_attempt[record.attempt_id]
                self._by_digest.pop(record.digest, None)

    async def _admitted(self, request: Request) -> _Attempt | None:
        """The request's attempt once it is not held (``None``: refuse with 401)."""
        record = self._authenticate(request)
        while record is not None and record.held:
            await anyio.sleep(HOLD_POLL_SECONDS)
            with self._lock:
                current = self._by_digest.get(record.digest)
            record = current if current is record and record.active(time.time()) else None
        return record

    def _authenticate(self, request: Request) -> _Attempt | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = _digest(token.strip())
        with self._lock:
            record = self._by_digest.get(digest)
        if record is None or not hmac.compare_digest(record.digest, digest):
            return None
        return record if record.active(time.time()) else None

    def _record_error(self, record: _Attempt, message: str) -> str:
        """Remember (and log, once per new message) an attempt's failure; returns it redacted."""
        message = self.upstream.redact(message)
        with self._lock:
            repeated = record.last_error == message
            record.last_error = message
        if not repeated:
            log.warning("model gateway, attempt %s: %s", record.attempt_id, message)
        return message

    def _fail(self, record: _Attempt, status: int, message: str, type: str, code: str) -> Response:
        return _error(status, self._record_error(record, message), type, code)

    def _add_usage(self, record: _Attempt, numbers: Mapping[str, int]) -> None:
        with self._lock:
            record.usage = record.usage.plus(numbers)

    def _admit(self, record: _Attempt) -> str | None:
        """Count one model request, or say which limit refuses it."""
        with self._lock:
            usage = record.usage
            if record.max_requests is not None and usage.requests >= record.max_requests:
                return f"this attempt reached its limit of {record.max_requests} model requests"
            if (
                record.max_total_tokens is not None
                and usage.total_tokens >= record.max_total_tokens
            ):
                return (
                    f"this attempt reached its limit of {record.max_total_tokens} model tokens "
                    f"({usage.total_tokens} used)"
                )
            record.usage = replace(usage, requests=usage.requests + 1)
            if record.final_seen:
                record.continued = True
            first, record.on_first = record.on_first, None
        if first is not None:
            try:
                first()
            except Exception:
                log.exception("model gateway, attempt %s: first-request hook", record.attempt_id)
        return None

    # ------------------------------------------------------------------ serving

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # No connection cap: every running attempt may hold a stream open for minutes.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=self._timeout,
                limits=limits,
                follow_redirects=False,
            )
        return self._client

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _error(404, f"no such route: {request.url.path}", "invalid_request_error", "404")

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return _error(
            405,
            f"method {request.method} not allowed on {request.url.path}",
            "invalid_request_error",
            "405",
        )

    async def _models(self, request: Request) -> Response:
        record = await self._admitted(request)
        if record is None:
            return self._unauthorized()
        return await self._forward(request, record, "models", body=None, meter=False)

    async def _responses(self, request: Request) -> Response:
        record = await self._admitted(request)
        if record is None:
            return self._unauthorized()
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            return _error(
                415,
                "compressed request bodies are not supported by the openwham gateway",
                "invalid_request_error",
                "unsupported_content_encoding",
            )
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                return _error(
                    413,
                    f"request body exceeds {self.max_body_bytes} bytes",
                    "invalid_request_error",
                    "request_too_large",
                )
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(
                400, "the request body must be a JSON object", "invalid_request_error", "bad_json"
            )
        refusal = self._admit(record)
        if refusal is not None:
            # Codex 0.169.0 stops at once on this 429 (showing its own "Quota exceeded"
            # text); the engine reports ``last_error`` instead.
            return self._fail(record, 429, refusal, "insufficient_quota", "insufficient_quota")
        payload = bytes(raw)
        if record.model is not None and body.get("model") != record.model:
            body["model"] = record.model
            payload = json.dumps(body).encode()
        return await self._forward(request, record, "responses", body=payload, meter=True)

    def _unauthorized(self) -> Response:
        return _error(
            401,
            "invalid, expired or revoked attempt token",
            "invalid_request_error",
            "invalid_api_key",
        )

    async def _forward(
        self, request: Request, record: _Attempt, path: str, *, body: bytes | None, meter: bool
    ) -> Response:
        client = self._http()
        url = self.upstream.url(path)
        if request.url.query:
            url = f"{url}?{request.url.query}"
        dropped = _DROP_REQUEST | _connection_tokens(request.headers.get("connection"))
        base_headers = {k: v for k, v in request.headers.items() if k.lower() not in dropped}
        try:
            upstream = await self._send(client, request.method, url, base_headers, body)
            if upstream.status_code == 401 and await self.upstream.recover_unauthorized(client):
                await upstream.aclose()
                upstream = await self._send(client, request.method, url, base_headers, body)
        except UpstreamError as exc:
            return self._fail(record, exc.status, exc.message, exc.type, exc.code)
        if upstream.status_code >= 300:
            return await self._upstream_failure(record, upstream, url)
        return _Passthrough(self, record, upstream, meter=meter)

    async def _send(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        base_headers: dict[str, str],
        body: bytes | None,
    ) -> httpx.Response:
        headers = dict(base_headers)
        headers.update(await self.upstream.auth_headers(client))
        request = client.build_request(method, url, headers=headers, content=body)
        try:
            return await client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamError(
                self.upstream.unreachable_message(f"no answer in time: {type(exc).__name__}"),
                status=504,
                code="upstream_timeout",
            ) from None
        except httpx.HTTPError as exc:
            reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
            raise UpstreamError(
                self.upstream.unreachable_message(reason), code="upstream_unreachable"
            ) from None

    async def _upstream_failure(
        self, record: _Attempt, upstream: httpx.Response, url: str
    ) -> Response:
        status = upstream.status_code
        try:
            raw = b""
            async for chunk in upstream.aiter_bytes():
                raw += chunk
                if len(raw) > 64 * 1024:
                    break
        except httpx.HTTPError:
            pass
        finally:
            await upstream.aclose()
        text = self.upstream.redact(raw.decode("utf-8", "replace"))
        try:  # a JSON body could spell the key in escapes (\u0073…) that decode to it
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if parsed is not None:
            cleaned = _map_strings(parsed, self.upstream.redact)
            if cleaned != parsed:
                text = json.dumps(cleaned)
        detail = self.upstream.redact(_error_message(text))  # JSON escapes decoded
        if status in (401, 403):
            message = self.upstream.rejected_message(status)
            kind = ("upstream_auth_error", "upstream_auth_failed")
            return self._fail(record, PERMANENT_FAILURE_STATUS, message, *kind)
        if status in (404, 405):
            message = self.upstream.not_found_message(url.split("?")[0], status)
            return self._fail(
                record, PERMANENT_FAILURE_STATUS, message, "upstream_error", "upstream_not_found"
            )
        if status >= 500:
            message = self.upstream.server_error_message(status, detail)
            return self._fail(record, 502, message, "upstream_error", "upstream_server_error")
        # Other answers (400, 413, 429, ...) are the model's own words: pass them on.
        self._record_error(record, f"model upstream answered HTTP {status}: {detail}")
        headers = _response_headers(upstream.headers)
        return Response(text.encode(), status_code=status, headers=headers)


def _connection_tokens(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def _response_headers(headers: httpx.Headers) -> dict[str, str]:
    dropped = _DROP_RESPONSE | _connection_tokens(headers.get("connection"))
    return {k: v for k, v in headers.items() if k.lower() not in dropped}


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """``value`` (parsed JSON) with ``fn`` applied to every string in it, keys too."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(str(k)): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


def _error_message(text: str) -> str:
    """The ``error.message`` of an OpenAI-shaped body, else the start of the text."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
        if isinstance(body.get("detail"), str):
            return str(body["detail"])[:500]
    return " ".join(text.split())[:200]


class _Passthrough(Response):
    """ASGI response that relays an upstream answer chunk by chunk while metering it."""

    def __init__(
        self, gateway: Gateway, record: _Attempt, upstream: httpx.Response, *, meter: bool
    ) -> None:
        self.status_code = upstream.status_code
        self.background = None
        self.gateway = gateway
        self.record = record
        self.upstream = upstream
        content_type = upstream.headers.get("content-type", "")
        self.sse = meter and content_type.startswith("text/event-stream")
        self.parser: SSEParser | JSONBody | None = None
        self.item_types: list[str] = []  # of the response's output items, as they are done
        if self.sse:
            self.parser = SSEParser(self._on_event, extra=(_ITEM_DONE,))
        elif meter and "json" in content_type:
            self.parser = JSONBody(self._on_json)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == _ITEM_DONE:
            item = event.get("item")
            self.item_types.append(str(item.get("type")) if isinstance(item, dict) else "")
            return
        response = event.get("response")
        if not isinstance(response, dict):
            return
        if event.get("type") == "response.completed":
            output = response.get("output")
            types = list(self.item_types)
            if isinstance(output, list):
                types += [str(x.get("type")) if isinstance(x, dict) else "" for x in output]
            if "message" in types and set(types) <= _FINAL_ITEM_TYPES:
                self.gateway._final_response(self.record)
        numbers = usage_numbers(response.get("usage"))
        if numbers is not None:
            self.gateway._add_usage(self.record, numbers)
        if event.get("type") == "response.failed":
            error = response.get("error")
            detail = error.get("message") if isinstance(error, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            self.gateway._record_error(
                self.record, f"the model failed the response ({code}): {detail}"
            )

    def _on_json(self, body: dict[str, Any]) -> None:
        numbers = usage_numbers(body.get("usage"))
        if numbers is not None:
            self.gateway._add_usage(self.record, numbers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.upstream.status_code,
                    "headers": [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in _response_headers(self.upstream.headers).items()
                    ],
                }
            )
            async with anyio.create_task_group() as group:

                async def pump() -> None:
                    await self._pump(send)
                    group.cancel_scope.cancel()

                group.start_soon(pump)
                await _wait_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()

    async def _pump(self, send: Send) -> None:
        complete = False
        try:
            async for chunk in self.upstream.aiter_bytes():
                if self.parser is not None:
                    self.parser.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if not self.record.active(time.time()):
                    break  # revoked (cancelled attempt) or expired: stop spending tokens
            else:
                complete = True
                if self.parser is not None:
                    self.parser.close()
        except httpx.HTTPError as exc:
            reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
            message = (
                f"model upstream {self.gateway.upstream.base_url} broke off the response "
                f"stream ({reason})"
            )
            message = self.gateway._record_error(self.record, message)
            if isinstance(self.parser, SSEParser) and self.parser.at_boundary:
                await send({"type": "http.response.body", "body": _failed_frame(message)})
                return
        if complete and isinstance(self.parser, SSEParser) and self.parser.terminal_seen is None:
            self.gateway._record_error(
                self.record,
                f"model upstream {self.gateway.upstream.base_url} ended the stream before "
                "response.completed",
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})


_ITEM_DONE = "response.output_item.done"
# A completed response with only these output items (and a message among them) ends the
# agent's turn: Codex asks for more only after a tool call.
_FINAL_ITEM_TYPES = frozenset({"message", "reasoning"})


def _failed_frame(message: str) -> bytes:
    event = {
        "type": "response.failed",
        "response": {"id": "", "error": {"code": "upstream_error", "message": message}},
    }
    return f"data: {json.dumps(event)}\n\n".encode()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
