"""Typed request dependencies: the app state, a database session and the caller."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from openwham.service.accounts import (
    Claims,
    Principal,
    Recheck,
    authenticate,
    authenticate_for_read,
    read_claims,
)
from openwham.service.errors import Unauthorized

from .state import AppState

bearer = HTTPBearer(auto_error=False, description="API token from `wham token create`")


async def get_state(request: Request) -> AppState:
    """Async: a plain lookup needs no worker thread."""
    state: AppState = request.app.state.wham
    return state


@dataclass(frozen=True)
class RequestDb:
    """The request's session and its caller."""

    session: Session
    principal: Principal


def open_request(
    state: Annotated[AppState, Depends(get_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    chatgpt_account_id: Annotated[str | None, Header(alias="ChatGPT-Account-Id")] = None,
) -> Iterator[RequestDb]:
    """One session per request, on the request pool (the admission gate guarantees its
    connection), opened and authenticated in one worker-thread call; the principal and the
    handler share it. Handlers commit their writes before they answer."""
    if credentials is None or not credentials.credentials:
        raise Unauthorized("Missing bearer token: send Authorization: Bearer <token>")
    with state.db.requests() as session:
        try:
            principal = authenticate(
                session, state.signing_key, credentials.credentials, chatgpt_account_id
            )
            yield RequestDb(session, principal)
        finally:
            session.rollback()


async def get_session(ctx: Annotated[RequestDb, Depends(open_request)]) -> Session:
    """Async: a lookup needs no worker thread (each thread hop costs as much as a query)."""
    return ctx.session


async def get_principal(ctx: Annotated[RequestDb, Depends(open_request)]) -> Principal:
    return ctx.principal


@dataclass(frozen=True)
class Reader:
    """A hot read (task details, the lists) in ONE worker-thread call: open the session,
    authenticate (the token's row is read on every request, so a revocation holds at once on
    every node), read, render the wire model to JSON bytes, close. A sync handler with
    ``open_request`` took four hand-offs (session and caller, handler, response validation,
    session close), each costing about as much as a query; the answer is the bytes FastAPI's
    ``response_model`` serialisation gives (``by_alias``), rendered once."""

    state: AppState
    token: str
    account_header: str | None

    async def json(self, read: Callable[[Session, Principal], BaseModel | bytes]) -> Response:
        """``read``'s wire model as JSON, or the JSON bytes it rendered itself."""
        body = await self.state.readers.run(partial(self._render, read))
        return Response(body, media_type="application/json")

    async def rows(
        self,
        read: Callable[[Connection, Claims], bytes],
        full: Callable[[Session, Principal], BaseModel | bytes],
    ) -> Response:
        """``read``'s JSON bytes: a read in one Core statement that reads the token's row
        too (``accounts.principal_cte``). Where that row does not let it through as it is
        (``Recheck``: revoked, expired, unknown, no such account), ``full`` answers after
        the full check, whose refusal is the exact answer (so it is the same as
        ``json(full)``'s in every case)."""
        body = await self.state.readers.run(partial(self._render_rows, read, full))
        return Response(body, media_type="application/json")

    def _render_rows(
        self,
        read: Callable[[Connection, Claims], bytes],
        full: Callable[[Session, Principal], BaseModel | bytes],
    ) -> bytes:
        claims = read_claims(self.state.signing_key, self.token, self.account_header)
        if claims is not None:
            try:
                with self.state.db.read_connection() as conn:
                    return read(conn, claims)
            except Recheck:
                pass
        return self._render(full)

    def _render(self, read: Callable[[Session, Principal], BaseModel | bytes]) -> bytes:
        with self.state.db.read_session() as session:
            principal = authenticate_for_read(
                session, self.state.signing_key, self.token, self.account_header
            )
            model = read(session, principal)
            if isinstance(model, bytes):
                return model
            return model.__pydantic_serializer__.to_json(model, by_alias=True)


async def get_reader(
    state: Annotated[AppState, Depends(get_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    chatgpt_account_id: Annotated[str | None, Header(alias="ChatGPT-Account-Id")] = None,
) -> Reader:
    """Async: checks only that a token was sent; ``Reader.json`` does the rest in its thread."""
    if credentials is None or not credentials.credentials:
        raise Unauthorized("Missing bearer token: send Authorization: Bearer <token>")
    return Reader(state, credentials.credentials, chatgpt_account_id)


StateDep = Annotated[AppState, Depends(get_state)]
ReaderDep = Annotated[Reader, Depends(get_reader)]
SessionDep = Annotated[Session, Depends(get_session)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]

# User-Agent prefixes of the official Codex CLI (``codex cloud``, its TUI, ``codex apply``):
# ``{originator}/{version} (…)``, ``codex-cli`` without one (docs/reference/codex-cli.md §4.1).
OFFICIAL_CLIENT_AGENTS = ("codex_cli_rs/", "codex_exec/", "codex-cli")


async def inline_diff_limit(request: Request, state: StateDep) -> int | None:
    """How much of a diff task details and turns carry inline: ``WHAM_INLINE_DIFF_MAX_BYTES``,
    or all of it (``None``) for the official Codex CLI, whose ``codex apply`` and ``codex
    cloud diff/apply`` read only the inline diff and cannot follow ``…/turns/{id}/diff``
    (docs/api.md, "Big diffs"). Not a permission: the whole diff is the caller's anyway.
    Async: a header lookup needs no worker thread."""
    return inline_limit(
        state, request.headers.get("user-agent", ""), "originator" in request.headers
    )


def inline_limit(state: AppState, user_agent: str, originator: bool) -> int | None:
    """``inline_diff_limit`` from the two headers it looks at."""
    if user_agent.startswith(OFFICIAL_CLIENT_AGENTS) or originator:
        return None
    return state.settings.inline_diff_max_bytes


InlineDiffDep = Annotated[int | None, Depends(inline_diff_limit)]
