"""``wham login`` (browser PKCE and device code), ``status`` and ``logout`` as a user runs them,
against the stand-in issuer (the real one is unreachable here) and an openwham server; the
hint of a machine with no profile."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import WHAM, Server
from openwham.codexauth import jwt_claims
from support.app_thread import AppThread
from support.issuer import Issuer


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    stand_in = Issuer().start()
    try:
        yield stand_in
    finally:
        stand_in.stop()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "WHAM_CONFIG_DIR": str(tmp_path / "config"),
        "CODEX_HOME": str(tmp_path / "codex"),
    }


def wham(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(WHAM), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_device_login_status_and_logout(issuer: Issuer, env: dict[str, str]) -> None:
    issuer.device_script = ["approve"]
    out = wham(env, "login", "--device", "--issuer", issuer.url)
    assert out.returncode == 0, out.stderr
    assert f"Open {issuer.url}/codex/device and enter the code:" in out.stdout
    assert "logged in to chatgpt.com as dev@example.com" in out.stdout
    auth = Path(env["CODEX_HOME"]) / "auth.json"
    assert json.loads(auth.read_text())["tokens"]["account_id"] == "acct-test-1"

    rows = {r["profile"]: r for r in json.loads(wham(env, "status", "--json").stdout)}
    chatgpt = rows["chatgpt"]
    assert chatgpt["logged_in"] and chatgpt["current"] and chatgpt["email"] == "dev@example.com"
    assert chatgpt["plan_type"] == "pro" and chatgpt["mode"] == "chatgpt"
    assert "* chatgpt  https://chatgpt.com/backend-api  logged in as dev@example.com" in (
        wham(env, "status").stdout
    )

    refresh = json.loads(auth.read_text())["tokens"]["refresh_token"]
    gone = wham(env, "logout")
    assert gone.returncode == 0 and "logged out of chatgpt.com" in gone.stdout
    assert not auth.exists()
    assert [r["body"]["token"] for r in issuer.revocations] == [refresh]
    assert "chatgpt  https://chatgpt.com/backend-api  not logged in" in wham(env, "status").stdout


def test_device_login_that_expires_is_one_clear_line(issuer: Issuer, env: dict[str, str]) -> None:
    issuer.device_script = ["expired"]
    out = wham(env, "login", "--device", "--issuer", issuer.url)
    assert out.returncode == 4
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert not (Path(env["CODEX_HOME"]) / "auth.json").exists()


def test_browser_login_with_pkce(issuer: Issuer, env: dict[str, str], tmp_path: Path) -> None:
    home = tmp_path / "other-codex-home"
    proc = subprocess.Popen(
        [
            str(WHAM),
            "login",
            "--issuer",
            issuer.url,
            "--port",
            "0",
            "--no-browser",
            "--codex-home",
            str(home),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Sign in at: ")
        url = line.removeprefix("Sign in at: ").strip()
        assert url.startswith(f"{issuer.url}/oauth/authorize?")
        # the "browser": the stand-in signs the user in and redirects to the local callback
        page = httpx.get(url, follow_redirects=True, timeout=30)
        assert page.status_code == 200
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "logged in to chatgpt.com as dev@example.com" in stdout
    params = issuer.authorize_requests[0]
    assert params["code_challenge_method"] == "S256" and params["response_type"] == "code"
    data = json.loads((home / "auth.json").read_text())
    assert data["auth_mode"] == "chatgpt" and data["OPENAI_API_KEY"]  # the exchanged API key
    # the Codex home given at login is remembered by the chatgpt profile
    rows = {r["profile"]: r for r in json.loads(wham(env, "status", "--json").stdout)}
    assert rows["chatgpt"]["auth_file"] == str(home / "auth.json") and rows["chatgpt"]["logged_in"]


# --------------------------------------------------------------------------- openwham profiles


@pytest.fixture
def served(server: Server) -> Iterator[tuple[Server, AppThread, str]]:
    """The in-process server also on a real port, for the ``wham`` process to reach."""
    thread = AppThread()
    url = thread.start(server.api.client.app)  # type: ignore[attr-defined]
    try:
        yield server, thread, url
    finally:
        thread.stop()


def test_logout_revokes_the_token_on_the_server(
    served: tuple[Server, AppThread, str], env: dict[str, str]
) -> None:
    server, _, url = served
    token = server.owner_token()
    login = wham(env, "login", "--server", url, "--token", token)
    assert login.returncode == 0, login.stderr
    assert server.api.as_(token).get("usage").status_code == 200

    out = wham(env, "logout")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"revoked the token on {url}; removed profile default ({url})")
    r = server.api.as_(token).get("usage")
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert "default" not in {p["profile"] for p in json.loads(wham(env, "status", "--json").stdout)}

    # a profile whose token the server already refuses: logged out all the same
    stale = server.owner_token()
    assert wham(env, "login", "--server", url, "--token", stale).returncode == 0
    assert server.api.delete(f"tokens/{jwt_claims(stale)['jti']}").status_code == 200
    again = wham(env, "logout", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["token"] == "already invalid"


def test_logout_with_the_server_unreachable_says_the_token_is_still_valid(
    served: tuple[Server, AppThread, str], env: dict[str, str]
) -> None:
    server, thread, url = served
    token = server.owner_token()
    assert wham(env, "login", "--server", url, "--token", token).returncode == 0
    thread.stop()  # the server is gone; its database (and the token's row) stay

    out = wham(env, "logout")
    assert out.returncode == 1
    token_id = jwt_claims(token)["jti"]
    assert out.stdout.strip() == f"removed profile default ({url})"
    (error,) = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert f"cannot reach {url}" in error
    assert "the token is still valid until " in error
    assert f"`wham token revoke {token_id}`" in error
    assert server.api.as_(token).get("usage").status_code == 200  # indeed still valid
    assert wham(env, "task", "list").returncode == 4  # this machine forgot it


def test_without_a_profile_the_hint_names_both_ways_to_log_in(env: dict[str, str]) -> None:
    for args in (["task", "list"], ["env", "list"], ["usage"]):
        out = wham(env, *args)
        assert out.returncode == 4, out.stderr
        hint = out.stderr.splitlines()[-1]
        assert hint.startswith("hint: ")
        assert "`wham login --server URL --token TOKEN`" in hint
        assert "`wham token create`" in hint
        assert "chatgpt.com with `wham login`" in hint
