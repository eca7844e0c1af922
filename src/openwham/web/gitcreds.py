"""The web UI's Git credentials page (``/settings/git-credentials``, linked from the Forges
page): the account's credentials for private remotes, a form for an HTTPS token or an SSH
key (write-only: never shown again) and a remove button per credential. Everything goes
through ``service.gitcreds``, as the API's ``git_credentials`` routes do."""

# No `from __future__ import annotations`: FastAPI must see the dependency aliases as objects.

from typing import Annotated, Any

from fastapi import Depends, Request, Response
from sqlalchemy.orm import Session

from openwham.service import gitcreds
from openwham.service.errors import BadRequest
from openwham.wire.gitcreds import GitCredentialCreate

from . import views
from .routes import Form, WebUI

PATH = "/settings/git-credentials"
FIELDS = ("url_prefix", "username", "secret", "ssh_private_key", "known_hosts")
SECRET_FIELDS = ("secret", "ssh_private_key")


def _rows(db: Session, principal: Any) -> list[dict[str, Any]]:
    out = []
    for row in gitcreds.list_rows(db, principal):
        info = gitcreds.render(row).model_dump()
        info["created"] = views.utc_minute(row.created_at)
        out.append(info)
    return out


def _body(values: dict[str, str]) -> GitCredentialCreate:
    return views.form_model(GitCredentialCreate, values)


def add_routes(ui: WebUI) -> None:
    """Register the page on ``ui.router`` (before the router is included in the app)."""
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
        shown = {k: v for k, v in (values or {}).items() if k not in SECRET_FIELDS}
        context = {"credentials": _rows(db, principal), "error": error, "values": shown}
        return ui.render(
            request, "gitcreds.html", context, status=status, sess=sess, principal=principal
        )

    @r.get(PATH)
    def credentials_page(request: Request, db: DbDep) -> Response:
        return page(request, db)

    @r.post(PATH)
    def add_credential(request: Request, db: DbDep, form: FormDep) -> Response:
        _, principal = ui.principal(request, db)
        values = {name: form.get(name) for name in FIELDS}
        try:
            gitcreds.create(db, principal, _body(values), ui.backend.secret_box)
        except BadRequest as exc:
            db.rollback()
            return page(request, db, error=exc.detail, values=values, status=400)
        db.commit()
        return ui.redirect(PATH)

    @r.post(PATH + "/{credential_id}/remove")
    def remove_credential(
        request: Request, credential_id: str, db: DbDep, form: FormDep
    ) -> Response:
        _, principal = ui.principal(request, db)
        gitcreds.delete(db, principal, credential_id)
        db.commit()
        return ui.redirect(PATH)
