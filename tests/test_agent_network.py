"""Agent internet access (issue 19): the agent phase's own egress session, decided by the
environment's ``agent_network_access`` with the address guard, audited as the turn's
``proxy_events``; the real Codex CLI runs the scripted model's commands in the sandbox. The
outside world is a test host in its own network namespace (support/nethost.py), reached by
names the egress proxy answers itself (``EgressProxy.hosts``, the tests' stand-in for DNS);
host services are TCP listeners on this host's loopback and its address on the test network.
"""

from __future__ import annotations

import datetime
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, wait_for_task
from openwham.client.sse import network_text
from openwham.runtimes import codex
from openwham.sandbox.egress import SAFE_METHODS, agent_policy, common_dependencies
from openwham.store import events as store_events
from support.browser import sign_in
from support.scripted_model import Say, ScriptedModel, Shell
from test_egress import Listener
from test_engine import commands
from test_standby import engine_of, run_info, wait_standby

ALLOWED, OTHER, DEEP = "pkgs.allowed.test", "other.test", "mirror.zone.test"
PROXY = f"http://127.0.0.1:{codex.EGRESS_PORT}"


def on(domains: str = ALLOWED, preset: str = "none", safe: bool | None = None) -> dict[str, Any]:
    return {
        "mode": "on",
        "preset_allowlist": preset,
        "allowlist_domains": domains,
        "safe_methods_only": safe,
    }


def answer_names(server: Server, net_host: Any) -> None:
    """The egress proxy answers the test names with the test host's address."""
    hosts = engine_of(server).workspaces.egress.hosts
    hosts.update({name: net_host.address for name in (ALLOWED, OTHER, DEEP, "zone.test")})


def code(url: str, *flags: str) -> str:
    """A curl that prints ``<http code> <url>`` (000 when no answer came)."""
    extra = " ".join(flags)
    return (
        f"curl -sS --max-time 10 {extra} -o /dev/null -w '%{{http_code}} {url}\\n' {url} "
        f"2>/dev/null || echo 'failed {url}'"
    )


def outputs(turn: dict[str, Any]) -> list[str]:
    return [out["content"]["parts"][0] for _, out in commands(turn)]


def run(server: Server, model: ScriptedModel, env_id: str, script: list[Any]) -> dict[str, Any]:
    model.script = script
    created = server.api.create_task(env_id, "Use the network")
    turn = wait_for_task(server.api, created["task"]["id"], timeout=180)["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    return dict(turn)


@pytest.fixture
def listeners(net_host: Any) -> Iterator[tuple[Listener, Listener]]:
    loopback, on_host = Listener("127.0.0.1"), Listener(net_host.host_side)
    yield loopback, on_host
    loopback.close()
    on_host.close()


def test_policies_resolve_presets_wildcards_and_methods() -> None:
    listed = common_dependencies()
    assert len(listed) == 71 and len(set(listed)) == 71
    assert {"pypi.org", "githubusercontent.com", "hex.pm", "yarnpkg.com"} <= set(listed)
    exact = agent_policy("none", ["example.com", "*.zone.test"], False)
    assert exact.refusal("GET", "example.com") is None
    assert exact.refusal("GET", "www.example.com") is not None  # exact means exact
    assert exact.refusal("GET", "a.b.zone.test") is None
    assert exact.refusal("GET", "zone.test") is not None  # *. is for subdomains
    assert exact.refusal("GET", "zone.test.evil.com") is not None
    assert exact.refusal("POST", "example.com") is None
    common = agent_policy("common_dependencies", ["example.com"], True)
    assert common.refusal("GET", "raw.githubusercontent.com") is None  # the preset's zones
    assert common.refusal("GET", "pypi.org") is None
    assert common.refusal("GET", "example.com") is None
    assert common.refusal("GET", "example.org") is not None
    assert common.refusal("POST", "pypi.org") == "method POST is not allowed"
    assert common.refusal("CONNECT", "pypi.org") is None  # HTTPS: by its host name
    assert common.methods == SAFE_METHODS
    anything = agent_policy("all", [], False)
    assert anything.refusal("DELETE", "anything.example") is None


def test_codex_config_reflects_the_policy() -> None:
    off = codex.codex_home_files(base_url="http://x/v1", model="m")["config.toml"]
    assert "[sandbox_workspace_write]\nnetwork_access = false" in off
    assert "HTTP proxy" not in off and codex.NO_NETWORK_NOTE in off
    files = codex.codex_home_files(
        base_url="http://x/v1", model="m", network="the environment allows pypi.org."
    )
    assert "[sandbox_workspace_write]\nnetwork_access = true" in files["config.toml"]
    assert "the environment allows pypi.org." in files["config.toml"]
    assert "the environment allows pypi.org." in files["ask.config.toml"]


def test_bad_policies_are_refused_and_change_nothing(engine_server: Server, repo: Path) -> None:
    api = engine_server.api
    env = api.create_env(repo, agent_network_access=on("a.example.com, *.b.example.com"))
    stored = env["agent_network_access"]
    assert stored["allowlist_domains"] == "a.example.com\n*.b.example.com"
    bad = [
        {"mode": "maybe"},
        {"mode": "on", "preset_allowlist": "everything"},
        on("http://example.com/"),
        on("exa mple..com"),
        on("*"),
        on("10.0.0.1"),
        on("*.*.example.com"),
        on("localhost"),
        on(" ".join(f"d{i}.example.com" for i in range(501))),
    ]
    for policy in bad:
        r = api.post(
            "environments",
            json={"label": "bad", "repos": [str(repo)], "agent_network_access": policy},
        )
        assert r.status_code == 400, (policy, r.text)
        assert "agent_network_access" in r.json()["detail"], r.text
        r = api.patch(f"environments/{env['id']}", json={"agent_network_access": policy})
        assert r.status_code in (400, 422), (policy, r.text)
    assert api.get(f"environments/{env['id']}").json()["agent_network_access"] == stored
    labels = [e["label"] for e in api.get("environments").json()]
    assert "bad" not in labels


def test_the_allowlist_lets_the_agent_reach_listed_hosts_only_and_audits_every_request(
    engine_server: Server,
    scripted_model: ScriptedModel,
    repo: Path,
    net_host: Any,
) -> None:
    answer_names(engine_server, net_host)
    env = engine_server.api.create_env(
        repo, agent_network_access=on(f"{ALLOWED} *.zone.test", safe=True)
    )
    port = net_host.port
    turn = run(
        engine_server,
        scripted_model,
        env["id"],
        [
            Shell("env | grep -E '^(https?_proxy|npm_config_proxy|CARGO_HTTP_PROXY)=' | sort"),
            Shell(f"curl -sS --max-time 10 http://{ALLOWED}:{port}/hello.txt"),
            Shell(  # CONNECT, as HTTPS goes: decided by the host name
                f"curl -sS --max-time 10 -p http://{DEEP}:{port}/hello.txt; "
                + code(f"http://{OTHER}:{port}/hello.txt", "-p")
            ),
            Shell(
                code(f"http://{OTHER}:{port}/hello.txt")
                + "; "
                + code(f"http://zone.test:{port}/hello.txt")
                + "; "
                + code(f"http://{ALLOWED}:{port}/hello.txt", "-X POST -d x=1")
                + "; "
                + code(f"http://{ALLOWED}:{port}/hello.txt", "-I")
            ),
            Say("done"),
        ],
    )
    assert f"allows *.zone.test, {ALLOWED} with GET, HEAD and OPTIONS only" in str(
        scripted_model.requests[0]
    )  # Codex's instructions carry the policy
    out = outputs(turn)
    assert f"http_proxy={PROXY}" in out[0] and f"https_proxy={PROXY}" in out[0]
    assert f"npm_config_proxy={PROXY}" in out[0] and f"CARGO_HTTP_PROXY={PROXY}" in out[0]
    assert out[1] == "hello from the test host\n"  # plain HTTP to a listed name
    assert out[2].startswith("hello from the test host\n")  # a tunnel to a *. name
    assert f"failed http://{OTHER}:{port}/hello.txt" in out[2]  # CONNECT refused
    assert f"403 http://{OTHER}:{port}/hello.txt" in out[3]  # not listed
    assert f"403 http://zone.test:{port}/hello.txt" in out[3]  # *.zone.test is not zone.test
    assert out[3].count(f"http://{ALLOWED}:{port}/hello.txt") == 2
    lines = out[3].splitlines()
    assert f"403 http://{ALLOWED}:{port}/hello.txt" == lines[2]  # POST under safe methods
    assert f"200 http://{ALLOWED}:{port}/hello.txt" == lines[3]  # HEAD is safe

    events = [e for e in turn["proxy_events"] if e.get("phase") == "agent"]
    seen = [(e["decision"], e["method"], e["domain"], e["port"]) for e in events]
    assert seen == [
        ("allow", "GET", ALLOWED, port),
        ("allow", "CONNECT", DEEP, port),
        ("deny", "CONNECT", OTHER, port),
        ("deny", "GET", OTHER, port),
        ("deny", "GET", "zone.test", port),
        ("deny", "POST", ALLOWED, port),
        ("allow", "HEAD", ALLOWED, port),
    ]
    assert events[0]["size"] > 25 and events[0]["path"] == "/hello.txt"
    # each one was a live event of the turn too, written as it was decided: the stream, the
    # web UI's work log and `wham task watch` show it before the next command's message
    with engine_server.app_state.db.sessions() as s:
        live = store_events.read(s, turn["id"], limit=10_000)
    proxied = [e for e in live if e.item_type == store_events.PROXY_EVENT]
    assert [e.payload for e in proxied if e.payload.get("phase") == "agent"] == events
    later = next(
        e.id
        for e in live
        if e.item_type == store_events.WORK_LOG_MESSAGE and f"-p http://{DEEP}" in str(e.payload)
    )
    assert proxied[-len(events)].id < later
    assert network_text(events[3]) == (
        f"network (agent): refused GET {OTHER}:{port}/hello.txt ({OTHER} is not on the allowlist)"
    )
    assert events[5]["reason"] == "method POST is not allowed"
    assert events[3]["reason"] == f"{OTHER} is not on the allowlist"
    assert all(isinstance(e["duration_ms"], int) and e["timestamp"] for e in events)


def test_all_still_refuses_host_loopback_private_and_metadata_addresses(
    engine_server: Server,
    scripted_model: ScriptedModel,
    repo: Path,
    net_host: Any,
    listeners: tuple[Listener, Listener],
) -> None:
    loopback, on_host = listeners
    env = engine_server.api.create_env(repo, agent_network_access=on("", preset="all"))
    targets = [
        f"http://127.0.0.1:{loopback.port}/",
        f"http://localhost:{loopback.port}/",
        f"http://[::ffff:127.0.0.1]:{loopback.port}/",
        f"http://{net_host.host_side}:{on_host.port}/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
    ]
    turn = run(
        engine_server,
        scripted_model,
        env["id"],
        [
            # no_proxy names the sandbox's own loopback: asked through the proxy all the same
            Shell("; ".join(code(t, "--noproxy ''") for t in targets)),
            Shell(
                f"curl -sS --max-time 10 {net_host.url('hello.txt')}; "
                + code(f"{net_host.address}:{net_host.port}/hello.txt", "--noproxy '*'")
            ),
            Say("done"),
        ],
    )
    out = outputs(turn)
    for target in targets:
        assert f"403 {target}" in out[0], out[0]
    assert out[1].startswith("hello from the test host\n")  # a public address: allowed
    assert "failed" in out[1] or " 000 " in out[1]  # no way around the proxy
    assert loopback.connections == 0 and on_host.connections == 0
    denied = [e for e in turn["proxy_events"] if e["decision"] == "deny"]
    assert len(denied) == len(targets)
    assert any("link-local" in e["reason"] for e in denied)
    assert any("private network" in e["reason"] for e in denied)


def test_off_has_no_way_out(
    engine_server: Server,
    scripted_model: ScriptedModel,
    repo: Path,
    net_host: Any,
) -> None:
    env = engine_server.api.create_env(repo)  # agent_network_access off (the default)
    assert env["agent_network_access"]["mode"] == "off"
    turn = run(
        engine_server,
        scripted_model,
        env["id"],
        [
            Shell(
                "env | grep -i _proxy; ls /run/wham; "
                + code(net_host.url("hello.txt"))
                + "; "
                + code(net_host.url("hello.txt"), f"--proxy {PROXY}")
                + "; "
                + code(net_host.url("hello.txt"), "--proxy http://127.0.0.1:3128")
            ),
            Say("done"),
        ],
    )
    (out,) = outputs(turn)
    assert "_proxy" not in out.lower()
    assert "egress.sock" not in out and "gateway.sock" in out
    assert "hello from" not in out and "200 " not in out and out.count("failed") == 3, out
    assert not turn.get("proxy_events")
    told = str(scripted_model.requests[0])
    assert codex.NO_NETWORK_NOTE in told and "HTTP proxy" not in told  # told it has none


def test_a_standby_runs_only_under_the_policy_it_was_made_with(
    standby_server: Server, scripted_model: ScriptedModel, repo: Path, net_host: Any
) -> None:
    answer_names(standby_server, net_host)
    api = standby_server.api
    fetch = Shell(code(f"http://{ALLOWED}:{net_host.port}/hello.txt"))
    online = api.create_env(repo, agent_network_access=on(), label="online")
    offline = api.create_env(repo, label="offline")
    run(standby_server, scripted_model, online["id"], [fetch, Say("one")])
    wait_standby(standby_server, timeout=120)
    # the same policy: the standby is taken, its egress works and reports to this turn
    turn = run(standby_server, scripted_model, online["id"], [fetch, Say("two")])
    assert run_info(standby_server, turn["id"])["standby"] is True
    assert outputs(turn)[0].startswith("200 ")
    assert [e["decision"] for e in turn["proxy_events"]] == ["allow"]
    wait_standby(standby_server, timeout=120)
    # another policy (off) on the same repository: not that standby, and no way out
    turn = run(standby_server, scripted_model, offline["id"], [fetch, Say("three")])
    assert run_info(standby_server, turn["id"])["standby"] is False
    assert "failed" in outputs(turn)[0] or outputs(turn)[0].startswith("000")
    assert not turn.get("proxy_events")


def test_the_environment_page_sets_the_policy_and_the_task_page_shows_the_requests(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path, net_host: Any
) -> None:
    answer_names(engine_server, net_host)
    client = engine_server.api.client
    csrf = sign_in(client, engine_server.api.token or "")
    form = {
        "csrf": csrf,
        "label": "online",
        "repos": str(repo),
        "network_mode": "on",
        "network_preset": "none",
        "network_domains": f"{ALLOWED}\n*.zone.test",
        "network_safe": "on",
    }
    r = client.post("/environments", data=form, follow_redirects=False)
    assert r.status_code == 303, r.text
    env_url = r.headers["location"].split("?")[0]
    env_id = env_url.rsplit("/", 1)[1]
    net = engine_server.api.get(f"environments/{env_id}").json()["agent_network_access"]
    assert net["mode"] == "on" and net["safe_methods_only"] is True
    assert net["allowlist_domains"] == f"{ALLOWED}\n*.zone.test"
    page = client.get(env_url).text
    assert f"{ALLOWED}\n*.zone.test</textarea>" in page
    # a bad domain: the form says why and nothing changes
    r = client.post(env_url, data={**form, "network_domains": "not a domain!"})
    assert r.status_code == 400 and "is not a domain name" in r.text
    after = engine_server.api.get(f"environments/{env_id}").json()["agent_network_access"]
    assert after == net
    # the attempt's requests, allowed and refused, on its page
    scripted_model.script = [
        Shell(code(f"http://{ALLOWED}:{net_host.port}/hello.txt")),
        Shell(code(f"http://{OTHER}:{net_host.port}/hello.txt")),
        Say("done"),
    ]
    created = engine_server.api.create_task(env_id, "Fetch")
    task_id = created["task"]["id"]
    assert wait_for_task(engine_server.api, task_id)["current_assistant_turn"]["turn_status"] == (
        "completed"
    )
    page = client.get(f"/tasks/{task_id}").text
    table = page[page.index('id="proxy-events"') : page.index("</table>")]
    assert "Network requests through the egress proxy (2)" in table
    assert f"GET {ALLOWED}:{net_host.port}/hello.txt" in table and "Allowed" in table
    assert f"GET {OTHER}:{net_host.port}/hello.txt" in table and "Refused" in table
    assert f"{OTHER} is not on the allowlist" in table


TLS_SERVER = """
import functools, http.server, ssl, sys
address, port, cert, key, root = sys.argv[1:]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
httpd = http.server.ThreadingHTTPServer((address, int(port)), handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
httpd.serve_forever()
"""


def throwaway_ca(names: list[str]) -> tuple[bytes, bytes, bytes]:
    """A CA made for this test and a server certificate it signed for ``names``:
    (CA PEM, server certificate PEM, server key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "openwham test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


@pytest.fixture
def tls_host(net_host: Any, tmp_path: Path) -> Iterator[tuple[int, str]]:
    """The test host also serves ``hello.txt`` over real TLS (port 8443) with a certificate
    for ALLOWED and OTHER from a CA made here; yields (port, the CA's PEM)."""
    ca, cert, key = throwaway_ca([ALLOWED, OTHER])
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    port = 8443
    server = subprocess.Popen(
        [
            *("ip", "netns", "exec", net_host.name, sys.executable, "-c", TLS_SERVER),
            *(net_host.address, str(port), str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")),
            str(net_host.root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((net_host.address, port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no TLS server"
                time.sleep(0.05)
        yield port, ca.decode()
    finally:
        server.kill()
        server.wait()


def test_https_through_connect_reaches_an_allowed_host_and_is_refused_for_others(
    engine_server: Server,
    scripted_model: ScriptedModel,
    repo: Path,
    net_host: Any,
    tls_host: tuple[int, str],
) -> None:
    """Real HTTPS: curl in the sandbox verifies the test host's certificate (a CA made by
    the test, given with --cacert) through the CONNECT tunnel, so the proxy passed the bytes
    untouched; an unlisted name is refused at CONNECT (403, nothing reaches the host).
    Under ``safe_methods_only`` a POST inside the tunnel is not seen by the proxy and reaches
    the host (whose answer, 501, is its own): the limit docs/security.md states."""
    answer_names(engine_server, net_host)
    port, ca = tls_host
    env = engine_server.api.create_env(repo, agent_network_access=on(ALLOWED, safe=True))
    fmt = "-w '%{http_connect} %{http_code}\\n'"
    turn = run(
        engine_server,
        scripted_model,
        env["id"],
        [
            Shell(
                f"printf '%s' '{ca}' > /tmp/ca.pem; "
                f"curl -sS --max-time 10 --cacert /tmp/ca.pem https://{ALLOWED}:{port}/hello.txt"
            ),
            Shell(
                f"curl -sS --max-time 10 -o /dev/null {fmt} --cacert /tmp/ca.pem "
                f"https://{OTHER}:{port}/hello.txt 2>&1; "
                f"curl -sS --max-time 10 -o /dev/null {fmt} "
                f"https://{ALLOWED}:{port}/hello.txt 2>&1; "
                f"curl -sS --max-time 10 -o /dev/null {fmt} --cacert /tmp/ca.pem -d x=1 "
                f"https://{ALLOWED}:{port}/hello.txt 2>&1"
            ),
            Say("done"),
        ],
    )
    out = outputs(turn)
    assert out[0] == "hello from the test host\n", out[0]
    lines = out[1].splitlines()
    assert "403" in lines[0] and any(ln.startswith("403 000") for ln in lines), out[1]
    assert "certificate" in out[1].lower()  # no --cacert: the test host's own certificate
    assert lines[-1] == "200 501", out[1]  # a POST in the tunnel reached the host
    events = [e for e in turn["proxy_events"] if e.get("phase") == "agent"]
    seen = [(e["decision"], e["method"], e["domain"], e["port"]) for e in events]
    assert seen == [
        ("allow", "CONNECT", ALLOWED, port),
        ("deny", "CONNECT", OTHER, port),
        ("allow", "CONNECT", ALLOWED, port),
        ("allow", "CONNECT", ALLOWED, port),
    ]
    assert events[0]["size"] > 1000  # the handshake and the answer, both ways
    assert events[1]["reason"] == f"{OTHER} is not on the allowlist" and events[1]["size"] == 0
