"""MCP servers for the agent (issue 19): an environment's ``mcp_servers`` are validated,
written into the attempt's Codex config and started by the real Codex inside the sandbox;
the scripted model calls a tool of a stdio server built on the official ``mcp`` package, and
the call shows in the work log. A standby prepared with one environment's servers is never
used by another's."""

from __future__ import annotations

import html
import importlib.metadata as md
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from conftest import Api, Server, git, make_repo, wait_for_task
from openwham.runtimes.codex import codex_home_files
from support.browser import sign_in
from support.scripted_model import CallTool, Say, ScriptedModel, SearchTools
from test_standby import run_info, wait_standby

SERVER = '''\
"""A stdio MCP server for openwham's tests (the official mcp package, vendored beside it)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor"))

from mcp.server.fastmcp import FastMCP

app = FastMCP("notes")


@app.tool()
def shout(text: str) -> str:
    """Upper-case the text, and leave a note in the working directory."""
    with open("mcp-note.txt", "w") as note:
        note.write(f"{text} (uid {os.getuid()}, {os.environ.get('NOTE_TAG')})\\n")
    return text.upper() + "!"


if __name__ == "__main__":
    app.run()
'''


def _closure(root: str) -> list[md.Distribution]:
    """``root``'s distribution and every one it requires (this platform, no extras)."""
    seen: dict[str, md.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        dist = md.distribution(name)
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


@pytest.fixture(scope="module")
def vendored_mcp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``mcp`` package and its dependencies, copied from the test environment (the
    sandbox sees the system's Python, not the project's virtualenv)."""
    dest = tmp_path_factory.mktemp("vendor") / "vendor"
    for dist in _closure("mcp"):
        for file in dist.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue
            target = dest / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(str(file.locate())), target)
    assert (dest / "mcp" / "server" / "fastmcp").is_dir()
    return dest


@pytest.fixture
def mcp_repo(tmp_path: Path, vendored_mcp: Path) -> Path:
    repo = make_repo(tmp_path / "repo")
    tools = repo / "tools"
    tools.mkdir()
    (tools / "notes_server.py").write_text(SERVER)
    shutil.copytree(vendored_mcp, tools / "vendor")
    (repo / ".gitignore").write_text("__pycache__/\n")
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "an MCP server", cwd=repo)
    return repo


NOTES = {
    "command": "python3",
    "args": ["/workspace/tools/notes_server.py"],
    "env": {"NOTE_TAG": "tagged"},
    "startup_timeout_sec": 60,
    "required": True,
}


def _tool_names(request: dict[str, Any]) -> set[str]:
    """``namespace/tool`` of every namespaced tool offered to the model: in the request's
    tools, or found by a tool search (Codex defers MCP tools behind ``tool_search`` for
    models that support it, as the default one does)."""
    found = [
        tool
        for item in request.get("input") or []
        if item.get("type") == "tool_search_output"
        for tool in item.get("tools") or []
    ]
    return {
        f"{tool.get('name')}/{inner.get('name')}"
        for tool in [*(request.get("tools") or []), *found]
        if tool.get("type") == "namespace"
        for inner in tool.get("tools") or []
    }


# --------------------------------------------------------------------------- config


def test_codex_config_has_the_servers_and_waits_for_them() -> None:
    files = codex_home_files(
        base_url="http://127.0.0.1:1/v1",
        model="m",
        mcp_servers={
            "notes": {**NOTES, "cwd": "/workspace", "required": True, "tool_timeout_sec": 5},
            "docs": {"url": "https://mcp.example.com/mcp"},
        },
    )
    config = tomllib.loads(files["config.toml"])
    assert config["mcp_optional_startup_grace_ms"] == 0
    assert config["mcp_servers"] == {
        "notes": {
            "command": "python3",
            "args": ["/workspace/tools/notes_server.py"],
            "cwd": "/workspace",
            "env": {"NOTE_TAG": "tagged"},
            "startup_timeout_sec": 60.0,
            "tool_timeout_sec": 5.0,
            "required": True,
        },
        "docs": {"url": "https://mcp.example.com/mcp"},
    }
    plain = tomllib.loads(codex_home_files(base_url="http://x/v1", model="m")["config.toml"])
    assert "mcp_servers" not in plain and "mcp_optional_startup_grace_ms" not in plain


def test_values_cannot_break_out_of_the_config() -> None:
    """A quote, a newline-free TOML injection attempt in an argument or a variable stays a
    value: the file parses to exactly what was given."""
    nasty = 'x"\n[model_providers.evil]\nbase_url = "http://evil/v1'
    files = codex_home_files(
        base_url="http://127.0.0.1:1/v1",
        model="m",
        mcp_servers={"n": {"command": "sh", "args": [nasty], "env": {"V": nasty}}},
    )
    config = tomllib.loads(files["config.toml"])
    assert config["mcp_servers"]["n"]["args"] == [nasty]
    assert config["mcp_servers"]["n"]["env"] == {"V": nasty}
    assert set(config["model_providers"]) == {"openwham"}


# --------------------------------------------------------------------------- the API


def test_servers_are_stored_shown_and_replaced(api: Api, repo: Path) -> None:
    plain = api.create_env(repo)
    assert "mcp_servers" not in plain  # the captured shape, unchanged without servers
    env = api.create_env(repo, mcp_servers={"notes": NOTES})
    assert env["mcp_servers"]["notes"]["command"] == "python3"
    assert env["mcp_servers"]["notes"]["args"] == NOTES["args"]
    assert api.get(f"environments/{env['id']}").json()["mcp_servers"] == env["mcp_servers"]
    r = api.patch(f"environments/{env['id']}", json={"mcp_servers": {"other": {"command": "x"}}})
    assert r.status_code == 200, r.text
    assert list(r.json()["mcp_servers"]) == ["other"]
    r = api.patch(f"environments/{env['id']}", json={"mcp_servers": None})
    assert r.status_code == 200 and "mcp_servers" not in r.json()


@pytest.mark.parametrize(
    ("servers", "words"),
    [
        ({"bad name": {"command": "x"}}, "Invalid MCP server name"),
        ({"a" * 65: {"command": "x"}}, "Invalid MCP server name"),
        ({"n": {}}, "exactly one of command"),
        ({"n": {"command": "x", "url": "https://a/"}}, "exactly one of command"),
        ({"n": {"command": " "}}, "command must be 1 to"),
        ({"n": {"command": "a\nb"}}, "command must be 1 to"),
        ({"n": {"command": "x", "args": ["a\x00b"]}}, "NUL character"),
        ({"n": {"command": "x", "args": ["a"] * 65}}, "at most 64 arguments"),
        ({"n": {"command": "x", "cwd": "relative"}}, "absolute path"),
        ({"n": {"command": "x", "env": {"1BAD": "v"}}}, "invalid variable name"),
        ({"n": {"command": "x", "env": {"HOME": "/tmp"}}}, "reserved"),
        ({"n": {"command": "x", "startup_timeout_sec": 0}}, "startup_timeout_sec"),
        ({"n": {"command": "x", "tool_timeout_sec": 601}}, "tool_timeout_sec"),
        ({"n": {"url": "ftp://host/x"}}, "http:// or https://"),
        ({"n": {"url": "https://user:pw@host/x"}}, "credentials"),
        ({"n": {"url": "https://host/x", "args": ["a"]}}, "are for a stdio command"),
        ({"n": {"url": "https://host/x"}}, "turn agent_network_access on"),
        ({"n": {"command": "x", "typo": 1}}, "typo"),
        ({f"s{i}": {"command": "x"} for i in range(17)}, "At most 16"),
    ],
)
def test_bad_servers_are_refused_and_change_nothing(
    api: Api, repo: Path, servers: dict[str, Any], words: str
) -> None:
    before = api.get("environments").json()
    r = api.post("environments", json={"label": "x", "repos": [str(repo)], "mcp_servers": servers})
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"]
    assert api.get("environments").json() == before
    env = api.create_env(repo)
    r = api.patch(f"environments/{env['id']}", json={"mcp_servers": servers})
    assert r.status_code == 400 and words in r.json()["detail"]
    assert "mcp_servers" not in api.get(f"environments/{env['id']}").json()


def test_turning_network_off_under_an_http_server_is_refused(api: Api, repo: Path) -> None:
    on = {"mode": "on", "preset_allowlist": "none", "allowlist_domains": "mcp.example.com"}
    env = api.create_env(
        repo, agent_network_access=on, mcp_servers={"docs": {"url": "https://mcp.example.com/"}}
    )
    r = api.patch(f"environments/{env['id']}", json={"agent_network_access": {"mode": "off"}})
    assert r.status_code == 400 and "turn agent_network_access on" in r.json()["detail"]
    assert api.get(f"environments/{env['id']}").json()["agent_network_access"]["mode"] == "on"


# --------------------------------------------------------------------------- end to end


def test_the_agent_calls_a_stdio_server_inside_the_sandbox(
    engine_server: Server, scripted_model: ScriptedModel, mcp_repo: Path
) -> None:
    api = engine_server.api
    env = api.create_env(mcp_repo, mcp_servers={"notes": NOTES})
    scripted_model.script = [
        SearchTools("shout notes"),
        CallTool("shout", {"text": "hello from the model"}, namespace="mcp__notes"),
        Say("The server answered."),
    ]
    created = api.create_task(env["id"], "Use the notes server")
    details = wait_for_task(api, created["task"]["id"], timeout=180)
    turn = details["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    assert "mcp__notes/shout" in _tool_names(scripted_model.requests[1])

    # the tool's answer went back to the model ...
    outputs = [
        item
        for item in scripted_model.requests[-1]["input"]
        if item.get("type") == "function_call_output"
    ]
    assert "HELLO FROM THE MODEL!" in str(outputs)
    # ... the call is in the work log ...
    log = str(turn["worklog"])
    assert "notes.shout" in log and "HELLO FROM THE MODEL!" in log
    # ... and the server ran in the attempt's sandbox: its note is in the attempt's diff,
    # written as the sandbox's unprivileged user with the configured variable
    diff = api.get(f"tasks/{created['task']['id']}/turns/{turn['id']}/diff").text
    assert "+++ b/mcp-note.txt" in diff
    assert "+hello from the model (uid " in diff and ", tagged)" in diff
    assert "(uid 0," not in diff


def _run(server: Server, env_id: str, prompt: str) -> dict[str, Any]:
    created = server.api.create_task(env_id, prompt)
    turn = wait_for_task(server.api, created["task"]["id"], timeout=180)["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    return run_info(server, turn["id"])


def test_a_standby_with_one_environments_servers_is_not_used_by_another(
    standby_server: Server, scripted_model: ScriptedModel, mcp_repo: Path
) -> None:
    """The servers are part of the standby key: a task of an environment without them (same
    repository, branch and settings) must not get a Codex started with them."""
    api = standby_server.api
    with_servers = api.create_env(mcp_repo, mcp_servers={"notes": NOTES}, label="with")
    without = api.create_env(mcp_repo, label="without")
    scripted_model.script = [SearchTools("shout notes"), Say("done")]
    _run(standby_server, with_servers["id"], "first")
    wait_standby(standby_server, timeout=120)
    # the same environment again: the standby, with its servers, is taken
    scripted_model.requests.clear()
    assert _run(standby_server, with_servers["id"], "second")["standby"] is True
    assert "mcp__notes/shout" in _tool_names(scripted_model.requests[-1])
    wait_standby(standby_server, timeout=120)
    # another environment of the same repository without servers: not that standby
    scripted_model.requests.clear()
    assert _run(standby_server, without["id"], "third")["standby"] is False
    assert scripted_model.requests
    assert all("mcp__notes/shout" not in _tool_names(r) for r in scripted_model.requests)


# --------------------------------------------------------------------------- the web UI


def test_the_environment_page_edits_the_servers_as_json(server: Server, repo: Path) -> None:
    client = server.api.client
    csrf = sign_in(client, server.api.token or "")
    form = {"csrf": csrf, "label": "tools", "repos": str(repo)}
    bad = client.post("/environments", data=form | {"mcp_servers": "{not json"})
    assert bad.status_code == 400 and "MCP servers: not valid JSON" in bad.text
    bad = client.post(
        "/environments", data=form | {"mcp_servers": '{"bad name": {"command": "x"}}'}
    )
    assert bad.status_code == 400 and "Invalid MCP server name" in bad.text
    assert server.api.get("environments").json() == []
    servers = {"notes": {"command": "python3", "args": ["/workspace/tools/notes_server.py"]}}
    made = client.post(
        "/environments", data=form | {"mcp_servers": json.dumps(servers)}, follow_redirects=False
    )
    assert made.status_code == 303, made.text
    (env,) = server.api.get("environments").json()
    assert env["mcp_servers"]["notes"]["args"] == servers["notes"]["args"]
    page = client.get(f"/environments/{env['id']}").text
    shown = re.search(r'<textarea id="mcp_servers"[^>]*>(.*?)</textarea>', page, re.S)
    assert shown is not None and json.loads(html.unescape(shown.group(1))) == servers
    # emptied: the servers are removed
    r = client.post(
        f"/environments/{env['id']}",
        data=form | {"mcp_servers": ""},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    assert "mcp_servers" not in server.api.get(f"environments/{env['id']}").json()


HTTP_SERVER = """
import sys
from mcp.server.fastmcp import FastMCP

app = FastMCP("remote", host=sys.argv[1], port=int(sys.argv[2]))


@app.tool()
def whisper(text: str) -> str:
    \"\"\"Lower-case the text (served over HTTP from the test host).\"\"\"
    return text.lower() + " (from the test host)"


app.run(transport="streamable-http")
"""


@pytest.fixture
def http_mcp(net_host: Any) -> Iterator[int]:
    """A streamable-HTTP MCP server (the official ``mcp`` package) on the test host, in its
    network namespace: reachable only through the egress proxy; yields its port."""
    port = 8082
    server = subprocess.Popen(
        [
            *("ip", "netns", "exec", net_host.name, sys.executable, "-c", HTTP_SERVER),
            *(net_host.address, str(port)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((net_host.address, port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no MCP server"
                time.sleep(0.1)
        yield port
    finally:
        server.kill()
        server.wait()


def test_an_http_server_is_reached_through_the_agents_egress_policy(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path, net_host: Any, http_mcp: int
) -> None:
    """An ``{url}`` server on an allowed name: Codex reaches it through the egress proxy and
    the model calls its tool; the same server under a name the policy refuses is never
    reached (403 at the proxy, a deny event naming the reason) and, as a required server,
    fails the attempt with the proxy's reason in its error."""
    from test_agent_network import ALLOWED, OTHER, answer_names, on

    answer_names(engine_server, net_host)
    api = engine_server.api
    allowed = api.create_env(
        repo,
        agent_network_access=on(ALLOWED),
        mcp_servers={"remote": {"url": f"http://{ALLOWED}:{http_mcp}/mcp"}},
    )
    scripted_model.script = [
        SearchTools("whisper remote"),
        CallTool("whisper", {"text": "HELLO THROUGH THE PROXY"}, namespace="mcp__remote"),
        Say("The remote server answered."),
    ]
    created = api.create_task(allowed["id"], "Use the remote server")
    turn = wait_for_task(api, created["task"]["id"], timeout=180)["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    assert "mcp__remote/whisper" in _tool_names(scripted_model.requests[1])
    assert "hello through the proxy (from the test host)" in str(scripted_model.requests[-1])
    assert "remote.whisper" in str(turn["worklog"])
    seen = {(e["decision"], e["domain"], e["port"]) for e in turn["proxy_events"]}
    assert seen == {("allow", ALLOWED, http_mcp)}

    refused = api.create_env(
        repo,
        label="refused",
        agent_network_access=on(ALLOWED),
        mcp_servers={"remote": {"url": f"http://{OTHER}:{http_mcp}/mcp", "required": True}},
    )
    scripted_model.requests.clear()
    scripted_model.script = [SearchTools("whisper remote"), Say("No remote server.")]
    created = api.create_task(refused["id"], "Use the remote server")
    turn = wait_for_task(api, created["task"]["id"], timeout=180)["current_assistant_turn"]
    # required: Codex does not start without it, and the attempt's error says why
    assert turn["turn_status"] == "failed"
    message = turn["error"]["message"]
    assert "required MCP servers failed to initialize: remote" in message, message
    assert f"HTTP 403: openwham egress proxy: {OTHER} is not on the allowlist" in message
    assert all("mcp__remote/whisper" not in _tool_names(r) for r in scripted_model.requests)
    denied = [e for e in turn["proxy_events"] if e["decision"] == "deny"]
    assert denied and {e["domain"] for e in denied} == {OTHER}
    assert all(e["reason"] == f"{OTHER} is not on the allowlist" for e in denied)
