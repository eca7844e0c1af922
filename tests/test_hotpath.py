"""Task details answered before FastAPI's routing (``server.hotpath``, issue 20).

What must hold: a details GET the route would answer 200 is answered by the middleware, with
the route's bytes and headers, without entering the app; everything else (other paths and
methods, the static ``tasks/list`` and ``tasks/rate_limit``, a missing or malformed bearer,
a refused read) reaches the app and is answered exactly as before."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from sqlalchemy import update

from conftest import Server
from openwham.server.app import PREFIXES
from openwham.server.hotpath import HotReads, details_pattern, list_paths, list_query
from openwham.server.routers.tasks import list_page, task_details
from openwham.store import models as m


def _call(
    mw: HotReads, method: str, path: str, headers: dict[str, str], query: str = ""
) -> tuple[int, bytes, dict[bytes, bytes]]:
    """One request through ``mw`` with an app behind it that answers 299 and says so."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(mw(scope, receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], body, dict(start["headers"])


async def _behind(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 299, "headers": []})
    await send({"type": "http.response.body", "body": b"app"})


@pytest.fixture
def hot(server: Server, repo: Path) -> tuple[Server, HotReads, str]:
    env = server.api.create_env(repo)
    task_id = server.api.create_task(env["id"])["task"]["id"]
    from openwham.server.app import create_app  # the app's own routes decide the pattern

    routes = create_app(server.app_state.settings, db=server.app_state.db).routes
    pattern = details_pattern(PREFIXES.values(), routes)
    mw = HotReads(_behind, server.app_state, pattern, list_paths(PREFIXES.values()))
    return server, mw, task_id


def test_details_are_answered_without_the_app_with_the_routes_bytes(
    hot: tuple[Server, HotReads, str],
) -> None:
    server, mw, task_id = hot
    auth = {"Authorization": f"Bearer {server.api.token}"}
    for prefix in PREFIXES.values():
        status, body, headers = _call(mw, "GET", f"{prefix}/tasks/{task_id}", auth)
        routed = server.api.styled(prefix).get(f"tasks/{task_id}")  # TestClient: the whole app
        assert (status, body) == (200, routed.content)
        assert headers[b"content-type"] == routed.headers["content-type"].encode()
        assert headers[b"content-length"] == routed.headers["content-length"].encode()
    # the scheme is case-insensitive, as FastAPI's HTTPBearer takes it
    lower = {"Authorization": f"bearer {server.api.token}"}
    assert _call(mw, "GET", f"{PREFIXES['codex']}/tasks/{task_id}", lower)[0] == 200


def test_everything_else_goes_to_the_app(hot: tuple[Server, HotReads, str]) -> None:
    server, mw, task_id = hot
    auth = {"Authorization": f"Bearer {server.api.token}"}
    wham = PREFIXES["wham"]
    for method, path, headers in [
        ("GET", f"{wham}/tasks/rate_limit", auth),
        ("GET", f"{wham}/tasks/{task_id}/turns", auth),
        ("GET", f"{wham}/tasks/{task_id}/", auth),
        ("GET", f"/other/tasks/{task_id}", auth),
        ("DELETE", f"{wham}/tasks/{task_id}", auth),
        ("HEAD", f"{wham}/tasks/{task_id}", auth),
        ("GET", f"{wham}/tasks/{task_id}", {}),  # no token: the route's 401
        ("GET", f"{wham}/tasks/{task_id}", {"Authorization": "Basic abc"}),
        ("GET", f"{wham}/tasks/{task_id}", {"Authorization": "Bearer"}),
        ("GET", f"{wham}/tasks/{task_id}", {"Authorization": "Bearer not-a-jwt"}),  # refused
        ("GET", f"{wham}/tasks/task_nope", auth),  # 404
        ("GET", f"{wham}/tasks/{task_id}", {**auth, "ChatGPT-Account-Id": "someone-else"}),
        (
            "GET",
            f"{wham}/tasks/{task_id}",
            {"Authorization": f"Bearer {server.other_account_token()}"},
        ),
    ]:
        assert _call(mw, method, path, headers)[:2] == (299, b"app"), (method, path, headers)


def test_a_revoked_token_reaches_the_route_at_once(hot: tuple[Server, HotReads, str]) -> None:
    """Nothing about the caller is kept between requests: the next request after a
    revocation is the route's 401."""
    server, mw, task_id = hot
    token = server.owner_token()
    path = f"{PREFIXES['wham']}/tasks/{task_id}"
    assert _call(mw, "GET", path, {"Authorization": f"Bearer {token}"})[0] == 200
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    with server.app_state.db.session() as s:  # as another node would: only the row changes
        s.execute(update(m.ApiToken).where(m.ApiToken.id == jti).values(revoked_at=time.time()))
    assert server.api.as_(token).get(f"tasks/{task_id}").status_code == 401
    assert _call(mw, "GET", path, {"Authorization": f"Bearer {token}"})[:2] == (299, b"app")


def test_the_app_answers_details_through_the_hot_path(
    server: Server, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The served app has the middleware in front of its routes: details reach
    ``task_details`` through it, not through the route's handler."""
    from openwham.server import hotpath

    calls: list[str] = []

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[3])
        return await task_details(*args, **kwargs)

    monkeypatch.setattr(hotpath, "task_details", counted)
    env = server.api.create_env(repo)
    task_id = server.api.create_task(env["id"])["task"]["id"]
    assert server.api.get(f"tasks/{task_id}").status_code == 200
    assert calls == [task_id]


def test_lists_are_answered_without_the_app_with_the_routes_bytes(
    hot: tuple[Server, HotReads, str], repo: Path
) -> None:
    server, mw, _ = hot
    auth = {"Authorization": f"Bearer {server.api.token}"}
    server.api.create_task(server.api.create_env(repo)["id"])
    first = server.api.get("tasks/list?limit=1").json()
    assert first["cursor"]
    for query in [
        "",
        "limit=100",
        "limit=1",
        "task_filter=all&limit=5",
        f"cursor={first['cursor']}",
    ]:
        for prefix in PREFIXES.values():
            status, body, headers = _call(mw, "GET", f"{prefix}/tasks/list", auth, query)
            routed = server.api.styled(prefix).get(f"tasks/list?{query}")
            assert (status, body) == (200, routed.content), query
            assert headers[b"content-type"] == routed.headers["content-type"].encode()


def test_list_queries_the_route_should_validate_go_to_the_app(
    hot: tuple[Server, HotReads, str],
) -> None:
    server, mw, _ = hot
    auth = {"Authorization": f"Bearer {server.api.token}"}
    path = f"{PREFIXES['wham']}/tasks/list"
    for query in [
        "limit=abc",
        "limit=",
        "limit=+5",
        "limit=%205",
        "limit=0",  # refused by the read: the route's 400
        "limit=1000",
        "limit=1&limit=2",
        "task_filter=nope",
        "task_filter=",
        "other=1",
        "cursor=garbage",
        "limit=%ff",
    ]:
        assert _call(mw, "GET", path, auth, query)[:2] == (299, b"app"), query
        assert list_query(query.encode()) is None or query in {
            "limit=0",
            "limit=1000",
            "task_filter=nope",
            "cursor=garbage",
        }, query
    for headers in [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer not-a-jwt"}]:
        assert _call(mw, "GET", path, headers)[:2] == (299, b"app"), headers


def test_a_revoked_token_lists_nothing_at_once(hot: tuple[Server, HotReads, str]) -> None:
    server, mw, _ = hot
    token = server.owner_token()
    path = f"{PREFIXES['wham']}/tasks/list"
    assert _call(mw, "GET", path, {"Authorization": f"Bearer {token}"})[0] == 200
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    with server.app_state.db.session() as s:
        s.execute(update(m.ApiToken).where(m.ApiToken.id == jti).values(revoked_at=time.time()))
    assert server.api.as_(token).get("tasks/list").status_code == 401
    assert _call(mw, "GET", path, {"Authorization": f"Bearer {token}"})[:2] == (299, b"app")


def test_the_app_answers_lists_through_the_hot_path(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openwham.server import hotpath

    calls: list[dict[str, Any]] = []

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return await list_page(*args, **kwargs)

    monkeypatch.setattr(hotpath, "list_page", counted)
    assert server.api.get("tasks/list?limit=7&task_filter=all").status_code == 200
    assert server.api.get("tasks/list?limit=x").status_code == 400  # the app validates it
    assert calls == [{"limit": 7, "task_filter": "all", "environment_id": None, "cursor": None}]


def test_one_statement_reads_refuse_exactly_as_the_full_check(
    hot: tuple[Server, HotReads, str],
) -> None:
    """Details and lists read the token's row in the data's own statement
    (``accounts.principal_cte``); whatever that row does not let through goes to the full
    check, so the answer is the one it always was: its status, its message, and the token
    checked before the query (a bad ``limit`` or an overlong task id with a revoked token is
    401, not 400 or 404)."""
    server, _mw, task_id = hot
    long_id = "t" * 201

    def answers(token: str, **headers: str) -> list[tuple[int, str]]:
        api = server.api.as_(token)
        got = []
        for path, params in (
            (f"tasks/{task_id}", {}),
            (f"tasks/{long_id}", {}),
            ("tasks/list", {}),
            ("tasks/list", {"limit": "0"}),
            ("tasks/list", {"limit": "100"}),
        ):
            r = api.get(path, params=params, headers=headers)
            got.append((r.status_code, r.json().get("detail", "") if r.status_code != 200 else ""))
        return got

    token = server.owner_token()
    assert [s for s, _ in answers(token)] == [200, 404, 200, 400, 200]
    other = "acct_" + "0" * 24
    refused = answers(token, **{"ChatGPT-Account-Id": other})
    assert {s for s, _ in refused} == {403}, refused
    assert all("not an account of this user" in d for _, d in refused), refused

    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    with server.app_state.db.session() as s:  # the row says expired, the JWT does not
        s.execute(update(m.ApiToken).where(m.ApiToken.id == jti).values(expires_at=time.time()))
    expired = answers(token)
    assert {s for s, _ in expired} == {401} and all("expired" in d for _, d in expired), expired

    token = server.owner_token()
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    with server.app_state.db.session() as s:
        s.execute(update(m.ApiToken).where(m.ApiToken.id == jti).values(revoked_at=time.time()))
    revoked = answers(token)
    assert {s for s, _ in revoked} == {401} and all("revoked" in d for _, d in revoked), revoked
