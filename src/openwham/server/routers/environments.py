"""Environments and machines (docs/reference/wham-api.md §7); bodies documented in docs/api.md."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from openwham.commands import gitcreds as gitcred_commands
from openwham.service import environments as envs
from openwham.wire import (
    Environment,
    EnvironmentCreate,
    EnvironmentUpdate,
    EnvironmentWithCreatorAndMachine,
    Machine,
)

from ..deps import PrincipalDep, SessionDep, StateDep
from ..state import AppState

router = APIRouter(tags=["environments"])


@router.get("/environments", response_model=list[Environment])
def list_environments(principal: PrincipalDep, db: SessionDep) -> list[Environment]:
    """A bare array, as the Codex CLI expects."""
    return envs.render_many(db, envs.list_rows(db, principal))


@router.get("/environments/recent", response_model=list[Environment])
def recent_environments(principal: PrincipalDep, db: SessionDep) -> list[Environment]:
    return envs.render_many(db, envs.list_rows(db, principal, recent=True))


@router.get("/environments/with-creators")
def environments_with_creators(principal: PrincipalDep, db: SessionDep) -> dict[str, Any]:
    items = []
    for row in envs.list_rows(db, principal):
        full = envs.render_with_creator(db, row).model_dump(mode="json")
        creator = full.pop("creator")
        full.pop("machine")
        items.append({"environment": full, "creator": creator})
    return {"items": items, "cursor": None}


@router.get("/environments/by-repo/{provider}/{owner}/{repo}", response_model=list[Environment])
def environments_by_repo(
    provider: str, owner: str, repo: str, principal: PrincipalDep, db: SessionDep
) -> list[Environment]:
    """Environments containing ``owner/repo`` (any provider; openwham matches on the name)."""
    return envs.render_many(db, envs.by_repo(db, principal, owner, repo))


@router.post("/environments", response_model=Environment, status_code=201)
def create_environment(
    body: EnvironmentCreate, state: StateDep, principal: PrincipalDep, db: SessionDep
) -> Environment:
    row = envs.create(db, principal, body, state.secret_box, state.settings)
    gitcred_commands.check_remotes(db, state.settings, principal.account_id, row.body)
    db.commit()
    return envs.render(row, 0)


@router.get("/environments/{env_id}", response_model=Environment)
def get_environment(env_id: str, principal: PrincipalDep, db: SessionDep) -> Environment:
    return envs.render_many(db, [envs.get_row(db, principal, env_id)])[0]


@router.get(
    "/environments/{env_id}/with-creator-and-machine",
    response_model=EnvironmentWithCreatorAndMachine,
)
def get_environment_with_creator(
    env_id: str, principal: PrincipalDep, db: SessionDep
) -> EnvironmentWithCreatorAndMachine:
    return envs.render_with_creator(db, envs.get_row(db, principal, env_id))


@router.patch("/environments/{env_id}", response_model=Environment)
def update_environment(
    env_id: str,
    body: EnvironmentUpdate,
    state: StateDep,
    principal: PrincipalDep,
    db: SessionDep,
) -> Environment:
    row = envs.update(db, principal, env_id, body, state.secret_box, state.settings)
    if body.repos is not None:
        gitcred_commands.check_remotes(db, state.settings, principal.account_id, row.body)
    db.commit()
    _drop_stale_setup_cache(state, env_id)
    return envs.render_many(db, [row])[0]


@router.delete("/environments/{env_id}", status_code=204, response_class=Response)
def delete_environment(
    env_id: str, principal: PrincipalDep, db: SessionDep, state: StateDep
) -> Response:
    envs.delete(db, principal, env_id)
    db.commit()
    _drop_stale_setup_cache(state, env_id)
    return Response(status_code=204)


@router.post("/environments/{env_id}/reset-cache", response_model=None)
def reset_cache(env_id: str, principal: PrincipalDep, db: SessionDep, state: StateDep) -> None:
    envs.reset_cache(db, principal, env_id)
    db.commit()
    _drop_stale_setup_cache(state, env_id)


def _drop_stale_setup_cache(state: AppState, env_id: str) -> None:
    """After an environment's change committed: its old post-setup snapshots (and standbys
    started from them) go now where nothing holds them."""
    executor = state.commands.executor
    if executor is not None:
        executor.drop_stale_setup_cache(env_id)


@router.get("/machines", response_model=list[Machine])
def machines(principal: PrincipalDep) -> list[Machine]:
    return [envs.MACHINE]
