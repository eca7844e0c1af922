"""The web UI's Tokens page (``/settings/tokens``): the signed-in user's API tokens, a form
that creates one (shown once) and a revoke button per token.

Kept apart from ``routes.py``: ``add_routes`` puts these pages on a ``WebUI``'s router, so they
share its sign-in check, CSRF check and error pages. Everything goes through
``service.tokens``, as the API's ``tokens`` routes do. Revoking the token this browser signed
in with ends this session too (``WebUI.principal`` checks the token on every page).
"""

# No `from __future__ import annotations`: FastAPI must see the dependency aliases as objects.

import time
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from sqlalchemy.orm import Session

from openwham.service import accounts
from openwham.service import tokens as api_tokens
from openwham.service.errors import BadRequest

from . import session, views
from .routes import Form, WebUI

PATH = "/settings/tokens"


_when = views.utc_minute


def _rows(db: Session, user_id: str, current_id: str | None) -> list[dict[str, Any]]:
    now = time.time()
    rows = []
    for row in api_tokens.list_for_user(db, user_id):
        info: dict[str, Any] = dict(api_tokens.describe(row, now=now, current_id=current_id))
        info.update(
            created=_when(row.created_at),
            last_used=_when(row.last_used_at),
            expires=_when(row.expires_at),
        )
        rows.append(info)
    return rows


def _days(text: str) -> float | None:
    """The form's lifetime field: empty means the server's default."""
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise BadRequest("Expires in: enter a number of days") from exc


def add_routes(ui: WebUI) -> None:
    """Register the Tokens page on ``ui.router`` (before the router is included in the app)."""
    r = ui.router
    DbDep = Annotated[Session, Depends(ui.db)]
    FormDep = Annotated[Form, Depends(ui.form)]

    def page(
        request: Request,
        db: Session,
        *,
        created: dict[str, Any] | None = None,
        error: str | None = None,
        values: dict[str, str] | None = None,
        status: int = 200,
    ) -> Response:
        sess, principal = ui.principal(request, db)
        context = {
            "tokens": _rows(db, principal.user_id, sess.token_id),
            "created": created,
            "error": error,
            "values": values or {"name": "", "expires_in_days": ""},
            "default_days": f"{ui.backend.settings.token_ttl_seconds / 86400:g}",
        }
        return ui.render(
            request, "tokens.html", context, status=status, sess=sess, principal=principal
        )

    @r.get(PATH)
    def tokens_page(request: Request, db: DbDep) -> Response:
        return page(request, db)

    @r.post(PATH)
    def create_token(request: Request, db: DbDep, form: FormDep) -> Response:
        _, principal = ui.principal(request, db)
        values = {"name": form.get("name"), "expires_in_days": form.get("expires_in_days")}
        try:
            ttl = api_tokens.lifetime_seconds(
                _days(values["expires_in_days"]), ui.backend.settings.token_ttl_seconds
            )
            row, token = accounts.create_api_token(
                db,
                ui.backend.signing_key,
                principal.user,
                principal.account,
                ttl_seconds=ttl,
                name=values["name"] or None,
            )
        except BadRequest as exc:
            db.rollback()
            return page(request, db, error=exc.detail, values=values, status=400)
        db.commit()
        created = {"id": row.id, "name": row.name, "token": token, "expires": _when(row.expires_at)}
        return page(request, db, created=created)

    @r.post(PATH + "/{token_id}/revoke")
    def revoke_token(request: Request, token_id: str, db: DbDep, form: FormDep) -> Response:
        sess, principal = ui.principal(request, db)
        api_tokens.revoke(db, principal.user_id, token_id)
        db.commit()
        if token_id == sess.token_id:  # this browser signed in with it: signed out now
            return ui.redirect("/login", session.new_session(), request)
        return ui.redirect(PATH)
