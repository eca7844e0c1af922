"""API tokens: named, expiring, listed and revoked through the API, the SDK, the CLI and the web
UI; a revoked token is refused at once by every server on the same database."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import PREFIXES, WHAM, Api, Server
from openwham.client import AsyncWhamClient, AuthError, NotFound, WhamClient
from openwham.config import Settings
from openwham.server import fanout
from openwham.server.app import create_app
from openwham.server.state import AppState
from openwham.service import tokens as api_tokens
from openwham.service.accounts import create_api_token, ensure_owner, issue_token
from openwham.store import models as m
from support.app_thread import AppThread
from support.browser import artifacts_dir, chromium, csrf_of, sign_in


def token_row(server: Server, token_id: str) -> m.ApiToken:
    with server.app_state.db.session() as s:
        row = s.get(m.ApiToken, token_id)
        assert row is not None
        return row


def token_id_of(api: Api) -> str:
    (current,) = [t for t in api.get("tokens").json()["items"] if t["current"]]
    return str(current["id"])


# --------------------------------------------------------------------------- every node


@pytest.fixture
def two_nodes(tmp_path: Path, database_url: str) -> Iterator[tuple[Api, Api]]:
    """Two server apps on one database (SQLite file or PostgreSQL), as two nodes would be:
    same database, same keys."""
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, executor="none")
    first, second = create_app(settings), create_app(settings)
    with TestClient(first) as a, TestClient(second) as b:
        yield Api(a, None), Api(b, None)
    for app in (first, second):
        state: AppState = app.state.wham
        state.db.dispose()


def test_revoked_token_is_401_at_once_on_every_node(two_nodes: tuple[Api, Api]) -> None:
    node_a, node_b = two_nodes
    state: AppState = node_a.client.app.state.wham  # type: ignore[attr-defined]
    with state.db.session() as s:
        account, user = ensure_owner(s)
        _, admin = create_api_token(s, state.signing_key, user, account, ttl_seconds=3600)
    created = node_a.as_(admin).post("tokens", json={"name": "laptop"})
    assert created.status_code == 201, created.text
    laptop = created.json()["token"]
    for node in (node_a, node_b):
        for prefix in PREFIXES:
            assert node.as_(laptop).styled(prefix).get("tasks/list").status_code == 200
    # revoked through node A; node B (which just accepted it) refuses it on the next request
    r = node_a.as_(admin).delete(f"tokens/{created.json()['id']}")
    assert r.status_code == 200 and r.json()["id"] == created.json()["id"]
    for node in (node_b, node_a):
        for prefix in PREFIXES:
            refused = node.as_(laptop).styled(prefix).get("tasks/list")
            assert refused.status_code == 401, refused.text
            assert refused.headers["www-authenticate"] == "Bearer"
            assert "revoked" in refused.json()["detail"]
    # the other token is untouched, and the revoked one is no longer listed
    listed = node_b.as_(admin).get("tokens").json()["items"]
    assert created.json()["id"] not in {t["id"] for t in listed}
    assert node_b.as_(admin).get("usage").status_code == 200


# --------------------------------------------------------------------------- the API


def test_list_shows_name_created_last_used_and_expiry(server: Server) -> None:
    owner = server.api
    before = time.time()
    created = owner.post("tokens", json={"name": "ci runner", "expires_in_days": 7})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "ci runner" and body["id"].startswith("tok_")
    assert body["last_used_at"] is None and body["expired"] is False
    assert before - 1 <= body["created_at"] <= time.time()
    assert body["expires_at"] == pytest.approx(body["created_at"] + 7 * 86400, abs=1)

    listed = {t["id"]: t for t in owner.get("tokens").json()["items"]}
    assert listed[body["id"]] == {k: v for k, v in body.items() if k != "token"}
    assert listed[token_id_of(owner)]["current"] is True
    assert listed[token_id_of(owner)]["last_used_at"] is not None

    ci = owner.as_(body["token"])
    assert ci.get("tasks/list").status_code == 200
    first_use = token_row(server, body["id"]).last_used_at
    assert first_use is not None and first_use >= body["created_at"]
    # within a minute, further uses write nothing
    assert ci.get("tasks/list").status_code == 200
    assert token_row(server, body["id"]).last_used_at == first_use
    # a minute later, the next use is recorded
    with server.app_state.db.session() as s:
        row = s.get(m.ApiToken, body["id"])
        assert row is not None
        row.last_used_at = first_use - 61
    assert ci.get("tasks/list").status_code == 200
    assert token_row(server, body["id"]).last_used_at == pytest.approx(time.time(), abs=5)
    shown = {t["id"]: t for t in ci.get("tokens").json()["items"]}[body["id"]]
    assert shown["current"] is True and shown["last_used_at"] is not None


def test_default_name_and_lifetime(server: Server) -> None:
    body = server.api.post("tokens", json={}).json()
    assert body["name"] == "API token"
    assert body["expires_at"] - body["created_at"] == pytest.approx(30 * 86400, abs=1)


def test_expired_token_is_401_with_a_clear_detail(server: Server) -> None:
    state = server.app_state
    with state.db.session() as s:
        account, user = ensure_owner(s)
        row, token = create_api_token(
            s, state.signing_key, user, account, ttl_seconds=60, now=time.time() - 3600
        )
        token_id = row.id
    r = server.api.as_(token).get("tasks/list")
    assert r.status_code == 401
    assert "expired" in r.json()["detail"] and "wham token create" in r.json()["detail"]
    listed = {t["id"]: t for t in server.api.get("tokens").json()["items"]}
    assert listed[token_id]["expired"] is True


def test_token_without_a_row_is_refused_with_the_fix(server: Server) -> None:
    """Tokens made before tokens had rows can be neither listed nor revoked: refused."""
    state = server.app_state
    with state.db.session() as s:
        account, user = ensure_owner(s)
        legacy = issue_token(state.signing_key, user, account, ttl_seconds=3600)
    r = server.api.as_(legacy).get("tasks/list")
    assert r.status_code == 401
    assert "wham token create" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 101},
        {"name": "tab\tin name"},
        {"name": "nul\x00"},
        {"name": 12},
        {"expires_in_days": -1},
        {"expires_in_days": 0},
        {"expires_in_days": 0.0001},
        {"expires_in_days": 100000},
        {"expires_in_days": "soon"},
        {"scope": "all"},
        [],
    ],
)
def test_bad_create_bodies_are_400_and_store_nothing(server: Server, body: Any) -> None:
    before = server.api.get("tokens").json()["items"]
    r = server.api.post("tokens", json=body)
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert server.api.get("tokens").json()["items"] == before


def test_revoking_unknown_or_foreign_ids_is_the_same_404(server: Server) -> None:
    other = server.api.as_(server.other_account_token())
    theirs = token_id_of(other)
    answers = set()
    for token_id in (theirs, "tok_" + "0" * 32, "x" * 5000, "TOK_unknown"):
        r = server.api.delete(f"tokens/{token_id}")
        assert r.status_code == 404, r.text
        answers.add(r.json()["detail"].replace(token_id[:80], "ID"))
    assert len(answers) == 1
    assert other.get("usage").status_code == 200  # theirs still works
    mine = server.api.post("tokens", json={"name": "twice"}).json()["id"]
    assert server.api.delete(f"tokens/{mine}").status_code == 200
    assert server.api.delete(f"tokens/{mine}").status_code == 404  # already revoked


def test_revoking_the_token_in_use_ends_it(server: Server) -> None:
    own = server.api.as_(server.owner_token())
    assert own.delete(f"tokens/{token_id_of(own)}").status_code == 200
    assert own.get("tokens").status_code == 401


def test_an_open_stream_ends_when_its_token_is_revoked(
    server: Server, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream outlives the request that checked the token: it rechecks every keep-alive."""
    monkeypatch.setattr(fanout, "KEEPALIVE_SECONDS", 0.3)
    env = server.api.create_env(repo)
    created = server.api.create_task(env["id"])  # executor "none": the attempt stays pending
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    token = server.owner_token()
    token_id = token_id_of(server.api.as_(token))
    url, stop = _serve(server)
    try:
        with (
            httpx.Client(base_url=url, timeout=10) as client,
            client.stream(
                "GET",
                f"/api/codex/tasks/{task_id}/turns/{turn_id}/stream",
                headers={"Authorization": f"Bearer {token}"},
            ) as response,
        ):
            assert response.status_code == 200
            lines = response.iter_lines()
            assert ": keep-alive" in lines  # open and idle
            assert server.api.delete(f"tokens/{token_id}").status_code == 200
            deadline = time.monotonic() + 10
            for _ in lines:  # ends (a stream that stayed open would keep sending keep-alives)
                assert time.monotonic() < deadline, "the stream stayed open"
    finally:
        stop()


# --------------------------------------------------------------------------- SDK


def test_sdk_lists_creates_and_revokes_in_both_twins(server: Server) -> None:
    url, stop = _serve(server)
    try:
        token = server.owner_token()
        with WhamClient(url, token=token) as wham:
            made = wham.create_token(name="sdk", expires_in_days=2)
            assert made.name == "sdk" and made.token
            assert made.id in {t.id for t in wham.list_tokens().items}
            with WhamClient(url, token=made.token) as sdk:
                assert [t.current for t in sdk.list_tokens().items if t.id == made.id] == [True]
            assert wham.revoke_token(made.id).id == made.id
            with pytest.raises(NotFound):
                wham.revoke_token(made.id)
        with WhamClient(url, token=made.token) as sdk, pytest.raises(AuthError):
            sdk.usage()

        async def twin() -> None:
            async with AsyncWhamClient(url, token=token) as wham:
                made = await wham.create_token(name="async")
                assert made.id in {t.id for t in (await wham.list_tokens()).items}
                assert (await wham.revoke_token(made.id)).id == made.id

        anyio.run(twin)
    finally:
        stop()


def _serve(server: Server) -> tuple[str, Any]:
    thread = AppThread()
    url = thread.start(server.api.client.app)  # type: ignore[attr-defined]
    return url, thread.stop


# --------------------------------------------------------------------------- CLI


def wham(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(WHAM), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow  # each wham command is a Python start-up
def test_cli_create_list_and_revoke(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = wham("token", "create", "--data-dir", str(data), "--name", "deploy", "--json")
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["id"].startswith("tok_") and made["name"] == "deploy" and made["token"]
    assert made["expires_at"] - made["created_at"] == pytest.approx(30 * 86400, abs=1)
    short = wham("token", "create", "--data-dir", str(data), "--expires-in", "0.5")
    assert short.returncode == 0, short.stderr
    bare = short.stdout.strip()

    listed = json.loads(wham("token", "list", "--data-dir", str(data), "--json").stdout)
    assert [t["name"] for t in listed] == ["API token", "deploy"]
    assert {"id", "name", "created_at", "last_used_at", "expires_at", "expired"} == set(listed[1])
    assert listed[0]["expires_at"] - listed[0]["created_at"] == pytest.approx(43200, abs=1)

    app = create_app(Settings(data_dir=data, executor="none"))
    with TestClient(app) as client:
        api = Api(client, made["token"])
        assert api.get("usage").status_code == 200
        text = wham("token", "list", "--data-dir", str(data)).stdout
        assert "LAST USED" in text and made["id"] in text and "deploy" in text
        (line,) = [ln for ln in text.splitlines() if made["id"] in ln]
        assert "never" not in line  # it was just used
        assert "UTC" in line

        gone = wham("token", "revoke", made["id"], "--data-dir", str(data))
        assert gone.returncode == 0, gone.stderr
        assert gone.stdout.strip() == f"revoked {made['id']} (deploy)"
        r = api.get("usage")
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
        assert api.as_(bare).get("usage").status_code == 200

        again = wham("token", "revoke", made["id"], "--data-dir", str(data), "--json")
        assert again.returncode == 1 and again.stderr.startswith("error: No token")
        left = json.loads(wham("token", "list", "--data-dir", str(data), "--json").stdout)
        assert [t["name"] for t in left] == ["API token"]
        by_json = json.loads(
            wham("token", "revoke", left[0]["id"], "--data-dir", str(data), "--json").stdout
        )
        assert by_json["id"] == left[0]["id"] and by_json["revoked_at"] > 0
        assert api.as_(bare).get("usage").status_code == 401
    app.state.wham.db.dispose()
    empty = wham("token", "list", "--data-dir", str(data))
    assert empty.stdout.startswith("no tokens")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expires-in", "-3"], "positive"),
        (["--expires-in", "0"], "positive"),
        (["--expires-in", "99999"], "at most"),
        (["--name", ""], "empty"),
        (["--name", "x" * 101], "more than"),
    ],
)
def test_cli_create_refuses_bad_values(tmp_path: Path, args: list[str], message: str) -> None:
    out = wham("token", "create", "--data-dir", str(tmp_path / "data"), *args)
    assert out.returncode == 2, out.stdout
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert "Traceback" not in out.stderr
    listed = wham("token", "list", "--data-dir", str(tmp_path / "data"), "--json")
    assert json.loads(listed.stdout) == []


# --------------------------------------------------------------------------- web UI


def test_web_tokens_page_lists_creates_and_revokes(server: Server) -> None:
    client = server.api.client
    browser_token = server.owner_token()
    sign_in(client, browser_token)
    page = client.get("/settings/tokens")
    assert page.status_code == 200
    assert 'href="/settings/tokens"' in page.text and "(this session)" in page.text
    csrf = csrf_of(page.text)

    bad = client.post("/settings/tokens", data={"csrf": csrf, "name": "x", "expires_in_days": "-1"})
    assert bad.status_code == 400 and "positive" in bad.text
    made = client.post(
        "/settings/tokens", data={"csrf": csrf, "name": "<b>web</b>", "expires_in_days": "3"}
    )
    assert made.status_code == 200
    assert "&lt;b&gt;web&lt;/b&gt;" in made.text and "<b>web</b>" not in made.text
    found = re.search(r'id="new-token" value="([^"]+)"', made.text)  # shown once
    assert found
    secret = found.group(1)
    new_id = next(
        t["id"] for t in server.api.get("tokens").json()["items"] if t["name"] == "<b>web</b>"
    )
    assert server.api.as_(secret).get("usage").status_code == 200
    assert secret not in client.get("/settings/tokens").text

    forged = client.post(f"/settings/tokens/{new_id}/revoke", data={"csrf": "nope"})
    assert forged.status_code == 403
    r = client.post(
        f"/settings/tokens/{new_id}/revoke", data={"csrf": csrf}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/settings/tokens"
    assert server.api.as_(secret).get("usage").status_code == 401
    assert new_id not in client.get("/settings/tokens").text
    unknown = client.post("/settings/tokens/tok_nothing/revoke", data={"csrf": csrf})
    assert unknown.status_code == 404


def test_web_session_ends_when_its_token_is_revoked(server: Server) -> None:
    client = server.api.client
    browser_token = server.owner_token()
    sign_in(client, browser_token)
    assert client.get("/", follow_redirects=False).status_code == 200
    token_id = token_id_of(server.api.as_(browser_token))
    assert server.api.delete(f"tokens/{token_id}").status_code == 200  # e.g. from the CLI
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_web_revoking_the_session_token_signs_out(server: Server) -> None:
    client = server.api.client
    browser_token = server.owner_token()
    sign_in(client, browser_token)
    token_id = token_id_of(server.api.as_(browser_token))
    csrf = csrf_of(client.get("/settings/tokens").text)
    r = client.post(
        f"/settings/tokens/{token_id}/revoke", data={"csrf": csrf}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/settings/tokens", follow_redirects=False).status_code == 303


def _unused_token(server: Server) -> str:
    """A new token of the owner's, never used: its id."""
    state = server.app_state
    with state.db.session() as s:
        account, user = ensure_owner(s)
        row, _ = create_api_token(s, state.signing_key, user, account, ttl_seconds=3600)
        return row.id


def test_touch_writes_once_per_interval(server: Server) -> None:
    """The throttle is in the UPDATE itself: a second node that read the row before the first
    node's write does not write again."""
    state = server.app_state
    token_id = _unused_token(server)
    now = time.time()
    with state.db.sessions() as first, state.db.sessions() as second:
        a = first.get(m.ApiToken, token_id)
        b = second.get(m.ApiToken, token_id)
        assert a is not None and b is not None
        api_tokens.touch(first, a, now)
        api_tokens.touch(second, b, now + 1)  # stale copy: still thinks it was never used
    assert token_row(server, token_id).last_used_at == now


def test_a_touched_row_leaves_nothing_to_write(server: Server) -> None:
    """The use ``touch`` committed shows in the row as committed, not as a change: the
    session's next query wrote it again (on SQLite a write transaction, holding the
    database's write lock to the end of the request, which ``POST tasks``' write on the
    writer thread then waited for until the busy timeout)."""
    state = server.app_state
    token_id = _unused_token(server)
    now = time.time()
    with state.db.sessions() as s:
        found = s.get(m.ApiToken, token_id)
        assert found is not None and found.last_used_at is None
        api_tokens.touch(s, found, now)
        assert found.last_used_at == now
        assert not s.dirty
        s.flush()
        assert not s.connection().connection.dbapi_connection.in_transaction  # type: ignore[union-attr]
    assert token_row(server, token_id).last_used_at == now


@pytest.mark.browser
def test_browser_tokens_page(server: Server, tmp_path: Path) -> None:
    """Chromium: the nav link, creating a token (shown once), revoking another one."""
    url, stop = _serve(server)
    shots = artifacts_dir(tmp_path / "screenshots")
    old = server.api.post("tokens", json={"name": "old laptop"}).json()
    try:
        with chromium() as browser:
            page = browser.new_page(base_url=url)
            page.set_default_timeout(30_000)
            page.goto("/login")
            page.get_by_label("API token").fill(server.owner_token(name="browser"))
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"{url}/")
            page.get_by_role("link", name="Tokens").click()
            page.wait_for_url(f"{url}/settings/tokens")
            row = page.locator("tr", has_text="browser")
            assert "(this session)" in row.inner_text()
            page.get_by_label("Name").fill("ci runner")
            page.get_by_label("Expires in (days)").fill("7")
            page.get_by_role("button", name="Create token").click()
            secret = page.get_by_label("The new token").input_value()
            assert server.api.as_(secret).get("usage").status_code == 200
            page.screenshot(path=str(shots / "tokens.png"), full_page=True)

            page.locator("tr", has_text="old laptop").get_by_role("button", name="Revoke").click()
            page.wait_for_url(f"{url}/settings/tokens")
            assert page.locator("tr", has_text="old laptop").count() == 0
            assert page.locator("tr", has_text="ci runner").count() == 1
            assert server.api.as_(old["token"]).get("usage").status_code == 401
    finally:
        stop()
