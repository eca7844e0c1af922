"""The web UI's Forges page (``/settings/forges``): the account's connections to GitHub,
GitLab and Gitea that open pull requests, a form that adds one (tokens are write-only:
never shown again) and a remove button per connection. Everything goes through
``service.forges``, as the API's ``forge_connections`` routes do."""

# No `from __future__ import annotations`: FastAPI must see the dependency aliases as objects.

from typing import Annotated, Any

from fastapi import Depends, Request, Response
from sqlalchemy.orm import Session

from openwham.service import forges
from openwham.service.errors import BadRequest
from openwham.wire.forges import ForgeConnectionCreate

from . import views
from .routes import Form, WebUI

PATH = "/settings/forges"
FIELDS = ("kind", "api_base_url", "repo_url_prefix", "token", "bot_token", "pr_authorship_mode")


def _rows(db: Session, principal: Any) -> list[dict[str, Any]]:
    out = []
    for row in forges.list_rows(db, principal):
        info = forges.render(row).model_dump()
        info["created"] = views.utc_minute(row.created_at)
        out.append(info)
    return out


def _body(values: dict[str, str]) -> ForgeConnectionCreate:
    return views.form_model(ForgeConnectionCreate, values)


def add_routes(ui: WebUI) -> None:
    """Register the Forges page on ``ui.router`` (before the router is included in the app)."""
    r = ui.router
    DbDep = Annotated[Session, Depends(ui.db)]
    FormDep = Annotated[Form, Depends(ui.form)]

    def page(
        request: Request,
        db: Session,
        *,
        error: str | None = None,
        values: dict[str, str] | None = None,
        status: int = 200,
    ) -> Response:
        sess, principal = ui.principal(request, db)
        shown = {k: v for k, v in (values or {}).items() if k not in ("token", "bot_token")}
        context = {
            "connections": _rows(db, principal),
            "error": error,
            "values": {"kind": "github", "pr_authorship_mode": "user", **shown},
        }
        return ui.render(
            request, "forges.html", context, status=status, sess=sess, principal=principal
        )

    @r.get(PATH)
    def forges_page(request: Request, db: DbDep) -> Response:
        return page(request, db)

    @r.post(PATH)
    def add_connection(request: Request, db: DbDep, form: FormDep) -> Response:
        _, principal = ui.principal(request, db)
        values = {name: form.get(name) for name in FIELDS}
        try:
            forges.create(db, principal, _body(values), ui.backend.secret_box)
        except BadRequest as exc:
            db.rollback()
            return page(request, db, error=exc.detail, values=values, status=400)
        db.commit()
        return ui.redirect(PATH)

    @r.post(PATH + "/{connection_id}/remove")
    def remove_connection(
        request: Request, connection_id: str, db: DbDep, form: FormDep
    ) -> Response:
        _, principal = ui.principal(request, db)
        forges.delete(db, principal, connection_id)
        db.commit()
        return ui.redirect(PATH)
