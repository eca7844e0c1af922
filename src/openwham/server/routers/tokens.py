"""The caller's own API tokens: list, create, revoke (openwham only; docs/api.md)."""

from __future__ import annotations

import time

from fastapi import APIRouter

from openwham.service import accounts
from openwham.service import tokens as api_tokens
from openwham.wire.tokens import ApiTokenCreate, ApiTokenCreated, ApiTokenInfo, ApiTokenList

from ..deps import PrincipalDep, SessionDep, StateDep

router = APIRouter(tags=["tokens"])


@router.get("/tokens", response_model=ApiTokenList)
def list_tokens(principal: PrincipalDep, db: SessionDep) -> ApiTokenList:
    now = time.time()
    rows = api_tokens.list_for_user(db, principal.user_id)
    return ApiTokenList(
        items=[
            ApiTokenInfo.model_validate(
                api_tokens.describe(r, now=now, current_id=principal.token_id)
            )
            for r in rows
        ]
    )


@router.post("/tokens", response_model=ApiTokenCreated, status_code=201)
def create_token(
    body: ApiTokenCreate, state: StateDep, principal: PrincipalDep, db: SessionDep
) -> ApiTokenCreated:
    """A new token for the caller, in the account the request acts in."""
    ttl = api_tokens.lifetime_seconds(body.expires_in_days, state.settings.token_ttl_seconds)
    now = time.time()
    row, token = accounts.create_api_token(
        db,
        state.signing_key,
        principal.user,
        principal.account,
        ttl_seconds=ttl,
        name=body.name,
        now=now,
    )
    db.commit()
    info = api_tokens.describe(row, now=now, current_id=principal.token_id)
    return ApiTokenCreated.model_validate({**info, "token": token})


@router.delete("/tokens/{token_id}", response_model=ApiTokenInfo)
def revoke_token(token_id: str, principal: PrincipalDep, db: SessionDep) -> ApiTokenInfo:
    """Revoke one of the caller's tokens (also the one in use: ``wham logout``); from the
    next request on, every node answers 401 for it."""
    now = time.time()
    row = api_tokens.revoke(db, principal.user_id, token_id, now=now)
    db.commit()
    return ApiTokenInfo.model_validate(
        api_tokens.describe(row, now=now, current_id=principal.token_id)
    )
