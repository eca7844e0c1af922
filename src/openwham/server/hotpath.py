"""Task details and ``tasks/list`` without FastAPI's routing and dependency solving (issue 20).

``GET …/tasks/{task_id}`` is the request a team's clients repeat most (``codex cloud``
polls it, the web UI reloads it). Its work in the worker thread is ~0.4 ms; finding the
route among ~150 and solving its dependencies on the event loop cost almost as much again,
and the loop and the threads share one GIL. This ASGI middleware answers it directly with
the route's own code (``routers.tasks.task_details``) when the request is one the route
would answer 200: a ``GET`` of exactly that path with a bearer token. Anything else, and
any request the read refuses (401, 403, 404, an error), goes on to the app, which answers
it as before (a refused read is thus done twice; refusals are rare and cheap). The route
stays in the app: the OpenAPI document and the fallback are the route itself.

``GET …/tasks/list`` (the list ``codex cloud`` and the web UI poll) is answered the same way
with the route's own code (``routers.tasks.list_page``) when its query string holds only the
route's parameters, each once, non-empty, ``limit`` in plain digits; any other query goes to
the app, whose validation answers it as before.

It sits inside the admission gate and the body limit, so both still apply.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from .routers.tasks import list_page, task_details
from .state import AppState


def details_pattern(prefixes: Iterable[str], routes: Iterable[object]) -> re.Pattern[str]:
    """The paths the details route answers: ``{prefix}/tasks/{task_id}`` for a ``task_id``
    no earlier route of one segment claims (``tasks/list``, ``tasks/rate_limit``)."""
    taken = set()
    for route in _flat(routes):
        path = getattr(route, "path", "")
        if "GET" in (getattr(route, "methods", None) or ()) and "{" not in path:
            taken.add(path)
    alternatives = "|".join(re.escape(p) for p in prefixes)
    statics = {
        t.rsplit("/", 1)[1] for t in taken if re.fullmatch(f"(?:{alternatives})/tasks/[^/]+", t)
    }
    exclude = "".join(f"(?!{re.escape(s)}$)" for s in sorted(statics))
    return re.compile(f"(?:{alternatives})/tasks/{exclude}(?P<task_id>[^/]+)")


def _flat(routes: Iterable[object], prefix: str = "") -> Iterator[object]:
    """Every route with its whole path: FastAPI keeps an included router as one entry
    (``original_router`` and the prefix it was included under)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is None:
            yield route if not prefix else _Prefixed(prefix + getattr(route, "path", ""), route)
            continue
        context = getattr(route, "include_context", None)
        yield from _flat(inner.routes, prefix + str(getattr(context, "prefix", "") or ""))


class _Prefixed:
    def __init__(self, path: str, route: object) -> None:
        self.path = path
        self.methods = getattr(route, "methods", None)


def _bearer(authorization: str | None) -> str | None:
    """The token as FastAPI's ``HTTPBearer`` takes it, or None where it would give none."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if not scheme or not token or scheme.lower() != "bearer":
        return None
    return token


# The query parameters of ``tasks/list`` (``routers.tasks.ListQuery``).
LIST_PARAMETERS = frozenset({"limit", "task_filter", "environment_id", "cursor"})


def list_query(query_string: bytes) -> dict[str, str] | None:
    """``tasks/list``'s parameters from a query string the route would take as they are, or
    None for anything its validation should see (unknown, repeated or empty parameters, a
    ``limit`` not in plain digits, bad encoding)."""
    try:
        pairs = parse_qsl(query_string.decode("ascii"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return None
    query = dict(pairs)
    if len(query) != len(pairs) or not query.keys() <= LIST_PARAMETERS:
        return None
    if not all(query.values()):
        return None
    limit = query.get("limit")
    if limit is not None and not (limit.isascii() and limit.isdigit() and len(limit) <= 3):
        return None
    return query


class HotReads:
    """ASGI middleware: task details and ``tasks/list`` answered before routing (see the
    module's docstring). ``lists``: the paths of ``tasks/list`` under every prefix."""

    def __init__(
        self,
        app: ASGIApp,
        state: AppState,
        pattern: re.Pattern[str],
        lists: Collection[str] = (),
    ) -> None:
        self.app = app
        self.state = state
        self.pattern = pattern
        self.lists = frozenset(lists)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        if scope["path"] in self.lists:
            await self._list(scope, receive, send)
            return
        matched = self.pattern.fullmatch(scope["path"])
        if matched is None:
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # the first of a repeated header, as Starlette
        token = _bearer(_text(headers.get(b"authorization")))
        if token is None:
            await self.app(scope, receive, send)
            return
        account = headers.get(b"chatgpt-account-id")
        try:
            response = await task_details(
                self.state,
                token,
                None if account is None else _text(account),
                matched["task_id"],
                user_agent=_text(headers.get(b"user-agent")) or "",
                originator=b"originator" in headers,
            )
        except Exception:  # refused or failed: the route answers it, as it always did
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    async def _list(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = list_query(scope["query_string"])
        token = None
        account = None
        for name, value in scope["headers"]:
            if name == b"authorization" and token is None:
                token = _bearer(_text(value)) or ""
            elif name == b"chatgpt-account-id" and account is None:
                account = _text(value)
        if query is None or not token:
            await self.app(scope, receive, send)
            return
        limit = query.get("limit")
        try:
            response = await list_page(
                self.state,
                token,
                account,
                limit=None if limit is None else int(limit),
                task_filter=query.get("task_filter"),
                environment_id=query.get("environment_id"),
                cursor=query.get("cursor"),
            )
        except Exception:  # refused or failed: the route answers it, as it always did
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def list_paths(prefixes: Iterable[str]) -> frozenset[str]:
    """``tasks/list`` under every prefix."""
    return frozenset(f"{prefix}/tasks/list" for prefix in prefixes)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
