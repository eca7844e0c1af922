"""The account's git credentials for private remotes: add, list, remove (openwham only;
docs/api.md). Secrets and keys are write-only."""

from __future__ import annotations

from fastapi import APIRouter, Response

from openwham.service import gitcreds
from openwham.wire.gitcreds import GitCredentialCreate, GitCredentialInfo, GitCredentialList

from ..deps import PrincipalDep, SessionDep, StateDep

router = APIRouter(tags=["git credentials"])


@router.get("/git_credentials", response_model=GitCredentialList)
def list_credentials(principal: PrincipalDep, db: SessionDep) -> GitCredentialList:
    return GitCredentialList(items=[gitcreds.render(r) for r in gitcreds.list_rows(db, principal)])


@router.post("/git_credentials", response_model=GitCredentialInfo, status_code=201)
def create_credential(
    body: GitCredentialCreate, state: StateDep, principal: PrincipalDep, db: SessionDep
) -> GitCredentialInfo:
    row = gitcreds.create(db, principal, body, state.secret_box)
    db.commit()
    return gitcreds.render(row)


@router.delete("/git_credentials/{credential_id}", status_code=204, response_class=Response)
def delete_credential(credential_id: str, principal: PrincipalDep, db: SessionDep) -> Response:
    gitcreds.delete(db, principal, credential_id)
    db.commit()
    return Response(status_code=204)
