"""Usage, settings and the start-up calls of Codex clients (docs/reference/wham-api.md §6, §8)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from openwham.service import accounts, usage
from openwham.service import settings as user_settings
from openwham.wire import (
    AccountCheckEntry,
    AccountsCheck,
    RateLimitStatusPayload,
    UserPreferencesConfig,
    UserSettings,
    UserSettingsPatch,
)

from ..deps import PrincipalDep, SessionDep, StateDep

router = APIRouter(tags=["account"])


@router.get("/usage", response_model=RateLimitStatusPayload)
def get_usage(state: StateDep, principal: PrincipalDep, db: SessionDep) -> RateLimitStatusPayload:
    return usage.status_payload(db, state.settings, principal)


@router.get("/settings/user", response_model=UserSettings)
def get_user_settings(principal: PrincipalDep) -> UserSettings:
    return user_settings.get(principal)


@router.patch("/settings/user", response_model=UserSettings)
def patch_user_settings(
    body: UserSettingsPatch, principal: PrincipalDep, db: SessionDep
) -> UserSettings:
    result = user_settings.patch(db, principal, body)
    db.commit()
    return result


@router.get("/settings/configs/user-preferences", response_model=UserPreferencesConfig)
def user_preferences(principal: PrincipalDep) -> UserPreferencesConfig:
    return user_settings.preferences_config()


@router.get("/accounts/check", response_model=AccountsCheck)
def accounts_check(request: Request, principal: PrincipalDep, db: SessionDep) -> AccountsCheck:
    """Account routing for Codex clients; ``workspace_backend_origin`` is this server."""
    origin = str(request.base_url).rstrip("/")
    rows = accounts.user_accounts(db, principal.user_id)
    entries = [
        AccountCheckEntry(
            id=a.id,
            name=a.name,
            profile_picture_url=None,
            structure="personal" if a.name == "Personal" else "workspace",
            workspace_backend_origin=origin,
            account_routing_override="NO_CONSTRAINT",
            plan_type=a.plan_type,
        )
        for a in rows
    ]
    return AccountsCheck(
        accounts=entries,
        account_ordering=[a.id for a in rows],
        default_account_id=principal.account_id,
    )


@router.get("/config/bundle")
def config_bundle(principal: PrincipalDep) -> dict[str, Any]:
    """No managed configuration: an empty bundle is what Codex accepts."""
    return {}


@router.get("/config/requirements")
def config_requirements(principal: PrincipalDep) -> dict[str, Any]:
    return {}


@router.get("/workspace-messages")
def workspace_messages(principal: PrincipalDep) -> dict[str, Any]:
    return {}
