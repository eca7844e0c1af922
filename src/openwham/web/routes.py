"""The web UI's pages: server-rendered HTML (Jinja2, autoescaped) with a little vanilla JS.

Every page needs a signed-in browser session (``session.py``); every POST form carries the
session's CSRF token. Domain work goes through ``openwham.service``, and what needs the
executor, the event bus or the locks through the application commands (``openwham.commands``,
with the server's ``Backend.commands``) the API calls too, so the UI can do nothing the API
could not.
Mistakes in a form come back as the form with the message and a 4xx status.
"""

# No `from __future__ import annotations` here: FastAPI must see the dependency aliases
# (local to WebUI._routes) as real objects, not as strings it cannot resolve.

import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from openwham import __version__
from openwham.commands import branches as branch_commands
from openwham.commands import gitcreds as gitcred_commands
from openwham.commands import prs as pr_commands
from openwham.commands import tasks as task_commands
from openwham.service import environments as envs
from openwham.service import logs, tasks, usage, webauth
from openwham.service import tokens as api_tokens
from openwham.service.accounts import Principal, authenticate
from openwham.service.errors import BadRequest, ServiceError
from openwham.store import models as m
from openwham.wire import (
    AgentNetworkAccess,
    CacheSettings,
    EnvironmentCreate,
    EnvironmentUpdate,
    RepoSpec,
    SetupCache,
)

from . import diffview, markdown, session, views
from .backend import Backend

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
PAGE_SIZE = 20
MAX_FORM_BYTES = 1024 * 1024
FAILED_SIGN_IN_DELAY = 0.5
SECURITY_HEADERS = {
    # Scripts and styles come only from /static; no inline code, no other origin.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class LoginRequired(Exception):
    """The page needs a signed-in session: redirect to the sign-in page."""


class CsrfFailed(Exception):
    """A form came without this session's token (another site, or an old page)."""


class FormTooLarge(Exception):
    pass


@dataclass
class Form:
    """An ``application/x-www-form-urlencoded`` body (parsed without extra packages)."""

    fields: dict[str, list[str]]

    def get(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[0] if values else default

    def getlist(self, name: str) -> list[str]:
        return list(self.fields.get(name) or [])

    def checked(self, name: str) -> bool:
        return self.get(name) in ("on", "true", "1")


class WebUI:
    """The router and what its handlers share: the backend, templates and the cookie key."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.key = session.derive_key(backend.signing_key)
        self.templates = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.globals["status_labels"] = views.STATUS_LABELS
        self.templates.globals["version"] = __version__
        self.templates.filters["markdown"] = markdown.render
        self.static_version = str(int(max(p.stat().st_mtime for p in STATIC.iterdir())))
        self.router = APIRouter(route_class=self._route_class(), include_in_schema=False)
        self._routes()

    # ------------------------------------------------------------------ plumbing

    @property
    def _inline(self) -> int:
        """The most of a diff the pages carry (``WHAM_INLINE_DIFF_MAX_BYTES``)."""
        return self.backend.settings.inline_diff_max_bytes

    def _route_class(self) -> type[APIRoute]:
        ui = self

        class UIRoute(APIRoute):
            """Errors on UI pages become HTML pages (the API's are JSON)."""

            def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
                handler = super().get_route_handler()

                async def guarded(request: Request) -> Response:
                    try:
                        return await handler(request)
                    except LoginRequired:
                        target = request.url.path
                        if request.url.query:
                            target += "?" + request.url.query
                        if request.method != "GET" or request.headers.get("X-Requested-With"):
                            return ui.error_page(request, 401, "Please sign in again.")
                        return RedirectResponse(
                            "/login?" + urlencode({"next": target}), status_code=303
                        )
                    except CsrfFailed:
                        return ui.error_page(
                            request,
                            403,
                            "This form has expired or came from another site. "
                            "Go back, reload the page and try again.",
                        )
                    except FormTooLarge:
                        return ui.error_page(request, 413, "The form is too large.")
                    except ServiceError as exc:
                        return ui.error_page(request, exc.status_code, exc.detail)

                return guarded

        return UIRoute

    def session_of(self, request: Request) -> session.WebSession:
        found = session.decode(self.key, request.cookies.get(session.COOKIE))
        return found or session.new_session()

    def db(self) -> Iterator[Session]:
        """A page's session, on the request pool (the server's admission gate holds a
        connection of it for every request it lets in)."""
        with self.backend.db.requests() as s:
            try:
                yield s
            finally:
                s.rollback()

    def principal(self, request: Request, db: Session) -> tuple[session.WebSession, Principal]:
        sess = self.session_of(request)
        if not sess.signed_in or sess.generation != webauth.generation(db):
            raise LoginRequired()
        assert sess.user_id is not None and sess.account_id is not None
        found = webauth.principal_for(db, sess.user_id, sess.account_id)
        if found is None or (sess.token_id and not api_tokens.is_active(db, sess.token_id)):
            raise LoginRequired()
        return sess, found

    async def form(self, request: Request) -> Form:
        """The posted form, after checking its CSRF token against the session cookie."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise BadRequest("Send the form as application/x-www-form-urlencoded")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise FormTooLarge()
        try:
            text = body.decode("utf-8")
            fields = parse_qs(text, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest("The form is not valid UTF-8 form data") from exc
        for values in fields.values():
            for value in values:
                if "\x00" in value:
                    raise BadRequest("The form contains a NUL character")
        found = session.decode(self.key, request.cookies.get(session.COOKIE))
        if found is None or not session.csrf_ok(self.key, found, (fields.get("csrf") or [""])[0]):
            raise CsrfFailed()
        return Form(fields)

    def _with_cookie(self, response: Response, request: Request, sess: session.WebSession) -> None:
        if sess.fresh:
            response.set_cookie(
                session.COOKIE,
                session.encode(self.key, sess),
                max_age=session.MAX_AGE_SECONDS,
                path="/",
                httponly=True,
                samesite="lax",
                secure=request.url.scheme == "https",
            )

    def _headers(self, response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def render(
        self,
        request: Request,
        name: str,
        context: dict[str, Any],
        *,
        status: int = 200,
        sess: session.WebSession | None = None,
        principal: Principal | None = None,
    ) -> HTMLResponse:
        sess = sess or self.session_of(request)
        page = self.templates.get_template(name).render(
            csrf=session.csrf_token(self.key, sess),
            me=principal.user if principal else None,
            path=request.url.path,
            static=f"/static/{{}}?v={self.static_version}",
            **context,
        )
        response = HTMLResponse(page, status_code=status)
        self._with_cookie(response, request, sess)
        return self._headers(response)  # type: ignore[return-value]

    def error_page(self, request: Request, status: int, message: str) -> HTMLResponse:
        sess = self.session_of(request)
        return self.render(
            request,
            "error.html",
            {"status": status, "message": message, "signed_in": sess.signed_in},
            status=status,
            sess=sess,
        )

    def _drop_stale_setup_cache(self, env_id: str) -> None:
        """After an environment's change committed: its old post-setup snapshots (and
        standbys started from them) go now where nothing holds them."""
        executor = self.backend.commands.executor
        if executor is not None:
            executor.drop_stale_setup_cache(env_id)

    def redirect(
        self, url: str, sess: session.WebSession | None = None, request: Request | None = None
    ) -> RedirectResponse:
        """A 303 to ``url``; with ``sess`` (a new session) it also sets the cookie."""
        response = RedirectResponse(url, status_code=303)
        if sess is not None and request is not None:
            self._with_cookie(response, request, sess)
        self._headers(response)
        return response

    # ------------------------------------------------------------------ routes

    def _routes(self) -> None:
        r = self.router
        DbDep = Annotated[Session, Depends(self.db)]
        FormDep = Annotated[Form, Depends(self.form)]

        @r.get("/login")
        def login_page(request: Request, db: DbDep, next: str = "/") -> Response:
            sess = self.session_of(request)
            if sess.signed_in and sess.generation == webauth.generation(db):
                return self.redirect(_safe_next(next))
            return self._login(request, db, sess, next=next)

        @r.post("/login")
        def login(request: Request, db: DbDep, form: FormDep) -> Response:
            target = _safe_next(form.get("next", "/"))
            token = form.get("token").strip()
            password = form.get("password")
            principal: Principal | None = None
            if token:
                try:
                    principal = authenticate(db, self.backend.signing_key, token, None)
                except ServiceError:
                    principal = None
            elif password:
                principal = webauth.owner_by_password(db, password)
            if principal is None:
                time.sleep(FAILED_SIGN_IN_DELAY)  # slows down guessing (one thread per try)
                what = "API token" if token else "password"
                if not token and not password:
                    message = "Enter an API token or the owner password."
                else:
                    message = f"That {what} is not valid."
                return self._login(
                    request, db, self.session_of(request), next=target, error=message, status=401
                )
            new = session.new_session(
                principal.user_id, principal.account_id, webauth.generation(db), principal.token_id
            )
            return self.redirect(target, new, request)

        @r.post("/logout")
        def logout(request: Request, form: FormDep) -> Response:
            return self.redirect("/login", session.new_session(), request)

        @r.get("/")
        def tasks_page(
            request: Request,
            db: DbDep,
            tab: str = "current",
            cursor: str | None = None,
        ) -> Response:
            sess, principal = self.principal(request, db)
            return self._tasks_page(request, db, sess, principal, tab=tab, cursor=cursor)

        @r.get("/rows")
        def rows(
            request: Request, db: DbDep, tab: str = "current", cursor: str | None = None
        ) -> Response:
            """A page of task rows (HTML), for "Load more" and the list's live refresh."""
            _, principal = self.principal(request, db)
            page = self._page(db, principal, tab, cursor)
            html = self.templates.get_template("_rows.html").render(
                rows=page["rows"], next_cursor=page["next_cursor"], tab=page["tab"]
            )
            return self._headers(HTMLResponse(html))

        @r.post("/tasks")
        def create_task(request: Request, db: DbDep, form: FormDep) -> Response:
            sess, principal = self.principal(request, db)
            prompt = form.get("prompt")
            values = {
                "prompt": prompt,
                "environment_id": form.get("environment_id"),
                "branch": form.get("branch").strip(),
                "attempts": form.get("attempts", "1"),
                "mode": form.get("mode", "code"),
            }
            try:
                body = _task_body(
                    {
                        "new_task": {
                            "environment_id": values["environment_id"],
                            **({"branch": values["branch"]} if values["branch"] else {}),
                            "run_environment_in_qa_mode": values["mode"] == "ask",
                        }
                    },
                    prompt,
                    values["attempts"],
                )
                created = task_commands.create(db, self.backend.commands, principal, body)
            except ServiceError as exc:
                db.rollback()
                return self._tasks_page(
                    request,
                    db,
                    sess,
                    principal,
                    tab="current",
                    cursor=None,
                    error=exc.detail,
                    values=values,
                    status=exc.status_code,
                )
            return self.redirect(f"/tasks/{quote(created.task_id)}")

        @r.get("/tasks/{task_id}")
        def task_page(
            request: Request, task_id: str, db: DbDep, turn: str | None = None
        ) -> Response:
            sess, principal = self.principal(request, db)
            return self._task_page(request, db, sess, principal, task_id, turn)

        @r.get("/codex/tasks/{task_id}")
        def codex_task_link(request: Request, task_id: str, db: DbDep) -> Response:
            """The task URL the CLI, the SDK and ``codex cloud`` print: the task page."""
            self.principal(request, db)  # signed out: sign-in, then back here
            return self.redirect(f"/tasks/{quote(task_id, safe='')}")

        @r.get("/codex/tasks/{task_id}/{rest:path}")
        def codex_task_sub_link(request: Request, task_id: str, rest: str, db: DbDep) -> Response:
            """Codex cloud's sub-pages of a task (``/diff``, ``/turns/...``): the task page."""
            self.principal(request, db)
            return self.redirect(f"/tasks/{quote(task_id, safe='')}")

        @r.get("/tasks/{task_id}/turns/{turn_id}/diff")
        def whole_diff(request: Request, task_id: str, turn_id: str, db: DbDep) -> Response:
            """An attempt's whole diff as a download (the page shows a big one cut)."""
            _, principal = self.principal(request, db)
            repo_id = request.query_params.get("repo_id")
            text = tasks.whole_diff(db, principal, task_id, turn_id, repo_id=repo_id)
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{task_id}.diff")[:120]
            response = Response(
                text.encode(),
                media_type="text/x-diff; charset=utf-8",
                headers={"Content-Disposition": f'attachment; filename="{name}"'},
            )
            return self._headers(response)

        @r.get("/tasks/{task_id}/attempts")
        def attempt_statuses(
            request: Request, task_id: str, db: DbDep, turn: str | None = None
        ) -> Response:
            """The statuses of the shown prompt's attempts (JSON), for the task page's live
            tabs and badge: the turn stream follows one attempt, the tabs show them all; and
            what the post-setup cache did for each (its line on the page, "" until known)."""
            _, principal = self.principal(request, db)
            exchanges = self._exchanges(db, principal, task_id, turn)
            siblings = exchanges[-1].siblings if exchanges else []
            body = {
                "attempts": [
                    {
                        "id": a.id,
                        "status": a.status,
                        "label": a.status_label,
                        "setup_cache": _setup_cache(a.turn),
                    }
                    for a in siblings
                ]
            }
            return self._headers(JSONResponse(body))

        @r.post("/tasks/{task_id}/follow-up")
        def follow_up(request: Request, task_id: str, db: DbDep, form: FormDep) -> Response:
            sess, principal = self.principal(request, db)
            turn_id = form.get("turn_id")
            values = {
                "prompt": form.get("prompt"),
                "attempts": form.get("attempts", "1"),
                "mode": form.get("mode", "code"),
            }
            try:
                body = _task_body(
                    {
                        "follow_up": {
                            "task_id": task_id,
                            "turn_id": turn_id,
                            "run_environment_in_qa_mode": values["mode"] == "ask",
                        }
                    },
                    values["prompt"],
                    values["attempts"],
                )
                task_commands.create(db, self.backend.commands, principal, body)
            except ServiceError as exc:
                db.rollback()
                return self._task_page(
                    request,
                    db,
                    sess,
                    principal,
                    task_id,
                    turn_id or None,
                    error=exc.detail,
                    values=values,
                    status=exc.status_code,
                )
            return self.redirect(f"/tasks/{quote(task_id)}")

        @r.post("/tasks/{task_id}/action")
        def task_action(request: Request, task_id: str, db: DbDep, form: FormDep) -> Response:
            _, principal = self.principal(request, db)
            action = form.get("action")
            turn_id = form.get("turn_id")
            back = f"/tasks/{quote(task_id)}" + (f"?turn={quote(turn_id)}" if turn_id else "")
            if action == "archive":
                tasks.set_archived(db, principal, task_id, True)
                db.commit()
            elif action == "unarchive":
                tasks.set_archived(db, principal, task_id, False)
                db.commit()
            elif action == "mark_read":
                tasks.mark_read(db, principal, task_id)
                db.commit()
            elif action == "cancel":
                task_commands.cancel(db, self.backend.commands, principal, task_id)
            elif action == "push":
                if not turn_id:
                    raise BadRequest("Choose the attempt to push")
                pr_commands.push(db, self.backend.commands, principal, task_id, turn_id)
            else:
                raise BadRequest("Unknown action")
            return self.redirect(back)

        @r.get("/tasks/{task_id}/events/{turn_id}")
        async def task_events(
            request: Request, task_id: str, turn_id: str, last_event_id: str | None = None
        ) -> Response:
            """The attempt's turn stream for the browser's EventSource (cookie-authenticated,
            so no API token ever reaches the page)."""
            import anyio

            def check() -> None:
                with self.backend.db.requests() as db:
                    _, principal = self.principal(request, db)
                    task = tasks.get_task_row(db, principal, task_id)
                    tasks.get_turn_row(db, task, turn_id)

            await anyio.to_thread.run_sync(check)
            raw = request.headers.get("Last-Event-ID") or last_event_id or "0"
            if not raw.isdigit() or len(raw) > 18:
                raise BadRequest("Last-Event-ID must be an event id from this stream")
            stream: AsyncIterator[bytes] = self.backend.events(turn_id, int(raw))
            return StreamingResponse(
                stream,
                media_type="text/event-stream; charset=utf-8",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        # -------------------------------------------------------------- environments

        @r.get("/environments")
        def environments_page(request: Request, db: DbDep) -> Response:
            sess, principal = self.principal(request, db)
            rows = envs.render_many(db, envs.list_rows(db, principal))
            return self.render(
                request,
                "environments.html",
                {"environments": [e.model_dump(mode="json") for e in rows]},
                sess=sess,
                principal=principal,
            )

        @r.get("/environments/new")
        def new_environment(request: Request, db: DbDep) -> Response:
            sess, principal = self.principal(request, db)
            return self._env_form(request, sess, principal, None, _env_values(None))

        @r.post("/environments")
        def create_environment(request: Request, db: DbDep, form: FormDep) -> Response:
            sess, principal = self.principal(request, db)
            values = _env_form_values(form)
            try:
                body = EnvironmentCreate.model_validate(_env_payload(values, None, form))
                row = envs.create(
                    db,
                    principal,
                    body,
                    self.backend.secret_box,
                    self.backend.settings,
                )
                gitcred_commands.check_remotes(
                    db, self.backend.settings, principal.account_id, row.body
                )
                db.commit()
            except (ServiceError, ValidationError, ValueError) as exc:
                db.rollback()
                return self._env_form(
                    request, sess, principal, None, values, error=_message(exc), status=400
                )
            return self.redirect(f"/environments/{quote(row.id)}?saved=1")

        @r.get("/environments/{env_id}")
        def environment_page(
            request: Request, env_id: str, db: DbDep, saved: str | None = None
        ) -> Response:
            sess, principal = self.principal(request, db)
            env = envs.render_many(db, [envs.get_row(db, principal, env_id)])[0]
            data = env.model_dump(mode="json")
            return self._env_form(
                request, sess, principal, data, _env_values(data), saved=saved == "1"
            )

        @r.post("/environments/{env_id}")
        def update_environment(request: Request, env_id: str, db: DbDep, form: FormDep) -> Response:
            sess, principal = self.principal(request, db)
            current = envs.render_many(db, [envs.get_row(db, principal, env_id)])[0]
            data = current.model_dump(mode="json")
            values = _env_form_values(form)
            try:
                body = EnvironmentUpdate.model_validate(_env_payload(values, data, form))
                updated = envs.update(
                    db,
                    principal,
                    env_id,
                    body,
                    self.backend.secret_box,
                    self.backend.settings,
                )
                if body.repos is not None:
                    gitcred_commands.check_remotes(
                        db, self.backend.settings, principal.account_id, updated.body
                    )
                db.commit()
            except (ServiceError, ValidationError, ValueError) as exc:
                db.rollback()
                return self._env_form(
                    request, sess, principal, data, values, error=_message(exc), status=400
                )
            self._drop_stale_setup_cache(env_id)
            return self.redirect(f"/environments/{quote(env_id)}?saved=1")

        @r.get("/environments/{env_id}/branches")
        def environment_branches(request: Request, env_id: str, db: DbDep) -> Response:
            """The repository's branches (JSON) for the composer's branch suggestions."""
            _, principal = self.principal(request, db)
            found = branch_commands.of_environment(db, self.backend.settings, principal, env_id)
            return self._headers(JSONResponse({"branches": found}))

        @r.post("/environments/{env_id}/reset-cache")
        def reset_cache(request: Request, env_id: str, db: DbDep, form: FormDep) -> Response:
            _, principal = self.principal(request, db)
            envs.reset_cache(db, principal, env_id)
            db.commit()
            self._drop_stale_setup_cache(env_id)
            return self.redirect(f"/environments/{quote(env_id)}?saved=1")

        @r.post("/environments/{env_id}/delete")
        def delete_environment(request: Request, env_id: str, db: DbDep, form: FormDep) -> Response:
            _, principal = self.principal(request, db)
            envs.delete(db, principal, env_id)
            db.commit()
            self._drop_stale_setup_cache(env_id)
            return self.redirect("/environments")

        @r.get("/usage")
        def usage_page(request: Request, db: DbDep) -> Response:
            sess, principal = self.principal(request, db)
            settings = self.backend.settings
            now = time.time()
            enabled = iter(usage.windows(db, settings, principal.account_id))
            windows: list[dict[str, Any]] = []
            for name, limit in (
                ("Primary", settings.rate_limit_primary),
                ("Secondary", settings.rate_limit_secondary),
            ):
                if limit <= 0:
                    windows.append({"name": name, "disabled": True})
                    continue
                w = next(enabled)
                windows.append(
                    {
                        "name": name,
                        "disabled": False,
                        "used": w.used,
                        "limit": w.limit,
                        "percent": w.used_percent,
                        "window": _duration(w.window_seconds),
                        "resets_in": _duration(w.reset_after),
                        "resets_at": views.iso(now + w.reset_after),
                        "resets_local": time.strftime(
                            "%Y-%m-%d %H:%M", time.localtime(now + w.reset_after)
                        ),
                    }
                )
            return self.render(
                request, "usage.html", {"windows": windows}, sess=sess, principal=principal
            )

    # ------------------------------------------------------------------ page builders

    def _login(
        self,
        request: Request,
        db: Session,
        sess: session.WebSession,
        *,
        next: str,
        error: str | None = None,
        status: int = 200,
    ) -> HTMLResponse:
        return self.render(
            request,
            "login.html",
            {
                "next": _safe_next(next),
                "error": error,
                "has_password": webauth.has_owner_password(db),
            },
            status=status,
            sess=sess,
        )

    def _page(
        self, db: Session, principal: Principal, tab: str, cursor: str | None
    ) -> dict[str, Any]:
        tab = tab if tab in ("current", "archived") else "current"
        page = tasks.list_tasks(
            db, principal, limit=PAGE_SIZE, task_filter=tab, environment_id=None, cursor=cursor
        )
        now = time.time()
        return {
            "tab": tab,
            "rows": [views.row(item, now) for item in page.items],
            "next_cursor": page.cursor,
        }

    def _tasks_page(
        self,
        request: Request,
        db: Session,
        sess: session.WebSession,
        principal: Principal,
        *,
        tab: str,
        cursor: str | None,
        error: str | None = None,
        values: dict[str, str] | None = None,
        status: int = 200,
    ) -> HTMLResponse:
        page = self._page(db, principal, tab, cursor)
        environments = [
            e.model_dump(mode="json") for e in envs.render_many(db, envs.list_rows(db, principal))
        ]
        # The composer starts on the environment of this user's latest task, not the first.
        last_env = db.scalar(
            select(m.Task.environment_id)
            .where(
                m.Task.account_id == principal.account_id,
                m.Task.user_id == principal.user_id,
                m.Task.environment_id.is_not(None),
            )
            .order_by(m.Task.created_at.desc(), m.Task.id.desc())
            .limit(1)
        )
        values = dict(values or {})
        if not values.get("environment_id") and last_env:
            values["environment_id"] = last_env
        return self.render(
            request,
            "tasks.html",
            {
                **page,
                "paged": cursor is not None,
                "environments": environments,
                "error": error,
                "values": values,
            },
            status=status,
            sess=sess,
            principal=principal,
        )

    def _task_page(
        self,
        request: Request,
        db: Session,
        sess: session.WebSession,
        principal: Principal,
        task_id: str,
        selected: str | None,
        *,
        error: str | None = None,
        values: dict[str, str] | None = None,
        status: int = 200,
    ) -> HTMLResponse:
        if tasks.get_task_row(db, principal, task_id).has_unread_turn:
            # Opening the task is reading it (as in Codex cloud): "Unread" clears.
            tasks.mark_read(db, principal, task_id)
            db.commit()
        details = tasks.details(db, principal, task_id, inline_diff=self._inline).model_dump(
            mode="json"
        )
        task = details["task"]
        exchanges = self._exchanges(db, principal, task_id, selected, details)
        last = exchanges[-1] if exchanges else None
        attempt = last.attempt if last else None
        diff = attempt.diff if attempt else None
        diff_text = str(diff.get("diff") or "") if diff else ""
        # A diff over WHAM_INLINE_DIFF_MAX_BYTES comes cut: the page shows the start and says
        # so, and offers the whole one as a download (never a partial patch to paste).
        diff_cut = None
        if attempt is not None and diff and diff.get("truncated"):
            diff_cut = {
                "shown": _size(len(diff_text.encode())),
                "total": _size(int(diff.get("diff_bytes") or 0)),
                "url": f"/tasks/{quote(task_id, safe='')}/turns/{quote(attempt.id, safe='')}/diff",
            }
        worklog: dict[str, Any] = {"messages": [], "logs": [], "hide_final": False}
        if attempt is not None and not attempt.active:
            worklog["hide_final"] = bool(attempt.final)
            worklog["messages"] = (attempt.turn.get("worklog") or {}).get("messages") or []
            worklog["logs"] = [
                entry.line for entry in logs.turn_logs(db, principal, task_id, attempt.id).logs
            ]
        repo_changes = _repo_changes(task_id, attempt.turn if attempt else {})
        diff_turn = details.get("current_diff_task_turn") or {}
        pushed = [
            pr.get("pull_request") or {}
            for pr in task.get("external_pull_requests") or []
            if isinstance(pr, dict)
        ]
        display = task.get("task_status_display") or {}
        return self.render(
            request,
            "task.html",
            {
                "task": task,
                "environment": display.get("environment_label") or "",
                "branch": display.get("branch_name") or "",
                "exchanges": exchanges,
                "attempt": attempt,
                "running": any(a.active for ex in exchanges[-1:] for a in ex.siblings),
                "diff": diffview.parse(diff_text) if diff_text or diff_cut else None,
                "diff_stats": diff,
                "diff_cut": diff_cut,
                "diff_text": diff_text,
                "repo_changes": repo_changes,
                "diff_title": _diff_title(attempt.turn if attempt else {}),
                "apply_command": _apply_command(task_id, diff_turn, last),
                "worklog": worklog,
                "setup_cache": _setup_cache(attempt.turn if attempt else {}),
                "network": [
                    e
                    for e in ((attempt.turn.get("proxy_events") or []) if attempt else [])
                    if isinstance(e, dict)
                ],
                "events_url": (
                    f"/tasks/{quote(task_id)}/events/{quote(attempt.id)}"
                    if attempt is not None and attempt.active
                    else ""
                ),
                "pushed": pushed,
                "error": error,
                "values": values or {},
                "heredoc": _heredoc_marker(diff_text),
            },
            status=status,
            sess=sess,
            principal=principal,
        )

    def _exchanges(
        self,
        db: Session,
        principal: Principal,
        task_id: str,
        selected: str | None,
        details: dict[str, Any] | None = None,
    ) -> list[views.Exchange]:
        """The conversation shown: the path to attempt ``selected`` (default: the current)."""
        if details is None:
            details = tasks.details(db, principal, task_id, inline_diff=self._inline).model_dump(
                mode="json"
            )
        mapping = tasks.turn_mapping(db, principal, task_id, inline_diff=self._inline).model_dump(
            mode="json"
        )["turn_mapping"]
        current = details.get("current_assistant_turn") or {}
        chosen = selected if selected and selected in mapping else current.get("id")
        if chosen and mapping.get(chosen, {}).get("turn", {}).get("role") != "assistant":
            chosen = current.get("id")
        return views.chain(mapping, chosen) if chosen else []

    def _env_form(
        self,
        request: Request,
        sess: session.WebSession,
        principal: Principal,
        env: dict[str, Any] | None,
        values: dict[str, Any],
        *,
        error: str | None = None,
        saved: bool = False,
        status: int = 200,
    ) -> HTMLResponse:
        return self.render(
            request,
            "environment.html",
            {"env": env, "values": values, "error": error, "saved": saved},
            status=status,
            sess=sess,
            principal=principal,
        )


# ---------------------------------------------------------------------- helpers


def _safe_next(target: str) -> str:
    """Only a path on this site (``/x``; not ``//host`` or ``/\\host``) may follow sign-in."""
    if not target.startswith("/") or target.startswith(("//", "/\\")) or "\n" in target:
        return "/"
    return target


def _message(exc: Exception) -> str:
    if isinstance(exc, ServiceError):
        return exc.detail
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return "; ".join(parts)
    return str(exc)


def _setup_cache(turn: dict[str, Any]) -> str:
    """What the post-setup cache did for the attempt, in a line ("" when it had no part)."""
    cache = turn.get("setup_cache")
    return SetupCache.model_validate(cache).summary() if isinstance(cache, dict) else ""


def _task_body(mode: dict[str, Any], prompt: str, attempts: str) -> dict[str, Any]:
    if not prompt.strip():
        raise BadRequest("Write a prompt first")
    if attempts not in ("1", "2", "3", "4"):
        raise BadRequest("Attempts must be 1 to 4")
    return {
        **mode,
        "input_items": [
            {
                "type": "message",
                "role": "user",
                "content": [{"content_type": "text", "text": prompt}],
            }
        ],
        "metadata": {"best_of_n": int(attempts)},
    }


def _diff_title(turn: dict[str, Any]) -> str:
    """ "Changes", or "Changes in <name>" for the first of several repositories."""
    env = turn.get("environment") or {}
    keys = [str(k) for k in env.get("repos") or []]
    if len(keys) < 2:
        return "Changes"
    return f"Changes in {((env.get('repo_map') or {}).get(keys[0]) or {}).get('name') or keys[0]}"


def _repo_changes(task_id: str, turn: dict[str, Any]) -> list[dict[str, Any]]:
    """The other repositories' diffs of a multi-repository attempt (``repo_diffs`` but the
    first repository's, which the page shows as the task's diff), each named by its
    directory in the workspace; a cut one links to its whole diff."""
    diffs = turn.get("repo_diffs") or {}
    env = turn.get("environment") or {}
    keys = [str(k) for k in env.get("repos") or []]
    out = []
    for i, key in enumerate(keys[1:], start=1):
        item = diffs.get(key)
        if not isinstance(item, dict) or not item.get("diff"):
            continue
        name = str(((env.get("repo_map") or {}).get(key) or {}).get("name") or key)
        text = str(item["diff"])
        cut = None
        if item.get("truncated"):
            url = f"/tasks/{quote(task_id, safe='')}/turns/{quote(str(turn.get('id')), safe='')}"
            cut = {
                "shown": _size(len(text.encode())),
                "total": _size(int(item.get("diff_bytes") or 0)),
                "url": f"{url}/diff?repo_id={quote(key, safe='')}",
            }
        out.append(
            {
                "id": f"diff-{i}",
                "name": name,
                "diff": diffview.parse(text),
                "stats": item,
                "cut": cut,
            }
        )
    return out


def _apply_command(task_id: str, diff_turn: dict[str, Any], shown: views.Exchange | None) -> str:
    """``wham task apply`` for the attempt shown, when the CLI can name it: its
    ``--attempt N`` counts the attempts of the turn that holds the task's current diff."""
    if shown is None or shown.attempt is None:
        return ""
    if not any(a.id == diff_turn.get("id") for a in shown.siblings):
        return ""
    number = shown.attempt.index + 1
    return f"wham task apply {task_id}" + (f" --attempt {number}" if number > 1 else "")


def _size(n: int) -> str:
    """``17.6 MB``: a byte count for people."""
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f} MB"
    return f"{max(1, round(n / 1000))} KB"


def _heredoc_marker(diff: str) -> str:
    """A heredoc delimiter that is no line of the diff."""
    marker = "WHAM_PATCH"
    lines = set(diff.splitlines())
    while marker in lines:
        marker = f"WHAM_PATCH_{secrets.token_hex(3).upper()}"
    return marker


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{round(seconds / 3600)} h"
    return f"{round(seconds / 86400)} days"


def _script_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def _env_values(env: dict[str, Any] | None) -> dict[str, Any]:
    """The environment form's fields, filled from an environment (or empty)."""
    if env is None:
        return {
            "label": "",
            "description": "",
            "repos": "",
            "default_branch": "",
            "setup": "",
            "maintenance_setup": "",
            "env_vars": "",
            "secret_names": [],
            "new_secrets": "",
            "network_mode": "off",
            "network_preset": "none",
            "network_domains": "",
            "network_safe": False,
            "cache_enabled": True,
            "mcp_servers": "",
        }
    repo_map = env.get("repo_map") or {}
    repos = [repo_map.get(k) or {} for k in env.get("repos") or []]
    net = env.get("agent_network_access") or {}
    return {
        "label": env.get("label") or "",
        "description": env.get("description") or "",
        "repos": "\n".join(str(r.get("clone_url") or "") for r in repos),
        "default_branch": (repos[0].get("default_branch") or "") if repos else "",
        "setup": _script_text(env.get("setup")),
        "maintenance_setup": _script_text(env.get("maintenance_setup")),
        "env_vars": "\n".join(f"{k}={v}" for k, v in (env.get("env_vars") or {}).items()),
        "secret_names": sorted((env.get("secrets") or {}).keys()),
        "new_secrets": "",
        "network_mode": net.get("mode") or "off",
        "network_preset": net.get("preset_allowlist") or "none",
        "network_domains": net.get("allowlist_domains") or "",
        "network_safe": bool(net.get("safe_methods_only")),
        "cache_enabled": bool((env.get("cache_settings") or {}).get("post_setup_cache_enabled")),
        "mcp_servers": _mcp_text(env.get("mcp_servers")),
    }


def _env_form_values(form: Form) -> dict[str, Any]:
    """What the user typed, to show again with an error (never the new secrets' values)."""
    return {
        "label": form.get("label"),
        "description": form.get("description"),
        "repos": form.get("repos"),
        "default_branch": form.get("default_branch").strip(),
        "setup": form.get("setup"),
        "maintenance_setup": form.get("maintenance_setup"),
        "env_vars": form.get("env_vars"),
        "secret_names": form.getlist("secret_name"),
        "new_secrets": "",
        "network_mode": form.get("network_mode", "off"),
        "network_preset": form.get("network_preset", "none"),
        "network_domains": form.get("network_domains"),
        "network_safe": form.checked("network_safe"),
        "cache_enabled": form.checked("cache_enabled"),
        "mcp_servers": form.get("mcp_servers"),
    }


def _mcp_text(servers: Any) -> str:
    """An environment's MCP servers as the form shows them: JSON without unset fields."""
    if not isinstance(servers, dict) or not servers:
        return ""
    unset: tuple[Any, ...] = (None, [], {}, False)
    shown = {
        name: {k: v for k, v in spec.items() if v not in unset}
        for name, spec in servers.items()
        if isinstance(spec, dict)
    }
    return json.dumps(shown, indent=2)


def _mcp_servers(text: str) -> Any:
    """The form's MCP servers: a JSON object (name → server), empty for none."""
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"MCP servers: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise BadRequest('MCP servers: a JSON object, e.g. {"docs": {"command": "..."}}')
    return value


def _env_payload(
    values: dict[str, Any], current: dict[str, Any] | None, form: Form
) -> dict[str, Any]:
    """The create/update body from the form. Secrets: new ``NAME=value`` lines are set,
    ticked names removed; existing values are never needed (or shown)."""
    urls = [line.strip() for line in str(values["repos"]).splitlines() if line.strip()]
    known: dict[str, str | None] = {}
    if current is not None:
        for key in current.get("repos") or []:
            info = (current.get("repo_map") or {}).get(key) or {}
            known[str(info.get("clone_url") or "")] = info.get("default_branch")
    repos: list[dict[str, Any]] = []
    for i, url in enumerate(urls):
        spec: dict[str, Any] = {"url": url}
        branch = values["default_branch"] if i == 0 else known.get(url)
        if branch:
            spec["default_branch"] = branch
        repos.append(RepoSpec.model_validate(spec).model_dump(exclude_none=True))
    new_secrets = views.parse_pairs(form.get("new_secrets"), "Secrets")
    payload: dict[str, Any] = {
        "label": str(values["label"]).strip(),
        "description": values["description"],
        "repos": repos,
        "setup": values["setup"] or None,
        "maintenance_setup": values["maintenance_setup"] or None,
        "env_vars": views.parse_pairs(str(values["env_vars"]), "Variables"),
        "agent_network_access": AgentNetworkAccess(
            mode=values["network_mode"],
            preset_allowlist=values["network_preset"],
            allowlist_domains=str(values["network_domains"]).strip(),
            safe_methods_only=bool(values["network_safe"]),
        ).model_dump(),
        "cache_settings": CacheSettings(
            post_setup_cache_enabled=bool(values["cache_enabled"])
        ).model_dump(exclude={"cache_invalidation_key"}),
    }
    payload["mcp_servers"] = _mcp_servers(str(values.get("mcp_servers") or ""))
    if current is None:
        payload["secrets"] = new_secrets
    else:
        changes: dict[str, str | None] = {name: None for name in form.getlist("remove_secret")}
        changes.update(new_secrets)
        payload["secrets"] = changes
    return payload
