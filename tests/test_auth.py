"""Authentication and account isolation on every route of the app.

The auth matrix of the issue: no token, bad tokens (malformed, wrong signature, expired,
revoked, without a token row, user gone) → 401; a ``ChatGPT-Account-Id`` the user is no member
of → one 403 whether the account exists or not; another account's task, turn and environment
ids → the same 404 as an id that never existed, on every route, changing nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy import select

from conftest import PREFIXES, Api, Server, finish_turn, make_repo, make_server
from openwham import ids
from openwham.server.app import api_router
from openwham.service.accounts import (
    AUTH_CLAIM,
    ISSUER,
    create_account,
    create_api_token,
    ensure_owner,
    issue_token,
)
from openwham.store import models as m
from openwham.store.models import Base


def api_routes(routes: Any, *, without: str | None = None) -> set[tuple[str, str]]:
    """(method, path) of every APIRoute, including those of included routers (``without``
    the routes whose handlers live in that package)."""
    return {
        (method, str(ctx.path))
        for ctx in iter_route_contexts(routes)
        if isinstance(ctx.original_route, APIRoute)
        and not (without and ctx.original_route.endpoint.__module__.startswith(without + "."))
        for method in ctx.methods or ()
    }


WEB_ROUTES = "openwham.web"
# (method, path template without prefix) of every API route, known without starting a server.
ROUTES = sorted(api_routes(api_router().routes))
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/tasks"): {"input_items": []},
    ("POST", "/environments"): {"label": "x", "repos": ["/nonexistent"]},
    ("PATCH", "/environments/{env_id}"): {"label": "renamed"},
    ("POST", "/forge_connections"): {"kind": "github", "token": "t0k3n"},
    ("POST", "/git_credentials"): {
        "url_prefix": "https://git.example.com/",
        "username": "u",
        "secret": "s3cr3t",
    },
    ("PATCH", "/settings/user"): {"git_diff_mode": "unified"},
    ("POST", "/tokens"): {"name": "from the route matrix"},
}
# Bookkeeping that a good token's request may write (at most once a minute per token).
NOT_COMPARED = {("api_tokens", "last_used_at")}


def db_rows(server: Server) -> dict[str, list[str]]:
    """Every row of every table, as sorted reprs: equal snapshots mean nothing changed
    (``NOT_COMPARED`` columns left out)."""
    with server.app_state.db.session() as s:
        return {
            t.name: sorted(
                repr(tuple(r))
                for r in s.execute(
                    select(*(c for c in t.columns if (t.name, c.name) not in NOT_COMPARED))
                )
            )
            for t in Base.metadata.sorted_tables
        }


@dataclass
class World:
    """An owner and a second account, each with an environment and a task (two attempts)."""

    server: Server
    owner: Api
    other: Api
    env: str
    task: str
    turn: str
    user_turn: str
    other_env: str
    other_task: str
    other_turn: str
    other_account: str
    repo_id: str = ""  # the owner's environment's repository (github/… routes)
    installation_id: str = ""

    def fill(self, path: str, **over: str) -> str:
        values = {
            "task_id": self.task,
            "turn_id": self.turn,
            "env_id": self.env,
            "provider": "github",
            "owner": "acme",
            "repo": "widgets",
            "token_id": "tok_" + "0" * 32,
            "repo_id": self.repo_id,
            "installation_id": self.installation_id,
            "connection_id": "0" * 32,
            "credential_id": "0" * 32,
            **over,
        }
        return path.format(**values)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("auth")
    repo = make_repo(tmp / "widgets")
    # the second account's local repository must be inside WHAM_LOCAL_REPO_ROOTS
    gen = make_server(tmp, f"sqlite:///{tmp / 'data' / 'openwham.db'}", local_repo_roots=str(tmp))
    server = next(gen)
    try:
        owner = server.api
        other = owner.as_(server.other_account_token())
        made = owner.create_env(repo)
        env = made["id"]
        created = owner.create_task(env, metadata={"best_of_n": 2})
        other_env = other.create_env(repo, label="theirs")["id"]
        theirs = other.create_task(other_env, metadata={"best_of_n": 2})
        for t in (created["turn"]["id"], theirs["turn"]["id"]):
            finish_turn(server, t)
        other_account = other.get("accounts/check").json()["default_account_id"]
        yield World(
            server=server,
            owner=owner,
            other=other,
            env=env,
            task=created["task"]["id"],
            turn=created["turn"]["id"],
            user_turn=created["user_turn"]["id"],
            other_env=other_env,
            other_task=theirs["task"]["id"],
            other_turn=theirs["turn"]["id"],
            other_account=other_account,
            repo_id=made["repos"][0],
            installation_id=owner.get("github/installations").json()["installations"][0]["id"],
        )
    finally:
        gen.close()


def call(
    api: Api, world: World, method: str, path: str, fill: dict[str, str] | None = None, **kw: Any
) -> httpx.Response:
    """``method path`` with its path parameters filled in and a plausible body."""
    body = BODIES.get((method, path))
    if body is not None:
        kw["json"] = body
    if (method, path) == ("POST", "/tasks/{task_id}/fork"):  # the finished attempt
        kw["json"] = {"turn_id": world.fill("{turn_id}", **(fill or {}))}
    return api.request(method, world.fill(path, **(fill or {})), **kw)


def test_route_table_is_every_app_route(world: World) -> None:
    app = world.owner.client.app  # type: ignore[attr-defined]
    # The web UI's pages sign in with a session cookie (tests/test_web_ui.py), not a token.
    served = api_routes(app.routes, without=WEB_ROUTES)
    assert api_routes(app.routes) - served, "the web UI is mounted"
    expected = {(method, prefix + path) for method, path in ROUTES for prefix in PREFIXES}
    assert served - {("GET", "/healthz")} == expected
    assert len(ROUTES) >= 30


def test_owner_token_reaches_every_route(world: World) -> None:
    """Control for the tests below: with a good token every filled-in route answers."""
    wrong = []
    for prefix in PREFIXES:
        api = world.owner.styled(prefix)
        for method, path in ROUTES:
            if method == "DELETE":
                continue
            r = call(api, world, method, path)
            expected = (
                400 if (method, path) in {("POST", "/tasks"), ("POST", "/environments")} else 200
            )
            if (method, path) in {
                ("POST", "/tokens"),
                ("POST", "/forge_connections"),
                ("POST", "/git_credentials"),
            }:
                expected = 201
            # past auth, the route's own check answers: the finished attempt has no change
            if path == "/tasks/{task_id}/turns/{turn_id}/pr":
                expected = 409
            if path == "/tasks/{task_id}/turns/{turn_id}/diff":
                expected = 404
            if r.status_code != expected:
                wrong.append(f"{method} {prefix}{path}: {r.status_code} {r.text[:200]}")
    assert wrong == []


# --------------------------------------------------------------------------- bad tokens


def _claims(user_id: str, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "sub": user_id, "iat": now, "exp": now + 3600, **over}


def _bad_authorization(world: World, kind: str) -> str | None:
    """The Authorization header value of one kind of bad credential (None: no header)."""
    state = world.server.app_state
    key = state.signing_key
    with state.db.session() as s:
        account, user = ensure_owner(s)
        if kind == "none":
            return None
        if kind == "empty_bearer":
            return "Bearer "
        if kind == "basic_scheme":
            return "Basic dXNlcjpwYXNz"
        if kind == "bare_token":  # a valid token without the Bearer scheme
            return issue_token(key, user, account, ttl_seconds=3600)
        if kind == "garbage":
            return "Bearer not-a-jwt"
        if kind == "three_dots":
            return "Bearer a.b.c"
        if kind == "truncated":
            return "Bearer " + issue_token(key, user, account, ttl_seconds=3600)[:-5]
        if kind == "wrong_signature":
            return "Bearer " + issue_token(b"k" * 64, user, account, ttl_seconds=3600)
        if kind == "expired":
            past = time.time() - 7200
            return "Bearer " + issue_token(key, user, account, ttl_seconds=60, now=past)
        if kind == "alg_none":
            return "Bearer " + jwt.encode(_claims(user.id), None, algorithm="none")
        if kind == "alg_hs512":
            return "Bearer " + jwt.encode(_claims(user.id), key, algorithm="HS512")
        if kind == "wrong_issuer":
            return "Bearer " + jwt.encode(_claims(user.id, iss="chatgpt"), key, algorithm="HS256")
        if kind == "no_exp":
            claims = _claims(user.id)
            del claims["exp"]
            return "Bearer " + jwt.encode(claims, key, algorithm="HS256")
        if kind == "not_yet_valid":
            claims = _claims(user.id, nbf=int(time.time()) + 3600)
            return "Bearer " + jwt.encode(claims, key, algorithm="HS256")
        if kind == "sub_not_string":
            return "Bearer " + jwt.encode(_claims(user.id, sub=12345), key, algorithm="HS256")
        if kind == "sub_unknown":
            return "Bearer " + jwt.encode(_claims(ids.new_user_id()), key, algorithm="HS256")
        if kind == "sub_huge":
            return "Bearer " + jwt.encode(_claims("u" * 5000), key, algorithm="HS256")
        if kind == "auth_claim_only":  # right claims shape, no subject
            claims = _claims(user.id, **{AUTH_CLAIM: {"chatgpt_account_id": account.id}})
            del claims["sub"]
            return "Bearer " + jwt.encode(claims, key, algorithm="HS256")
        if kind == "no_row":  # signed by the server, but no api_tokens row (an old token)
            return "Bearer " + issue_token(key, user, account, ttl_seconds=3600)
        if kind == "revoked":
            row, token = create_api_token(s, key, user, account, ttl_seconds=3600)
            row.revoked_at = time.time()
            return "Bearer " + token
        if kind == "deleted_user":
            gone_account, gone = create_account(s, name="Gone", email=f"{uuid.uuid4().hex}@x.io")
            token = issue_token(key, gone, gone_account, ttl_seconds=3600)
            s.delete(gone)
            return "Bearer " + token
    raise AssertionError(kind)


BAD_TOKENS = [
    "none",
    "empty_bearer",
    "basic_scheme",
    "bare_token",
    "garbage",
    "three_dots",
    "truncated",
    "wrong_signature",
    "expired",
    "alg_none",
    "alg_hs512",
    "wrong_issuer",
    "no_exp",
    "not_yet_valid",
    "sub_not_string",
    "sub_unknown",
    "sub_huge",
    "auth_claim_only",
    "no_row",
    "revoked",
    "deleted_user",
]


@pytest.mark.parametrize("kind", BAD_TOKENS)
def test_bad_credentials_get_401_on_every_route(world: World, kind: str) -> None:
    header = _bad_authorization(world, kind)
    anon = world.owner.as_(None)
    headers = {"Authorization": header} if header is not None else {}
    before = db_rows(world.server)
    wrong: list[str] = []
    for prefix in PREFIXES:
        api = anon.styled(prefix)
        for method, path in ROUTES:
            r = call(api, world, method, path, headers=headers)
            body = r.json() if r.headers.get("content-type") == "application/json" else None
            ok = (
                r.status_code == 401
                and isinstance(body, dict)
                and isinstance(body.get("detail"), str)
                and body["detail"]
                and r.headers.get("www-authenticate") == "Bearer"
            )
            if not ok:
                wrong.append(f"{method} {prefix}{path}: {r.status_code} {r.text[:200]}")
    assert wrong == []
    assert db_rows(world.server) == before


def test_expired_token_says_so(world: World) -> None:
    r = world.owner.as_(None).get(
        "tasks/list", headers={"Authorization": _bad_authorization(world, "expired") or ""}
    )
    assert r.status_code == 401
    assert "expired" in r.json()["detail"].lower()


def test_no_auth_needed_for_health_and_openapi(world: World) -> None:
    client = world.owner.client
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert "/backend-api/wham/tasks/list" in paths and "/api/codex/tasks/list" in paths


# --------------------------------------------------------------------------- account header


ODD_ACCOUNT_IDS = [
    "foreign",
    "random",
    "x" * 5000,
    "'; DROP TABLE accounts; --",
    "%00",
    "../../etc/passwd",
]


def test_foreign_account_header_is_one_403_everywhere(world: World) -> None:
    """An existing foreign account and a made-up id get the very same answer."""
    before = db_rows(world.server)
    seen: dict[str, set[str]] = {}
    for prefix in PREFIXES:
        api = world.owner.styled(prefix)
        for method, path in ROUTES:
            for value in ODD_ACCOUNT_IDS:
                account = {"foreign": world.other_account, "random": ids.new_account_id()}.get(
                    value, value
                )
                r = call(api, world, method, path, headers={"ChatGPT-Account-Id": account})
                key = f"{r.status_code} {r.text}"
                seen.setdefault(key, set()).add(f"{method} {prefix}{path} {value[:20]}")
    assert len(seen) == 1, sorted(seen)
    only = next(iter(seen))
    assert only.startswith("403 ")
    assert world.other_account not in only
    assert db_rows(world.server) == before


def test_header_picks_account_and_default_is_first(server: Server, repo: Path) -> None:
    state = server.app_state
    with state.db.session() as s:
        personal, user = ensure_owner(s)
        team, same_user = create_account(s, name="Team", email=user.email)
        assert same_user.id == user.id
        personal_id, team_id = personal.id, team.id
    api = server.api
    as_team = Api(api.client, api.token, api.prefix, {"ChatGPT-Account-Id": team_id})
    as_personal = Api(api.client, api.token, api.prefix, {"ChatGPT-Account-Id": personal_id})

    check = api.get("accounts/check").json()
    assert check["default_account_id"] == personal_id
    assert check["account_ordering"] == [personal_id, team_id]
    assert as_team.get("accounts/check").json()["default_account_id"] == team_id

    team_env = as_team.create_env(repo, label="team env")["id"]
    personal_env = api.create_env(repo, label="personal env")["id"]
    assert [e["id"] for e in api.get("environments").json()] == [personal_env]
    assert [e["id"] for e in as_personal.get("environments").json()] == [personal_env]
    assert [e["id"] for e in as_team.get("environments").json()] == [team_env]
    assert api.get(f"environments/{team_env}").status_code == 404
    assert as_team.get(f"environments/{personal_env}").status_code == 404

    team_task = as_team.create_task(team_env)["task"]["id"]
    personal_task = api.create_task(personal_env)["task"]["id"]
    assert [t["id"] for t in api.get("tasks/list").json()["items"]] == [personal_task]
    assert [t["id"] for t in as_team.get("tasks/list").json()["items"]] == [team_task]
    assert api.get(f"tasks/{team_task}").status_code == 404
    # A task can only start in an environment of the account it is created in.
    r = as_team.post(
        "tasks",
        json={
            "new_task": {"environment_id": personal_env},
            "input_items": [
                {"type": "message", "content": [{"content_type": "text", "text": "x"}]}
            ],
        },
    )
    assert r.status_code == 404, r.text
    with state.db.session() as s:
        task = s.get(m.Task, team_task)
        assert task is not None and task.account_id == team_id
        assert task.user_id == user.id


# --------------------------------------------------------------------------- foreign ids


def _id_routes() -> list[tuple[str, str]]:
    return [(method, path) for method, path in ROUTES if "{task_id}" in path or "{env_id}" in path]


def test_foreign_ids_are_404_like_unknown_ids_and_change_nothing(world: World) -> None:
    before = db_rows(world.server)
    theirs_before = {
        "task": world.other.get(f"tasks/{world.other_task}").json(),
        "turns": world.other.get(f"tasks/{world.other_task}/turns").json(),
        "env": world.other.get(f"environments/{world.other_env}").json(),
    }
    wrong: list[str] = []
    checked = 0
    unknown_task = ids.new_task_id()
    for prefix in PREFIXES:
        api = world.owner.styled(prefix)
        for method, path in _id_routes():
            pairs: list[tuple[dict[str, str], dict[str, str]]] = []
            if "{env_id}" in path:
                pairs.append(({"env_id": world.other_env}, {"env_id": ids.new_environment_id()}))
            if "{task_id}" in path:
                pairs.append(
                    (
                        {"task_id": world.other_task, "turn_id": world.other_turn},
                        {
                            "task_id": unknown_task,
                            "turn_id": ids.new_assistant_turn_id(unknown_task),
                        },
                    )
                )
            if "{turn_id}" in path:
                pairs.append(
                    (
                        {"turn_id": world.other_turn},
                        {"turn_id": ids.new_assistant_turn_id(world.task)},
                    )
                )
                # another account's turn id grafted onto its own task id is no better
                pairs.append(
                    (
                        {"turn_id": world.other_task + "~assttrn_e_" + "0" * 32},
                        {"turn_id": world.task + "~assttrn_e_" + "0" * 32},
                    )
                )
            for foreign, unknown in pairs:
                a = call(api, world, method, path, foreign)
                b = call(api, world, method, path, unknown)
                checked += 1
                if a.status_code != 404 or (a.status_code, a.json()) != (b.status_code, b.json()):
                    wrong.append(f"{method} {prefix}{path} {foreign}: {a.status_code} {a.text}")
                elif world.other_task in a.text or world.other_env in a.text:
                    wrong.append(f"{method} {prefix}{path}: body names the foreign id")
    assert wrong == []
    assert checked >= 30
    assert db_rows(world.server) == before
    assert world.other.get(f"tasks/{world.other_task}").json() == theirs_before["task"]
    assert world.other.get(f"tasks/{world.other_task}/turns").json() == theirs_before["turns"]
    assert world.other.get(f"environments/{world.other_env}").json() == theirs_before["env"]


def _message(text: str = "do it") -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"content_type": "text", "text": text}]}


def test_tasks_cannot_use_foreign_environments_or_tasks(world: World) -> None:
    before = db_rows(world.server)
    unknown_task = ids.new_task_id()
    pairs = [
        (
            {"new_task": {"environment_id": world.other_env}},
            {"new_task": {"environment_id": ids.new_environment_id()}},
        ),
        (
            {"follow_up": {"task_id": world.other_task, "turn_id": world.other_turn}},
            {"follow_up": {"task_id": unknown_task, "turn_id": unknown_task + "~assttrn_e_1"}},
        ),
        (
            {"follow_up": {"task_id": world.task, "turn_id": world.other_turn}},
            {"follow_up": {"task_id": world.task, "turn_id": world.task + "~assttrn_e_1"}},
        ),
    ]
    for prefix in PREFIXES:
        api = world.owner.styled(prefix)
        for foreign, unknown in pairs:
            a = api.post("tasks", json={**foreign, "input_items": [_message()]})
            b = api.post("tasks", json={**unknown, "input_items": [_message()]})
            assert a.status_code == 404, a.text
            assert a.json() == b.json()
    assert db_rows(world.server) == before


def test_lists_never_show_foreign_rows(world: World) -> None:
    api = world.owner
    assert world.other_env not in api.get("environments").text
    assert world.other_env not in api.get("environments/recent").text
    assert world.other_env not in api.get("environments/with-creators").text
    full_name = api.get(f"environments/{world.env}").json()["repo_map"]
    (name,) = [r["repository_full_name"] for r in full_name.values()]
    by_repo = api.get(f"environments/by-repo/github/{name}").json()
    assert [e["id"] for e in by_repo] == [world.env]
    filtered = api.get(
        "tasks/list", params={"environment_id": world.other_env, "task_filter": "all"}
    )
    assert filtered.status_code == 200 and filtered.json()["items"] == []
    for path in ("tasks/list", "tasks"):
        text = api.get(path, params={"task_filter": "all"}).text
        assert world.other_task not in text and world.task in text
