"""Typed request dependencies: the app state, a database session and the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from openwham.service.accounts import Principal, authenticate
from openwham.service.errors import Unauthorized

from .state import AppState

bearer = HTTPBearer(auto_error=False, description="API token from `wham token create`")


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.wham
    return state


def get_session(state: Annotated[AppState, Depends(get_state)]) -> Iterator[Session]:
    """One session per request; handlers commit their writes before they answer."""
    with state.db.sessions() as session:
        try:
            yield session
        finally:
            session.rollback()


def get_principal(
    state: Annotated[AppState, Depends(get_state)],
    db: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    chatgpt_account_id: Annotated[str | None, Header(alias="ChatGPT-Account-Id")] = None,
) -> Principal:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("Missing bearer token: send Authorization: Bearer <token>")
    return authenticate(db, state.signing_key, credentials.credentials, chatgpt_account_id)


StateDep = Annotated[AppState, Depends(get_state)]
SessionDep = Annotated[Session, Depends(get_session)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
