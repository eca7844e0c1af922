"""``tasks/{task_id}/turns/{turn_id}/stream``: an attempt's events as Server-Sent Events.

Frames are ``id: <n>`` / ``event: message`` / ``data: {"id", "item_type", "timestamp",
"payload", "<item_type>": payload}`` (docs/reference/wham-api.md §5 leaves the payload key open, so
both are sent). ``Last-Event-ID`` (or ``?last_event_id=``) replays what came after it. The
stream ends after the attempt's terminal ``task_turn_event``; a client that reconnects after
that gets an empty stream that ends at once. A comment line every ``KEEPALIVE_SECONDS`` keeps
proxies from closing a quiet stream. The stream holds no database connection while it waits.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy import func, select

from openwham.service import tasks
from openwham.service import tokens as api_tokens
from openwham.service.accounts import authenticate
from openwham.service.errors import BadRequest, Unauthorized
from openwham.store import events
from openwham.store import models as m
from openwham.store.events import Event

from ..deps import StateDep
from ..state import AppState

router = APIRouter(tags=["tasks"])

KEEPALIVE_SECONDS = 15.0
# How long a stream waits for the terminal event of an attempt whose status is already
# terminal (a running attempt that was cancelled: its executor writes the last frames).
TERMINAL_GRACE_SECONDS = 5.0


def _frame(event: Event) -> bytes:
    data = {
        "id": str(event.id),
        "item_type": event.item_type,
        "timestamp": event.created_at,
        "payload": event.payload,
        event.item_type: event.payload,
    }
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event.id}\nevent: message\ndata: {text}\n\n".encode()


def _synthetic_end(turn_id: str, status: str, body: dict[str, Any]) -> bytes:
    latest = body.get("latest_event") or {}
    payload = events.status_payload(
        str(latest.get("text") or status.capitalize()), status, error=body.get("error")
    )
    data = {
        "id": None,
        "item_type": events.TASK_TURN_EVENT,
        "timestamp": payload["created"],
        "payload": payload,
        events.TASK_TURN_EVENT: payload,
        "turn_id": turn_id,
    }
    return f"event: message\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


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


def _token_active(state: AppState, token_id: str) -> bool:
    with state.db.sessions() as s:
        return api_tokens.is_active(s, token_id)


def _read(state: AppState, turn_id: str, after: int) -> tuple[list[Event], str | None, bool]:
    """New events, the turn's status, whether a terminal event exists at or before ``after``.
    (Not the turn's body: it holds the whole work log, and this runs on every event.)"""
    with state.db.sessions() as s:
        batch = events.read(s, turn_id, after=after)
        status = s.scalar(select(m.Turn.turn_status).where(m.Turn.id == turn_id))
        if status is None:
            return batch, None, True
        ended_before = False
        if not batch and status in events.TERMINAL_STATUSES:
            last_status = s.scalar(
                select(func.max(m.TurnEvent.id)).where(
                    m.TurnEvent.turn_id == turn_id,
                    m.TurnEvent.item_type == events.TASK_TURN_EVENT,
                    m.TurnEvent.id <= after,
                )
            )
            if last_status is not None:
                row = s.get(m.TurnEvent, last_status)
                ended_before = bool(
                    row and row.payload.get("turn_status") in events.TERMINAL_STATUSES
                )
        return batch, status, ended_before


def _body(state: AppState, turn_id: str) -> dict[str, Any]:
    with state.db.sessions() as s:
        body = s.scalar(select(m.Turn.body).where(m.Turn.id == turn_id))
    return dict(body or {})


async def _frames(
    state: AppState,
    turn_id: str,
    after: int,
    types: set[str] | None,
    token_id: str | None = None,
) -> AsyncIterator[bytes]:
    """The stream's frames; with ``token_id``, it ends within ``KEEPALIVE_SECONDS`` of that
    token being revoked or expiring (a stream outlives the request that checked the token)."""
    sub = state.bus.subscribe(turn_id)
    try:
        last = after
        grace: float | None = None
        recheck = anyio.current_time() + KEEPALIVE_SECONDS
        while True:
            if token_id is not None and anyio.current_time() >= recheck:
                if not await anyio.to_thread.run_sync(_token_active, state, token_id):
                    return
                recheck = anyio.current_time() + KEEPALIVE_SECONDS
            batch, status, ended_before = await anyio.to_thread.run_sync(
                _read, state, turn_id, last
            )
            for event in batch:
                last = event.id
                if types is None or event.item_type in types:
                    yield _frame(event)
                if event.is_terminal:
                    return
            if batch:
                grace = None
                continue
            if status is None or ended_before:
                return
            if status in events.TERMINAL_STATUSES:
                now = anyio.current_time()
                grace = grace if grace is not None else now + TERMINAL_GRACE_SECONDS
                if now >= grace:
                    body = await anyio.to_thread.run_sync(_body, state, turn_id)
                    yield _synthetic_end(turn_id, status, body)
                    return
                await sub.wait(0.25)
                continue
            before = anyio.current_time()
            await sub.wait(KEEPALIVE_SECONDS)
            if anyio.current_time() - before >= KEEPALIVE_SECONDS - 0.01:
                yield b": keep-alive\n\n"
    finally:
        sub.close()


async def stream(
    task_id: str,
    turn_id: str,
    request: Request,
    state: StateDep,
    item_type: Annotated[list[str] | None, Query(description="Only these item types")] = None,
    last_event_id: Annotated[str | None, Query(description="Resume after this event id")] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
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
    return StreamingResponse(
        _frames(state, turn_id, after, types, token_id),
        media_type="text/event-stream; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


for _method in ("GET", "POST"):
    router.add_api_route(
        "/tasks/{task_id}/turns/{turn_id}/stream",
        stream,
        methods=[_method],
        name=f"stream_{_method.lower()}",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
