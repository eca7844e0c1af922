"""The account's forge connections: add, list, remove (openwham only; docs/api.md). Tokens
are write-only."""

from __future__ import annotations

from fastapi import APIRouter, Response

from openwham.service import forges
from openwham.wire.forges import ForgeConnectionCreate, ForgeConnectionInfo, ForgeConnectionList

from ..deps import PrincipalDep, SessionDep, StateDep

router = APIRouter(tags=["forges"])


@router.get("/forge_connections", response_model=ForgeConnectionList)
def list_connections(principal: PrincipalDep, db: SessionDep) -> ForgeConnectionList:
    return ForgeConnectionList(items=[forges.render(r) for r in forges.list_rows(db, principal)])


@router.post("/forge_connections", response_model=ForgeConnectionInfo, status_code=201)
def create_connection(
    body: ForgeConnectionCreate, state: StateDep, principal: PrincipalDep, db: SessionDep
) -> ForgeConnectionInfo:
    row = forges.create(db, principal, body, state.secret_box)
    db.commit()
    return forges.render(row)


@router.delete("/forge_connections/{connection_id}", status_code=204, response_class=Response)
def delete_connection(connection_id: str, principal: PrincipalDep, db: SessionDep) -> Response:
    forges.delete(db, principal, connection_id)
    db.commit()
    return Response(status_code=204)
