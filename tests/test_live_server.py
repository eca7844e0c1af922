"""`wham serve`, `wham token create` and `wham codex-auth` as real processes over real HTTP."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import httpx
import jwt
import pytest

from conftest import PREFIXES, WHAM, LiveServer, start_live_server

REFERENCE_BODY = {
    "new_task": {"environment_id": "", "branch": "main", "run_environment_in_qa_mode": False},
    "input_items": [
        {"type": "message", "role": "user", "content": [{"content_type": "text", "text": "ping"}]},
        {
            "type": "pre_apply_patch",
            "output_diff": {
                "diff": "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n"
                "@@ -1 +1,2 @@\n # widgets\n+more\n"
            },
        },
    ],
    "metadata": {"best_of_n": 3},
}


def _client(srv: LiveServer, token: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.mark.sandbox  # its server runs attempts
@pytest.mark.parametrize("prefix", PREFIXES)
def test_reference_flow_over_http(live_server: LiveServer, repo: Path, prefix: str) -> None:
    token = live_server.token()
    with _client(live_server, token) as c:
        env = c.post(f"{prefix}/environments", json={"label": "acme/widgets", "repos": [str(repo)]})
        assert env.status_code == 201, env.text
        body = json.loads(json.dumps(REFERENCE_BODY))
        body["new_task"]["environment_id"] = env.json()["id"]
        r = c.post(f"{prefix}/tasks", json=body)
        assert r.status_code == 200, r.text
        created = r.json()
        assert set(created) == {"task", "user_turn", "turn", "rate_limit"}
        task_id = created["task"]["id"]
        patch_item = created["user_turn"]["input_items"][1]
        assert patch_item["type"] == "pre_apply_patch"
        assert patch_item["output_diff"]["lines_added"] == 1

        listed = c.get(f"{prefix}/tasks/list", params={"limit": 20, "task_filter": "current"})
        assert [i["id"] for i in listed.json()["items"]] == [task_id]
        details = c.get(f"{prefix}/tasks/{task_id}").json()
        turn_id = details["current_assistant_turn"]["id"]
        assert details["task"]["id"] == task_id
        mapping = c.get(f"{prefix}/tasks/{task_id}/turns").json()
        assert len(mapping["turn_mapping"]) == 4  # one user turn, three attempts
        sibs = c.get(f"{prefix}/tasks/{task_id}/turns/{turn_id}/sibling_turns").json()
        assert [t["attempt_placement"] for t in sibs["sibling_turns"]] == [1, 2]

        for action in ("archive", "unarchive", "mark_read", "cancel"):
            assert c.post(f"{prefix}/tasks/{task_id}/{action}").json()["success"] is True
        assert c.delete(f"{prefix}/tasks/{task_id}").json() == {"success": True}
        assert c.get(f"{prefix}/tasks/{task_id}").status_code == 404

        assert c.get(f"{prefix}/usage").json()["plan_type"] == "pro"
        assert httpx.get(f"{live_server.url}{prefix}/tasks/list").status_code == 401


def test_openapi_is_served(live_server: LiveServer) -> None:
    doc = httpx.get(f"{live_server.url}/openapi.json").json()
    for prefix in PREFIXES:
        assert f"{prefix}/tasks" in doc["paths"]
        assert f"{prefix}/tasks/{{task_id}}/turns/{{turn_id}}/sibling_turns" in doc["paths"]
    assert "CreateTaskRequest" in doc["components"]["schemas"]


@pytest.mark.sandbox  # its server runs attempts
def test_data_survives_a_restart(tmp_path: Path, repo: Path) -> None:
    data = tmp_path / "data"
    first = start_live_server(data)
    try:
        token = first.token()
        with _client(first, token) as c:
            env = c.post("/api/codex/environments", json={"label": "x/y", "repos": [str(repo)]})
            body = json.loads(json.dumps(REFERENCE_BODY))
            body["new_task"]["environment_id"] = env.json()["id"]
            task_id = c.post("/api/codex/tasks", json=body).json()["task"]["id"]
    finally:
        first.process.terminate()
        first.process.wait(10)
    second = start_live_server(data)
    try:
        with _client(second, token) as c:  # same keys and owner: the old token still works
            assert c.get(f"/api/codex/tasks/{task_id}").status_code == 200
    finally:
        second.process.terminate()
        second.process.wait(10)


def test_token_create_json_and_claims(tmp_path: Path) -> None:
    data = tmp_path / "d"
    out = subprocess.run(
        [str(WHAM), "token", "create", "--data-dir", str(data), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    info = json.loads(out.stdout)
    claims = jwt.decode(info["token"], options={"verify_signature": False})
    auth = claims["https://api.openai.com/auth"]
    assert auth["chatgpt_account_id"] == info["account_id"]
    assert auth["chatgpt_user_id"] == info["user_id"]
    assert auth["chatgpt_plan_type"] == "pro"
    assert claims["exp"] == info["expires_at"]
    # the same owner account on every call
    again = subprocess.run(
        [str(WHAM), "token", "create", "--data-dir", str(data), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(again.stdout)["account_id"] == info["account_id"]
    keys = data / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for key in keys.iterdir():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_codex_auth_writes_auth_json(live_server: LiveServer, tmp_path: Path) -> None:
    token = live_server.token()
    home = tmp_path / "codex-home"
    subprocess.run(
        [
            str(WHAM),
            "codex-auth",
            "--server",
            live_server.url,
            "--token",
            token,
            "--codex-home",
            str(home),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    auth_file = home / "auth.json"
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    auth = json.loads(auth_file.read_text())
    assert auth["auth_mode"] == "chatgpt" and auth["OPENAI_API_KEY"] is None
    assert auth["tokens"]["access_token"] == token == auth["tokens"]["id_token"]
    account = jwt.decode(token, options={"verify_signature": False})["https://api.openai.com/auth"][
        "chatgpt_account_id"
    ]
    assert auth["tokens"]["account_id"] == account
    assert "last_refresh" in auth
    assert (
        f'chatgpt_base_url = "{live_server.url}/backend-api/"' in (home / "config.toml").read_text()
    )
    # the written credentials work against the server, as the Codex CLI would send them
    r = httpx.get(
        f"{live_server.url}/backend-api/wham/accounts/check",
        headers={
            "Authorization": f"Bearer {auth['tokens']['access_token']}",
            "ChatGPT-Account-Id": auth["tokens"]["account_id"],
        },
    )
    assert r.status_code == 200
    assert r.json()["accounts"][0]["workspace_backend_origin"] == live_server.url


def test_codex_auth_rejects_bad_input(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            str(WHAM),
            "codex-auth",
            "--server",
            "ftp://x",
            "--token",
            "t",
            "--codex-home",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [
            str(WHAM),
            "codex-auth",
            "--server",
            "http://x",
            "--token",
            "nope",
            "--codex-home",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "not an openwham API token" in r.stderr
    assert not (tmp_path / "auth.json").exists()


def test_serve_json_prints_its_addresses(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(WHAM), "serve", "--port", "0", "--json", "--data-dir", str(tmp_path / "d")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["url"].startswith("http://127.0.0.1:")
        assert info["api"] == [f"{info['url']}/backend-api/wham", f"{info['url']}/api/codex"]
        assert info["data_dir"] == str(tmp_path / "d")
    finally:
        proc.terminate()
        proc.wait(20)
