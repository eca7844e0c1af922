"""``wham login`` (browser PKCE and device code), ``status`` and ``logout`` as a user runs them,
against the stand-in issuer (the real one is unreachable here)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import WHAM
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
