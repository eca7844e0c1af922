"""The ASGI app: every WHAM route under ``/backend-api/wham`` and ``/api/codex``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.types import Receive, Scope, Send

from openwham import __version__
from openwham.config import Settings
from openwham.service.accounts import ensure_owner_committed
from openwham.store.db import Database
from openwham.wire import (
    CreateTaskRequest,
    DatabaseHealth,
    ErrorBody,
    Health,
    HealthStatus,
    RequestLoad,
)

from . import errors
from .admission import AdmissionGate, Gate
from .direct import SERVER_SEND
from .health import HealthProbe
from .hotpath import HotReads, details_pattern, list_paths
from .limits import BodySizeLimit
from .routers import account, environments, forges, gitcreds, github, stream, tasks, tokens
from .state import AppState
from .webui import mount as mount_web_ui

PREFIXES = {"wham": "/backend-api/wham", "codex": "/api/codex"}


def api_router() -> APIRouter:
    router = APIRouter()
    subs = (tasks, stream, environments, github, forges, gitcreds, account, tokens)
    for sub in (module.router for module in subs):
        router.include_router(sub)
    return router


def _unique_id(style: str) -> Any:
    def make(route: APIRoute) -> str:
        return f"{style}_{route.name}"

    return make


def _declare_errors(schema: dict[str, Any]) -> None:
    """The error answers every API operation can give, in place of FastAPI's 422 (which this
    app never sends: bad input is a 400, ``errors.install``); 503 is the admission gate's
    (overload). Routes declare their own others (409, 429, 502) with ``errors.error_responses``."""
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith(tuple(PREFIXES.values())):
            continue
        for method, operation in operations.items():
            codes = [400, 401, 403, 503]
            if "{" in path:
                codes.append(404)
            if method != "get":
                codes.append(413)
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for code in codes:
                responses.setdefault(
                    str(code), {"description": errors.ERROR_MEANINGS[code], "content": body}
                )


def _one_of_as_any_of(node: Any) -> None:
    """``oneOf`` without a ``discriminator`` becomes ``anyOf``, in place. Pydantic writes
    ``oneOf`` for unions whose member a callable discriminator picks by tag, but the members
    overlap (``UnknownObject`` takes any object, a user turn fits the assistant turn's lenient
    shape), so a real answer matches more than one and ``oneOf`` would call it invalid."""
    if isinstance(node, dict):
        if "oneOf" in node and "discriminator" not in node:
            node["anyOf"] = node.pop("oneOf")
        for value in node.values():
            _one_of_as_any_of(value)
    elif isinstance(node, list):
        for value in node:
            _one_of_as_any_of(value)


class App(FastAPI):
    """The app, handing the server's own ``send`` to the turn streams (``server/direct.py``)
    before any middleware wraps it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, *, db: Database | None = None) -> FastAPI:
    """Open (and migrate) the store, make sure the owner exists, and wire up the routes."""
    settings = settings or Settings()
    state = AppState.open(settings, db)
    ensure_owner_committed(state.db, plan_type=settings.plan_type)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """Start the runner (gateway, executor) with the server and stop it on shutdown:
        running attempts go back to pending and resume on the next start."""
        runner = state.runner
        if runner is not None:
            await anyio.to_thread.run_sync(runner.start)
        try:
            yield
        finally:
            if runner is not None:
                await anyio.to_thread.run_sync(runner.stop)
            await anyio.to_thread.run_sync(state.bus.close)  # after the runner's last publish

    app = App(
        lifespan=lifespan,
        title="openwham",
        version=__version__,
        description="Self-hosted Codex cloud: the WHAM task API. See docs/api.md.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.wham = state
    errors.install(app)
    # The gate inside the body limit: a slow upload is read before the request takes a slot.
    gate = Gate(state.db.request_pool, settings.request_queue, settings.request_queue_seconds)
    router = api_router()
    for style, prefix in PREFIXES.items():
        app.include_router(router, prefix=prefix, generate_unique_id_function=_unique_id(style))
    # Innermost first: task details and lists answered before routing, inside the gate and
    # the body limit.
    app.add_middleware(
        HotReads,
        state=state,
        pattern=details_pattern(PREFIXES.values(), app.routes),
        lists=list_paths(PREFIXES.values()),
    )
    app.add_middleware(AdmissionGate, gate=gate)
    app.add_middleware(BodySizeLimit)

    probe = HealthProbe(state.db)

    @app.get(
        "/healthz",
        tags=["meta"],
        response_model=Health,
        responses={503: {"model": Health, "description": "The database does not answer"}},
    )
    async def healthz() -> JSONResponse:
        """Liveness and the database: 200 ``ok``, or 503 ``degraded`` when the database did
        not answer within 2 s. Overload does not make it fail (``requests`` shows the load)."""
        db_ok = await probe.database_ok()
        load = gate.stats()
        health = Health(
            status=HealthStatus.OK if db_ok else HealthStatus.DEGRADED,
            version=__version__,
            database=DatabaseHealth.OK if db_ok else DatabaseHealth.UNAVAILABLE,
            requests=RequestLoad(
                capacity=load.capacity,
                queue=load.queue,
                active=load.active,
                waiting=load.waiting,
                refused=load.refused,
            ),
        )
        return JSONResponse(health.model_dump(mode="json"), status_code=200 if db_ok else 503)

    mount_web_ui(app, state)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        extra = CreateTaskRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(extra.pop("$defs", {}))
        components["CreateTaskRequest"] = extra
        components["ErrorBody"] = ErrorBody.model_json_schema()
        _declare_errors(schema)
        _one_of_as_any_of(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
