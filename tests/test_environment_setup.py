"""Environments at work: the setup script (variables, secrets, network through the egress
proxy, its log) and then the agent phase (variables only, no network), with the real Codex
CLI against the scripted model. The outside world is a test host in its own network
namespace (support/nethost.py); host services are TCP listeners on this host's loopback
and on its own address on the test network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, parse_sse, wait_for_task
from support.scripted_model import Say, ScriptedModel, Shell
from test_egress import Listener
from test_engine import commands

SECRET = "tok-5ecret-VALUE-42"
SECRET_SHA = hashlib.sha256(SECRET.encode()).hexdigest()


def setup_script(net_host: Any, loopback: Listener, on_host: Listener) -> list[str]:
    return [
        'echo "setting up in $PWD as $(id -un)"',
        f"curl -sS --max-time 10 -o ~/hello.txt {net_host.url('hello.txt')}",
        'echo "fetched: $(cat ~/hello.txt)"',
        'printf %s "$API_TOKEN" | sha256sum',
        'echo "the token is $API_TOKEN"',
        'echo "MY_VAR=$MY_VAR"',
        "printf '%s\\n' \"$API_TOKEN\" > ~/token.txt",
        f"for url in http://127.0.0.1:{loopback.port}/ "
        f"http://{net_host.host_side}:{on_host.port}/; do",
        '  curl -sS --max-time 5 --noproxy \'\' -o /dev/null -w "%{http_code} $url\\n" "$url"',
        "done",
        f"curl -sS --max-time 5 http://127.0.0.1:{loopback.port}/ >/dev/null 2>&1 "
        "|| echo 'loopback: nothing there'",
        f"curl -sS --max-time 5 --noproxy '*' {net_host.url('hello.txt')} >/dev/null 2>&1 "
        "|| echo 'direct: no way out'",
        "echo setup done",
    ]


def agent_script(net_host: Any, loopback: Listener) -> list[Any]:
    url = net_host.url("hello.txt")
    return [
        Shell(
            "cat ~/hello.txt; cat ~/token.txt; "
            "env | grep -E '^(MY_VAR|API_TOKEN|https?_proxy)=' ; echo env-done"
        ),
        Shell(
            f"curl -sS --max-time 5 {url} 2>&1; echo exit=$?; "
            f"curl -sS --max-time 5 --proxy http://127.0.0.1:3128 {url} 2>&1; echo exit=$?; "
            f"curl -sS --max-time 5 http://127.0.0.1:{loopback.port}/ 2>&1; echo exit=$?"
        ),
        Shell("cp ~/token.txt leaked.txt && echo copied"),
        Say(f"Done. By the way, the token was {SECRET}."),
    ]


@pytest.fixture
def listeners(net_host: Any) -> Any:
    loopback, on_host = Listener("127.0.0.1"), Listener(net_host.host_side)
    yield loopback, on_host
    loopback.close()
    on_host.close()


def test_setup_has_secrets_and_network_the_agent_has_neither_and_secrets_stay_hidden(
    engine_server: Server,
    scripted_model: ScriptedModel,
    repo: Path,
    net_host: Any,
    listeners: tuple[Listener, Listener],
) -> None:
    api = engine_server.api
    loopback, on_host = listeners
    scripted_model.script = agent_script(net_host, loopback)
    env = api.create_env(
        repo,
        setup=setup_script(net_host, loopback, on_host),
        env_vars={"MY_VAR": "plain-value"},
        secrets={"API_TOKEN": SECRET},
    )
    created = api.create_task(env["id"], "Look around")
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    details = wait_for_task(api, task_id)
    turn = details["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]

    # the setup log: served by the turn, by the task, and on the stream
    (ref,) = turn["logs"]["logs"]
    assert ref["key"]["type"] == "UserSetupScript"
    assert ref["key"]["name"].startswith("userscript_") and ref["value"].startswith("file_")
    r = api.get(f"tasks/{task_id}/turns/{turn_id}/logs")
    assert r.status_code == 200, r.text
    lines = [entry["line"] for entry in r.json()["logs"]]
    assert all(entry["key"] == ref["key"] for entry in r.json()["logs"])
    assert lines[0] == "setting up in /workspace as openwham"
    assert "fetched: hello from the test host" in lines  # setup reached the outside host
    assert f"{SECRET_SHA}  -" in lines  # the secret was there ...
    assert "the token is [redacted]" in lines  # ... and is shown redacted
    assert "MY_VAR=plain-value" in lines
    assert f"403 http://127.0.0.1:{loopback.port}/" in lines  # host loopback: refused
    assert f"403 http://{net_host.host_side}:{on_host.port}/" in lines  # host address: refused
    assert "loopback: nothing there" in lines  # the sandbox's own loopback
    assert "direct: no way out" in lines  # only the proxy leads out
    assert lines[-1] == "setup done"
    task_logs = api.get(f"tasks/{task_id}/logs").json()["logs"]
    assert [e["message"] for e in task_logs if e["source"] == "setup"] == lines
    frames = parse_sse(api.get(f"tasks/{task_id}/turns/{turn_id}/stream").text)
    streamed = [f["data"]["payload"]["line"] for f in frames if f["data"]["item_type"] == "log"]
    assert streamed == lines

    # the proxy's audit of setup's requests
    decisions = [(e["decision"], e["method"], e["domain"]) for e in turn["proxy_events"]]
    assert ("allow", "GET", net_host.address) in decisions
    assert ("deny", "GET", "127.0.0.1") in decisions
    assert ("deny", "GET", net_host.host_side) in decisions
    assert loopback.connections == 0 and on_host.connections == 0

    # the agent phase: setup's files and the variables, no secret, no network
    outputs = [out["content"]["parts"][0] for _, out in commands(turn)]
    assert "hello from the test host" in outputs[0]
    assert "[redacted]" in outputs[0] and "MY_VAR=plain-value" in outputs[0]
    assert "API_TOKEN=" not in outputs[0] and "_proxy=" not in outputs[0]
    assert "hello from the test host" not in outputs[1]
    exits = [line for line in outputs[1].splitlines() if line.startswith("exit=")]
    assert len(exits) == 3 and "exit=0" not in exits, outputs[1]
    assert loopback.connections == 0

    # the secret appears nowhere: messages, work log, diff, logs, stream, database
    (message, pr) = turn["output_items"]
    assert message["content"][0]["text"] == "Done. By the way, the token was [redacted]."
    assert "+[redacted]" in pr["output_diff"]["diff"]
    seen = [
        json.dumps(details),
        api.get(f"tasks/{task_id}/turns/{turn_id}").text,
        api.get(f"tasks/{task_id}/turns").text,
        api.get(f"tasks/{task_id}/turns/{turn_id}/logs").text,
        api.get(f"tasks/{task_id}/logs").text,
        api.get(f"tasks/{task_id}/turns/{turn_id}/stream").text,
        api.get("tasks/list").text,
        api.get(f"environments/{env['id']}").text,
    ]
    for text in seen:
        assert SECRET not in text
    data_dir = engine_server.app_state.settings.resolved_data_dir
    for path in data_dir.glob("openwham.db*"):
        assert SECRET.encode() not in path.read_bytes(), path


def test_a_failing_setup_fails_the_attempt_with_its_exit_code_and_keeps_its_log(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    api = engine_server.api
    scripted_model.script = [Say("never asked")]
    env = api.create_env(repo, setup=["echo preparing", "false", "echo not reached"])
    created = api.create_task(env["id"], "Anything")
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    turn = wait_for_task(api, task_id)["current_assistant_turn"]
    assert turn["turn_status"] == "failed"
    assert turn["error"] == {
        "code": "setup_failed",
        "message": "The setup script exited with code 1 (see the setup log)",
    }
    lines = [e["line"] for e in api.get(f"tasks/{task_id}/turns/{turn_id}/logs").json()["logs"]]
    assert lines == ["preparing"]
    assert scripted_model.requests == []  # the agent never started


def test_reserved_variable_names_are_refused(engine_server: Server, repo: Path) -> None:
    api = engine_server.api
    for field, name in (
        ("env_vars", "HOME"),
        ("secrets", "https_proxy"),
        ("env_vars", "OPENWHAM_X"),
    ):
        r = api.post("environments", json={"label": "x", "repos": [str(repo)], field: {name: "v"}})
        assert r.status_code == 400 and "reserved" in r.json()["detail"], r.text


# Prints a value in each encoding a script could leak it in, each inside a longer stream
# (so base64 is tested at its three alignments), one ``label form`` per line.
ENCODE = """\
import base64, json, sys, urllib.parse as u
v = sys.argv[1]
b = v.encode()
for lead in (b"", b"x", b"xy"):
    print("b64", base64.b64encode(lead + b + b"tail").decode())
    print("b64url", base64.urlsafe_b64encode(lead + b + b"tail").decode())
print("hex", "<" + b.hex() + ">")
print("HEX", "<" + b.hex().upper() + ">")
print("url", "q=" + u.quote(v, safe="") + "&x")
print("url+", "q=" + u.quote_plus(v) + "&x")
print("json", json.dumps({"k": v}))
print("json8", json.dumps({"k": v}, ensure_ascii=False))
print("rev", "<" + v[::-1] + ">")
"""
LABELS = ["b64", "b64url"] * 3 + ["hex", "HEX", "url", "url+", "json", "json8", "rev"]
ODD_SECRET = 'Pw/5e "q"+&\u00e9~42!'  # encodes differently in each form


def encoded_lines(text: str) -> list[str]:
    """The ENCODE output lines in ``text`` (a log or a command's output), in order."""
    labels = set(LABELS)
    return [line for line in text.splitlines() if line.split(" ", 1)[0] in labels]


def plain_forms(value: str) -> list[str]:
    """What ENCODE prints, computed here, unredacted: none of it may be seen."""
    import base64
    import urllib.parse as u

    b = value.encode()
    out = []
    for lead in (b"", b"x", b"xy"):
        out.append(base64.b64encode(lead + b + b"tail").decode())
        out.append(base64.urlsafe_b64encode(lead + b + b"tail").decode())
    out += [b.hex(), b.hex().upper(), u.quote(value, safe=""), u.quote_plus(value)]
    out += [json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1], value[::-1]]
    return out


def assert_redacted(lines: list[str], where: str) -> None:
    """Each ENCODE line has the mark and keeps at most a few characters of context."""
    assert [line.split(" ", 1)[0] for line in lines] == LABELS, (where, lines)
    for line in lines:
        form = line.split(" ", 1)[1]
        assert "[redacted]" in form, (where, line)
        assert len(form.replace("[redacted]", "")) <= 12, (where, line)


def test_encoded_secrets_are_redacted_in_logs_work_log_stream_task_json_and_web_ui(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    """base64 (three alignments), base64url, hex, URL and JSON forms and the reversed value
    of a secret, printed by the setup script and by the agent, show up as [redacted]."""
    import html
    import shlex

    from test_web_ui import sign_in

    api = engine_server.api
    encode = f"python3 -c {shlex.quote(ENCODE)}"
    scripted_model.script = [
        Shell(f'{encode} "$(cat ~/odd.txt)"; {encode} "$(cat ~/token.txt)"'),
        Say("Printed them."),
    ]
    env = api.create_env(
        repo,
        setup=[
            f'{encode} "$ODD_TOKEN"',
            f'{encode} "$API_TOKEN"',
            'printf %s "$ODD_TOKEN" > ~/odd.txt',
            'printf %s "$API_TOKEN" > ~/token.txt',
        ],
        secrets={"API_TOKEN": SECRET, "ODD_TOKEN": ODD_SECRET},
    )
    created = api.create_task(env["id"], "Print the encodings")
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    details = wait_for_task(api, task_id)
    turn = details["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]

    setup = [e["line"] for e in api.get(f"tasks/{task_id}/turns/{turn_id}/logs").json()["logs"]]
    assert_redacted(encoded_lines("\n".join(setup))[: len(LABELS)], "setup log (odd)")
    assert_redacted(encoded_lines("\n".join(setup))[len(LABELS) :], "setup log (token)")
    (output,) = [out["content"]["parts"][0] for _, out in commands(turn)]
    assert_redacted(encoded_lines(output)[: len(LABELS)], "work log (odd)")
    assert_redacted(encoded_lines(output)[len(LABELS) :], "work log (token)")

    sign_in(api.client, api.token or "")
    seen = {
        "task": json.dumps(details),
        "turn": api.get(f"tasks/{task_id}/turns/{turn_id}").text,
        "logs": api.get(f"tasks/{task_id}/logs").text,
        "stream": api.get(f"tasks/{task_id}/turns/{turn_id}/stream").text,
        "web": html.unescape(api.client.get(f"/tasks/{task_id}").text),
    }
    forms = plain_forms(SECRET) + plain_forms(ODD_SECRET) + [SECRET, ODD_SECRET]
    for where, text in seen.items():
        for form in forms:
            assert form not in text, (where, form)
            assert json.dumps(form)[1:-1] not in text, (where, form)  # as JSON carries it
    assert "b64 " in seen["web"] and "[redacted]" in seen["web"]


def test_redaction_of_encodings_at_every_offset_and_its_short_secret_floor() -> None:
    """The matching itself: base64 of a value anywhere in a stream (any prefix length, any
    bytes around it), and the floor below which only the value itself is matched (a 3-letter
    secret's base64 would blank out unrelated base64 everywhere)."""
    import base64
    import os

    from openwham.redaction import MIN_ENCODED, Redactor, secrets_in_diff

    redactor = Redactor({"API_TOKEN": SECRET, "ODD_TOKEN": ODD_SECRET})
    for value in (SECRET, ODD_SECRET):
        for lead in range(7):
            stream = os.urandom(lead) + value.encode() + os.urandom(5)
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                text = encode(stream).decode()
                redacted = redactor.text(text)
                assert "[redacted]" in redacted, (lead, text)
                left = len(redacted.replace("[redacted]", ""))  # the random bytes around
                assert left <= (lead + 5) * 4 // 3 + 4, (lead, redacted)
    assert redactor.names_in(f"x {SECRET.encode().hex().upper()} y") == ["API_TOKEN"]
    short = Redactor(["abc"])
    assert MIN_ENCODED == 6 and short.text("abc YWJj 616263 cba") == "[redacted] YWJj 616263 cba"
    diff = (
        "diff --git a/a.txt b/a.txt\n+plain\n"
        f"diff --git a/b.txt b/b.txt\n+{base64.b64encode(SECRET.encode()).decode()}\n"
        f"diff --git a/c_{SECRET}.txt b/c_{SECRET}.txt\n+x\n"
    )
    assert secrets_in_diff(redactor, diff) == [
        {"secret": "API_TOKEN", "file": "b.txt"},
        {"secret": "API_TOKEN", "file": "c_[redacted].txt"},
    ]
