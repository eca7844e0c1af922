"""Codex auth for the SDK: logins, refresh, logout, against a local stand-in for the issuer.

Everything goes over real HTTP to ``tests/support/issuer.py`` and through real files; the
written ``auth.json`` is checked with the pinned Codex CLI itself (``codex login status``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.requests import Request

from openwham.client.auth import BearerAuth, CodexAuth
from openwham.client.errors import AuthError, NotLoggedIn, SessionExpired
from openwham.client.login import (
    SCOPE,
    auth_status,
    login_browser,
    login_device,
    logout,
)
from openwham.codexauth import apply_refresh, now_rfc3339
from openwham.runtimes.codex_cli import CodexNotInstalled, native_binary
from support.issuer import CLIENT_ID, Issuer, decode

TOKEN_FIELDS = {
    "id_token",
    "access_token",
    "refresh_token",
    "account_id",
    "oauth_provenance",
    "login_owner_id",
}
AGENT_IDENTITY = {  # a complete one: the Codex CLI refuses the file with a partial one
    "agent_runtime_id": "keep-me",
    "agent_private_key": "key",
    "account_id": "acct-test-1",
    "chatgpt_user_id": "user-test-1",
    "email": "dev@example.com",
    "plan_type": "pro",
    "chatgpt_account_is_fedramp": False,
}
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    stand_in = Issuer().start()
    try:
        yield stand_in
    finally:
        stand_in.stop()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "CODEX_HOME",
        "CODEX_ACCESS_TOKEN",
        "CODEX_REFRESH_TOKEN_URL_OVERRIDE",
        "CODEX_REVOKE_TOKEN_URL_OVERRIDE",
        "CODEX_APP_SERVER_LOGIN_CLIENT_ID",
        "CODEX_AUTHAPI_BASE_URL",
        "WHAM_AUTH_ISSUER",
    ):
        monkeypatch.delenv(name, raising=False)


def codex_login_status(home: Path, **env: str) -> tuple[int, str]:
    """``codex login status`` of the pinned Codex CLI with ``CODEX_HOME=home`` (no network:
    every proxy points at a closed port)."""
    try:
        binary = native_binary()
    except CodexNotInstalled as exc:
        pytest.fail(str(exc))
    run = subprocess.run(
        [str(binary), "login", "status"],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home.parent),
            "CODEX_HOME": str(home),
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    return run.returncode, run.stdout + run.stderr


def write_login(
    home: Path, issuer: Issuer, *, access_ttl: int | None = None, **extra: Any
) -> dict[str, Any]:
    """An ``auth.json`` as ``codex login`` leaves it, plus ``extra`` top-level fields."""
    tokens = issuer.mint(access_ttl=access_ttl)
    data: dict[str, Any] = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            **tokens,
            "account_id": issuer.account.account_id,
            "oauth_provenance": {"issuer": issuer.url, "client_id": CLIENT_ID},
            "login_owner_id": "owner-1",
        },
        "last_refresh": "2026-01-01T00:00:00.123456789Z",
        **extra,
    }
    home.mkdir(parents=True, exist_ok=True)
    path = home / "auth.json"
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return data


def saved(home: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((home / "auth.json").read_text())
    return data


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def check_codex_format(data: dict[str, Any], issuer: Issuer) -> None:
    """The fields and shapes of §6.3, as ``codex login`` writes them."""
    assert set(data) == {"auth_mode", "OPENAI_API_KEY", "tokens", "last_refresh"}
    assert data["auth_mode"] == "chatgpt"
    assert set(data["tokens"]) == TOKEN_FIELDS
    tokens = data["tokens"]
    assert decode(tokens["id_token"])["email"] == issuer.account.email
    assert tokens["access_token"] in issuer.valid_access
    assert issuer.refresh_tokens[tokens["refresh_token"]] == "active"
    assert tokens["account_id"] == issuer.account.account_id
    assert tokens["oauth_provenance"] == {"issuer": issuer.url, "client_id": CLIENT_ID}
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,}", tokens["login_owner_id"])
    assert RFC3339_Z.match(data["last_refresh"])


# --------------------------------------------------------------------------- browser login


@pytest.mark.sandbox  # codex login status of the real Codex CLI
def test_browser_login_with_pkce_writes_the_codex_auth_json(issuer: Issuer, tmp_path: Path) -> None:
    home = tmp_path / "codex-home"
    pages: list[httpx.Response] = []

    def browser(url: str) -> None:
        """The user's browser: a forged callback first (refused), then the real sign-in."""
        redirect_uri = parse_qs(urlsplit(url).query)["redirect_uri"][0]
        forged = httpx.get(f"{redirect_uri}?code=stolen&state=wrong")
        assert forged.status_code == 400 and "State mismatch" in forged.text
        pages.append(httpx.get(url, follow_redirects=True))

    result = login_browser(home, issuer=issuer.url, port=0, open_browser=browser)

    (params,) = issuer.authorize_requests
    redirect_uri = params["redirect_uri"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/auth/callback", redirect_uri)
    assert not redirect_uri.endswith(":0/auth/callback")
    assert set(params) == {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "code_challenge",
        "code_challenge_method",
        "id_token_add_organizations",
        "codex_cli_simplified_flow",
        "state",
        "originator",
    }
    assert params["response_type"] == "code" and params["client_id"] == CLIENT_ID
    assert params["scope"] == SCOPE
    assert params["code_challenge_method"] == "S256"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", params["code_challenge"])  # sha256, base64url
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", params["state"])  # 32 random bytes
    assert params["id_token_add_organizations"] == "true"
    assert params["codex_cli_simplified_flow"] == "true"
    assert params["originator"] == "codex_cli_rs"

    exchange, api_key = issuer.token_calls
    assert exchange.grant_type == "authorization_code"
    assert exchange.content_type == "application/x-www-form-urlencoded"
    assert set(exchange.fields) == {
        "grant_type",
        "client_id",
        "code",
        "redirect_uri",
        "code_verifier",
    }
    assert exchange.fields["redirect_uri"] == redirect_uri
    assert re.fullmatch(r"[A-Za-z0-9_-]{86}", exchange.fields["code_verifier"])  # 64 bytes
    assert "user-agent" not in exchange.headers and "originator" not in exchange.headers
    assert api_key.grant_type == "urn:ietf:params:oauth:grant-type:token-exchange"
    assert api_key.fields["requested_token"] == "openai-api-key"
    assert api_key.fields["subject_token_type"] == "urn:ietf:params:oauth:token-type:id_token"

    (page,) = pages
    assert page.status_code == 200 and "Signed in" in page.text
    success = urlsplit(str(page.url))
    assert success.path == "/success"
    query = parse_qs(success.query)
    assert query["plan_type"] == ["pro"] and query["needs_setup"] == ["false"]
    assert query["platform_url"] == ["https://platform.openai.com"]

    data = saved(home)
    check_codex_format(data, issuer)
    assert data["OPENAI_API_KEY"].startswith("sk-test-")  # from the token exchange
    assert mode(home / "auth.json") == 0o600
    assert result.path == home / "auth.json" and result.api_key_saved
    assert (result.email, result.account_id, result.plan_type) == (
        "dev@example.com",
        "acct-test-1",
        "pro",
    )
    code, output = codex_login_status(home)
    assert code == 0 and "Logged in using ChatGPT" in output, output


def test_browser_login_is_cancelled_through_its_cancel_endpoint(
    issuer: Issuer, tmp_path: Path
) -> None:
    def another_login(url: str) -> None:
        redirect_uri = parse_qs(urlsplit(url).query)["redirect_uri"][0]
        httpx.get(redirect_uri.replace("/auth/callback", "/cancel"))

    with pytest.raises(AuthError, match="login cancelled"):
        login_browser(tmp_path, issuer=issuer.url, port=0, open_browser=another_login)
    assert not (tmp_path / "auth.json").exists()
    assert issuer.token_calls == []


def test_a_second_browser_login_takes_over_the_port_of_an_abandoned_one(
    issuer: Issuer, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first_error: list[BaseException] = []
    opened = threading.Event()

    def abandoned() -> None:
        try:
            login_browser(
                tmp_path, issuer=issuer.url, port=port, open_browser=lambda _: opened.set()
            )
        except AuthError as exc:
            first_error.append(exc)

    first = threading.Thread(target=abandoned)
    first.start()
    assert opened.wait(10)
    result = login_browser(
        tmp_path,
        issuer=issuer.url,
        port=port,
        open_browser=lambda url: httpx.get(url, follow_redirects=True),
    )
    first.join(10)
    assert [str(e) for e in first_error] == ["login cancelled (another login took its port)"]
    assert result.path.exists()
    assert issuer.authorize_requests[-1]["redirect_uri"] == f"http://127.0.0.1:{port}/auth/callback"


# --------------------------------------------------------------------------- device login


class Clock:
    """A fake ``sleep`` that records the intervals asked for."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)


@pytest.mark.sandbox  # codex login status of the real Codex CLI
def test_device_login_shows_the_code_polls_and_saves_tokens(issuer: Issuer, tmp_path: Path) -> None:
    home = tmp_path / "codex-home"
    issuer.device_script = ["pending", "approve"]
    shown: list[tuple[str, str]] = []
    clock = Clock()

    result = login_device(
        home, issuer=issuer.url, on_code=lambda url, code: shown.append((url, code)), sleep=clock
    )

    ((url, user_code),) = shown
    assert url == f"{issuer.url}/codex/device"
    assert [p["user_code"] for p in issuer.device_polls] == [user_code, user_code]
    assert clock.sleeps == [5.0]  # the interval the issuer sent (as a string)
    (exchange,) = issuer.token_calls  # no API-key exchange in this flow
    assert exchange.grant_type == "authorization_code"
    assert exchange.fields["redirect_uri"] == f"{issuer.url}/deviceauth/callback"
    data = saved(home)
    check_codex_format(data, issuer)
    assert data["OPENAI_API_KEY"] is None
    assert mode(home / "auth.json") == 0o600
    assert result.email == "dev@example.com" and not result.api_key_saved

    status = auth_status(home)
    assert status is not None and status.mode == "chatgpt"
    assert (status.email, status.plan_type, status.account_id) == (
        "dev@example.com",
        "pro",
        "acct-test-1",
    )
    assert status.issuer == issuer.url
    assert status.expires_at is not None and status.expires_at > time.time() + 3000
    assert status.last_refresh is not None and abs(status.last_refresh - time.time()) < 60
    code, output = codex_login_status(home)
    assert code == 0 and "Logged in using ChatGPT" in output, output


def test_device_login_waits_while_pending_and_slows_down_when_told(
    issuer: Issuer, tmp_path: Path
) -> None:
    issuer.device_script = ["pending", "pending404", "slow_down", "pending", "approve"]
    clock = Clock()
    login_device(tmp_path, issuer=issuer.url, on_code=lambda *_: None, sleep=clock)
    assert clock.sleeps == [5.0, 5.0, 10.0, 10.0]
    assert len(issuer.device_polls) == 5
    assert (tmp_path / "auth.json").exists()


def test_device_login_gives_up_when_the_code_expires(issuer: Issuer, tmp_path: Path) -> None:
    clock = Clock()  # the script is empty: the user never enters the code
    with pytest.raises(AuthError, match="timed out") as info:
        login_device(tmp_path, issuer=issuer.url, on_code=lambda *_: None, sleep=clock, timeout=30)
    assert sum(clock.sleeps) == 30 and len(issuer.device_polls) == 7
    assert info.value.hint == "run `wham login --device` again"

    issuer.device_script = ["pending", "expired"]  # the issuer declares it expired itself
    with pytest.raises(AuthError, match="deviceauth_expired"):
        login_device(tmp_path, issuer=issuer.url, on_code=lambda *_: None, sleep=Clock())
    assert not (tmp_path / "auth.json").exists()
    assert issuer.token_calls == []


def test_device_login_says_when_the_server_does_not_offer_it(
    issuer: Issuer, tmp_path: Path
) -> None:
    issuer.device_enabled = False
    with pytest.raises(AuthError, match="device code login is not enabled for this server"):
        login_device(tmp_path, issuer=issuer.url, on_code=lambda *_: None, sleep=Clock())


# --------------------------------------------------------------------------- refresh


def get_protected(
    auth: httpx.Auth, issuer: Issuer, *, use_async: bool = False, times: int = 1
) -> list[httpx.Response]:
    """Call the stand-in's protected resource through ``auth`` with either client."""
    url = f"{issuer.url}/backend-api/protected"
    if not use_async:
        with httpx.Client(auth=auth) as client:
            return [client.get(url) for _ in range(times)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(auth=auth) as client:
            return [await client.get(url) for _ in range(times)]

    return asyncio.run(run())


@pytest.mark.sandbox  # codex login status of the real Codex CLI
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_proactive_refresh_rotates_the_refresh_token_and_keeps_the_file_codex_readable(
    issuer: Issuer, tmp_path: Path, use_async: bool
) -> None:
    home = tmp_path / "codex-home"
    before = write_login(
        home,
        issuer,
        access_ttl=30,  # inside the 60 s margin
        agent_identity=AGENT_IDENTITY,
        some_future_field=[1, 2],
    )
    old_refresh = before["tokens"]["refresh_token"]
    auth = CodexAuth(home, token_url=f"{issuer.url}/oauth/token")

    responses = get_protected(auth, issuer, use_async=use_async, times=2)

    assert [r.status_code for r in responses] == [200, 200]
    (call,) = [c for c in issuer.token_calls if c.grant_type == "refresh_token"]  # just once
    assert call.content_type == "application/json"
    assert call.fields == {
        "client_id": CLIENT_ID,
        "grant_type": "refresh_token",
        "refresh_reason": "proactive_expiry",
        "refresh_token": old_refresh,
    }
    assert call.headers["originator"] == "codex_cli_rs"
    after = saved(home)
    new = after["tokens"]
    assert new["refresh_token"] != old_refresh
    assert issuer.refresh_tokens[new["refresh_token"]] == "active"
    assert issuer.refresh_tokens[old_refresh] == "used"
    assert new["access_token"] != before["tokens"]["access_token"]
    for headers in issuer.protected_calls:  # never sent the expiring token
        assert headers["authorization"] == f"Bearer {new['access_token']}"
        assert headers["chatgpt-account-id"] == "acct-test-1"
        assert "x-openai-fedramp" not in headers
    # everything else kept: unknown fields, provenance, login owner
    assert after["agent_identity"] == AGENT_IDENTITY
    assert after["some_future_field"] == [1, 2]
    assert new["oauth_provenance"] == before["tokens"]["oauth_provenance"]
    assert new["login_owner_id"] == "owner-1"
    assert RFC3339_Z.match(after["last_refresh"]) and after["last_refresh"] > "2026-01-01"
    assert mode(home / "auth.json") == 0o600

    # The old refresh token is dead at the issuer: reusing it is refused as Codex would see it.
    reuse = httpx.post(
        f"{issuer.url}/oauth/token",
        json={"client_id": CLIENT_ID, "grant_type": "refresh_token", "refresh_token": old_refresh},
    )
    assert reuse.status_code == 401
    assert reuse.json()["error"]["code"] == "refresh_token_reused"
    code, output = codex_login_status(home)
    assert code == 0 and "Logged in using ChatGPT" in output, output


def test_without_exp_the_token_is_refreshed_after_eight_days(
    issuer: Issuer, tmp_path: Path
) -> None:
    home = tmp_path / "codex-home"
    data = write_login(home, issuer)
    data["tokens"]["access_token"] = "opaque-access-token"  # no exp to go by
    issuer.valid_access.add("opaque-access-token")
    data["last_refresh"] = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    (home / "auth.json").write_text(json.dumps(data))
    auth = CodexAuth(home, token_url=f"{issuer.url}/oauth/token")
    assert get_protected(auth, issuer)[0].status_code == 200
    assert issuer.refresh_count() == 0  # one day old: still good

    data["last_refresh"] = (datetime.now(UTC) - timedelta(days=9)).isoformat()
    (home / "auth.json").write_text(json.dumps(data))
    assert get_protected(auth, issuer)[0].status_code == 200
    assert [c.fields["refresh_reason"] for c in issuer.token_calls] == ["proactive_expiry"]
    assert saved(home)["tokens"]["access_token"] != "opaque-access-token"


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_401_refreshes_once_and_retries(issuer: Issuer, tmp_path: Path, use_async: bool) -> None:
    home = tmp_path / "codex-home"
    issuer.account.fedramp = True
    before = write_login(home, issuer)  # fresh for an hour, but about to be revoked
    issuer.revoke_access()
    auth = CodexAuth(home, token_url=f"{issuer.url}/oauth/token")

    (response,) = get_protected(auth, issuer, use_async=use_async)

    assert response.status_code == 200
    assert [c.fields["refresh_reason"] for c in issuer.token_calls] == ["unauthorized_recovery"]
    first, second = issuer.protected_calls
    assert first["authorization"] == f"Bearer {before['tokens']['access_token']}"
    assert second["authorization"] == f"Bearer {saved(home)['tokens']['access_token']}"
    assert second["x-openai-fedramp"] == "true"

    issuer.revoke_access()  # refused again right after the refresh: give up, no loop
    issuer.protected_hook = lambda _: issuer.revoke_access()
    (response,) = get_protected(auth, issuer, use_async=use_async)
    assert response.status_code == 401
    assert issuer.refresh_count() == 2 and len(issuer.protected_calls) == 4


def test_a_401_after_another_process_refreshed_just_retries(issuer: Issuer, tmp_path: Path) -> None:
    home = tmp_path / "codex-home"
    write_login(home, issuer)
    auth = CodexAuth(home, token_url=f"{issuer.url}/oauth/token")

    def other_process_refreshes(request: Request) -> None:
        if len(issuer.protected_calls) == 0:  # while the first request is in flight
            data = saved(home)
            apply_refresh(data, issuer.mint())
            (home / "auth.json").write_text(json.dumps(data))
            issuer.valid_access.discard(request.headers["authorization"].removeprefix("Bearer "))

    issuer.protected_hook = other_process_refreshes
    (response,) = get_protected(auth, issuer)
    assert response.status_code == 200
    assert issuer.refresh_count() == 0  # the file already held new tokens
    assert issuer.protected_calls[1]["authorization"].endswith(
        saved(home)["tokens"]["access_token"]
    )


def test_concurrent_processes_refresh_only_once(issuer: Issuer, tmp_path: Path) -> None:
    home = tmp_path / "codex-home"
    write_login(home, issuer, access_ttl=10)
    issuer.refresh_delay = 0.5  # the second process arrives while the first one refreshes
    script = textwrap.dedent(
        f"""
        import httpx, pathlib
        from openwham.client.auth import CodexAuth
        auth = CodexAuth(pathlib.Path({str(home)!r}), token_url={issuer.url + "/oauth/token"!r})
        with httpx.Client(auth=auth) as client:
            print(client.get({issuer.url + "/backend-api/protected"!r}).status_code)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outputs == ["200", "200"]
    assert issuer.refresh_count() == 1
    assert list(issuer.refresh_tokens.values()).count("used") == 1
    assert issuer.refresh_tokens[saved(home)["tokens"]["refresh_token"]] == "active"


@pytest.mark.parametrize(
    "code", ["refresh_token_expired", "refresh_token_reused", "refresh_token_invalidated"]
)
def test_permanent_refresh_errors_ask_for_a_new_login(
    issuer: Issuer, tmp_path: Path, code: str
) -> None:
    home = tmp_path / "codex-home"
    data = write_login(home, issuer, access_ttl=5)
    if code == "refresh_token_expired":
        issuer.expire_refresh_tokens()
    elif code == "refresh_token_invalidated":
        issuer.invalidate_refresh_tokens()
    else:  # someone else used the stored refresh token without saving the new one
        used = httpx.post(
            f"{issuer.url}/oauth/token",
            json={
                "client_id": CLIENT_ID,
                "grant_type": "refresh_token",
                "refresh_token": data["tokens"]["refresh_token"],
            },
        )
        assert used.status_code == 200
    before = (home / "auth.json").read_text()

    with pytest.raises(SessionExpired) as info:
        get_protected(CodexAuth(home, token_url=f"{issuer.url}/oauth/token"), issuer)

    assert f"({code})" in str(info.value) and "run `wham login` again" in str(info.value)
    assert info.value.hint == "run `wham login` again"
    assert (home / "auth.json").read_text() == before  # nothing half-written
    assert issuer.protected_calls == []


def test_other_refresh_failures_are_transient(issuer: Issuer, tmp_path: Path) -> None:
    home = tmp_path / "codex-home"
    write_login(home, issuer, access_ttl=5)
    issuer.refresh_override = (500, {"error": {"code": "server_error"}})
    auth = CodexAuth(home, token_url=f"{issuer.url}/oauth/token")
    with pytest.raises(AuthError) as info:
        get_protected(auth, issuer)
    assert not isinstance(info.value, SessionExpired)
    assert "HTTP 500, server_error" in str(info.value) and "transient" in str(info.value)

    issuer.refresh_override = None  # it recovers: the same file refreshes fine
    assert get_protected(auth, issuer)[0].status_code == 200


def test_the_refresh_url_comes_from_the_codex_override(
    issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "codex-home"
    write_login(home, issuer, access_ttl=5)
    monkeypatch.setenv("CODEX_REFRESH_TOKEN_URL_OVERRIDE", f"{issuer.url}/oauth/token")
    assert get_protected(CodexAuth(home), issuer)[0].status_code == 200
    assert issuer.refresh_count() == 1


def test_an_unreachable_token_endpoint_fails_the_request_and_releases_the_lock(
    issuer: Issuer, tmp_path: Path
) -> None:
    home = tmp_path / "codex-home"
    write_login(home, issuer, access_ttl=5)
    dead = CodexAuth(home, token_url="http://127.0.0.1:9/oauth/token")
    with pytest.raises(httpx.TransportError):
        get_protected(dead, issuer)
    started = time.monotonic()
    auth = CodexAuth(home, token_url=f"{issuer.url}/oauth/token")
    assert get_protected(auth, issuer)[0].status_code == 200
    assert time.monotonic() - started < 5  # did not wait for a leaked lock


# --------------------------------------------------------------------------- other credentials


def test_missing_or_unusable_auth_json_means_not_logged_in(issuer: Issuer, tmp_path: Path) -> None:
    with pytest.raises(NotLoggedIn, match="does not exist") as info:
        get_protected(CodexAuth(tmp_path), issuer)
    assert info.value.hint == "run `wham login`"
    assert auth_status(tmp_path) is None

    (tmp_path / "auth.json").write_text(
        json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": "sk-x"})
    )
    with pytest.raises(NotLoggedIn, match="no ChatGPT tokens") as info:
        get_protected(CodexAuth(tmp_path), issuer)
    assert info.value.hint == "run `wham login`"
    status = auth_status(tmp_path)
    assert status is not None and status.mode == "apikey"

    (tmp_path / "auth.json").write_text("{not json")
    with pytest.raises(NotLoggedIn, match="cannot read"):
        get_protected(CodexAuth(tmp_path), issuer)
    assert issuer.protected_calls == [] and issuer.token_calls == []


def test_a_personal_access_token_is_sent_with_the_account_from_whoami(
    issuer: Issuer, tmp_path: Path
) -> None:
    issuer.personal_access_tokens.add("at-test-1")
    (tmp_path / "auth.json").write_text(
        json.dumps({"OPENAI_API_KEY": None, "personal_access_token": "at-test-1"})
    )
    auth = CodexAuth(tmp_path, authapi_base_url=f"{issuer.url}/api/accounts")
    responses = get_protected(auth, issuer, times=2)
    assert [r.json() for r in responses] == [{"ok": True, "account": "acct-test-1"}] * 2
    assert len(issuer.whoami_calls) == 1  # looked up once
    assert issuer.whoami_calls[0]["authorization"] == "Bearer at-test-1"
    assert all(h["authorization"] == "Bearer at-test-1" for h in issuer.protected_calls)
    status = auth_status(tmp_path)
    assert status is not None and status.mode == "pat"

    refused = CodexAuth(
        tmp_path, personal_access_token="at-unknown", authapi_base_url=f"{issuer.url}/api/accounts"
    )
    with pytest.raises(SessionExpired, match="personal access token was refused"):
        get_protected(refused, issuer)


def test_bearer_auth_sends_a_static_token(issuer: Issuer) -> None:
    token = issuer.mint()["access_token"]
    (ok,) = get_protected(BearerAuth(token, "acct-9"), issuer)
    assert ok.json() == {"ok": True, "account": "acct-9"}
    (refused,) = get_protected(BearerAuth("nope"), issuer)
    assert refused.status_code == 401 and "chatgpt-account-id" not in issuer.protected_calls[-1]


# --------------------------------------------------------------------------- logout


def test_logout_revokes_the_refresh_token_and_deletes_auth_json(
    issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "codex-home"
    data = write_login(home, issuer)  # provenance names the stand-in
    assert logout(home) is True
    (revocation,) = issuer.revocations
    assert revocation["body"] == {
        "token": data["tokens"]["refresh_token"],
        "token_type_hint": "refresh_token",
        "client_id": CLIENT_ID,
    }
    assert not (home / "auth.json").exists()
    assert issuer.refresh_tokens[data["tokens"]["refresh_token"]] == "revoked"
    assert logout(home) is False  # nothing left to do

    # A file from the real issuer, revoked through the Codex override; no refresh token left:
    # the access token is revoked instead.
    data = write_login(home, issuer)
    data["tokens"]["oauth_provenance"]["issuer"] = "https://auth.invalid"
    data["tokens"]["refresh_token"] = ""
    (home / "auth.json").write_text(json.dumps(data))
    monkeypatch.setenv("CODEX_REVOKE_TOKEN_URL_OVERRIDE", f"{issuer.url}/oauth/revoke")
    assert logout(home) is True
    assert issuer.revocations[-1]["body"]["token"] == data["tokens"]["access_token"]
    assert issuer.revocations[-1]["body"]["token_type_hint"] == "access_token"
    assert not (home / "auth.json").exists()


def test_logout_removes_the_file_even_when_revoking_fails(tmp_path: Path) -> None:
    data = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {"id_token": "x", "access_token": "y", "refresh_token": "rt_z"},
        "last_refresh": now_rfc3339(),
    }
    (tmp_path / "auth.json").write_text(json.dumps(data))
    started = time.monotonic()
    assert logout(tmp_path, revoke_url="http://127.0.0.1:9/oauth/revoke") is True
    assert not (tmp_path / "auth.json").exists()
    assert time.monotonic() - started < 10
