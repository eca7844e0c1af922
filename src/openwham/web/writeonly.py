"""Settings pages that list an account's write-only items (forge connections, git
credentials): the list, a form that adds one (its secret fields are never shown again, not
even when the form comes back with an error) and a remove button per item. One
implementation, a :class:`WriteOnlyPage` per page; everything goes through the item's
service module, as the API's routes do."""

# No `from __future__ import annotations`: FastAPI must see the dependency aliases as objects.

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session

from openwham.service.errors import BadRequest
from openwham.service.keys import SecretBox

from . import views
from .routes import Form, WebUI


class ItemService(Protocol):
    """What a page needs of its service module (``service.forges``, ``service.gitcreds``)."""

    def list_rows(self, db: Session, principal: Any) -> Sequence[Any]: ...

    def render(self, row: Any) -> BaseModel: ...

    def create(self, db: Session, principal: Any, body: Any, box: SecretBox) -> Any: ...

    def delete(self, db: Session, principal: Any, item_id: str) -> None: ...


@dataclass(frozen=True)
class WriteOnlyPage:
    path: str  # e.g. /settings/forges; items are removed at {path}/{id}/remove
    template: str
    rows_key: str  # the template's name for the list
    service: ItemService
    body: type[BaseModel]  # what the form's fields make (the API's create body)
    fields: tuple[str, ...]
    secret_fields: tuple[str, ...]
    defaults: dict[str, str] = field(default_factory=dict)

    def rows(self, db: Session, principal: Any) -> list[dict[str, Any]]:
        out = []
        for row in self.service.list_rows(db, principal):
            info = self.service.render(row).model_dump()
            info["created"] = views.utc_minute(row.created_at)
            out.append(info)
        return out


def add_routes(ui: WebUI, spec: WriteOnlyPage) -> None:
    """Register ``spec``'s page on ``ui.router`` (before the router is included in the app)."""
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
        shown = {k: v for k, v in (values or {}).items() if k not in spec.secret_fields}
        context = {
            spec.rows_key: spec.rows(db, principal),
            "error": error,
            "values": {**spec.defaults, **shown},
        }
        return ui.render(
            request, spec.template, context, status=status, sess=sess, principal=principal
        )

    @r.get(spec.path)
    def show(request: Request, db: DbDep) -> Response:
        return page(request, db)

    @r.post(spec.path)
    def add(request: Request, db: DbDep, form: FormDep) -> Response:
        _, principal = ui.principal(request, db)
        values = {name: form.get(name) for name in spec.fields}
        try:
            body = views.form_model(spec.body, values)
            spec.service.create(db, principal, body, ui.backend.secret_box)
        except BadRequest as exc:
            db.rollback()
            return page(request, db, error=exc.detail, values=values, status=400)
        db.commit()
        return ui.redirect(spec.path)

    @r.post(spec.path + "/{item_id}/remove")
    def remove(request: Request, item_id: str, db: DbDep, form: FormDep) -> Response:
        _, principal = ui.principal(request, db)
        spec.service.delete(db, principal, item_id)
        db.commit()
        return ui.redirect(spec.path)
