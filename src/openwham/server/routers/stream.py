"""``tasks/{task_id}/turns/{turn_id}/stream``: an attempt's events as Server-Sent Events.

Frames are ``id: <n>`` / ``event: message`` / ``data: {"id", "item_type", "timestamp",
"payload", "<item_type>": payload}`` (docs/reference/wham-api.md §5 leaves the payload key open, so
both are sent). ``Last-Event-ID`` (or ``?last_event_id=``) replays what came after it. The
stream ends after the attempt's terminal ``task_turn_event``; a client that reconnects after
that gets an empty stream that ends at once. A comment line every ``fanout.KEEPALIVE_SECONDS``
keeps proxies from closing a quiet stream. The stream holds no database connection while it
waits, and does not read the database itself once it has caught up: ``server/fanout.py``
reads each turn once for all its streams. A stream that cannot keep up is ended (the client
resumes with ``Last-Event-ID``). Under ``wham serve`` (uvicorn, httptools) a stream that has
caught up is written by its turn's tail straight to the connection (``server/direct.py``);
elsewhere every chunk goes through ASGI ``send``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.security.utils import get_authorization_scheme_param
from starlette.types import Receive, Scope, Send

from openwham.service import tasks
from openwham.service.accounts import authenticate
from openwham.service.errors import BadRequest, Unauthorized
from openwham.store import events

from .. import direct
from ..deps import StateDep
from ..state import AppState

router = APIRouter(tags=["tasks"])


_BODY = "http.response.body"


class TurnStream(Response):
    """The stream's response: the head through ASGI ``send`` (the middleware sees it), then
    the body: through ``send``, or, where ``direct.find`` allows, past it once caught up.
    Ends when ``frames`` ends or the client disconnects."""

    media_type = "text/event-stream; charset=utf-8"

    def __init__(self, frames: Callable[[direct.Sink | None], AsyncGenerator[bytes, None]]) -> None:
        self.status_code = 200
        self.background = None
        self.frames = frames
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sink = direct.find(scope)
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if sink is not None and not sink.started():
            sink = None
        body = self.frames(sink)
        error: Exception | None = None
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    nonlocal error
                    try:
                        async for data in body:
                            await send({"type": _BODY, "body": data, "more_body": True})
                        await send({"type": _BODY, "body": b"", "more_body": False})
                    except Exception as exc:  # raised below, outside the task group
                        error = exc
                    finally:
                        group.cancel_scope.cancel()

                group.start_soon(stream)
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()
        finally:
            await body.aclose()
        if error is not None:
            raise error


def _parse_last_id(header: str | None, query: str | None) -> int:
    raw = header if header not in (None, "") else query
    if raw in (None, ""):
        return 0
    assert raw is not None
    if not raw.isdigit() or len(raw) > 18:
        raise BadRequest("Last-Event-ID must be an event id from this stream")
    return int(raw)


def _authorize(state: AppState, request: Request, task_id: str, turn_id: str) -> str | None:
    """Checks the caller and the turn; returns the caller's API token id. (On the request
    pool: this runs while the request holds its admission slot, before the stream starts.)"""
    scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Missing bearer token: send Authorization: Bearer <token>")
    with state.db.requests() as s:
        principal = authenticate(
            s, state.signing_key, token, request.headers.get("ChatGPT-Account-Id")
        )
        task = tasks.get_task_row(s, principal, task_id)
        tasks.get_turn_row(s, task, turn_id)
    return principal.token_id


async def stream(
    task_id: str,
    turn_id: str,
    request: Request,
    state: StateDep,
    item_type: Annotated[list[str] | None, Query(description="Only these item types")] = None,
    last_event_id: Annotated[str | None, Query(description="Resume after this event id")] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> TurnStream:
    """Live events of one attempt (status lines, work-log messages, logs, title)."""
    token_id = await anyio.to_thread.run_sync(_authorize, state, request, task_id, turn_id)
    after = _parse_last_id(last_event_id_header, last_event_id)
    types: set[str] | None = None
    if item_type:
        unknown = sorted(set(item_type) - set(events.ITEM_TYPES))
        if unknown:
            raise BadRequest(
                f"Unknown item_type {unknown[0]!r}: use {', '.join(events.ITEM_TYPES)}"
            )
        types = set(item_type)
    fanout = state.fanout
    return TurnStream(lambda sink: fanout.frames(turn_id, after, types, token_id, sink))


for _method in ("GET", "POST"):
    router.add_api_route(
        "/tasks/{task_id}/turns/{turn_id}/stream",
        stream,
        methods=[_method],
        name=f"stream_{_method.lower()}",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
