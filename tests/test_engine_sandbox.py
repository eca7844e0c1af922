"""Escapes tried by the agent itself: probes run as Codex's own commands inside real attempts.

Each test starts an in-process server that runs attempts for real (the Codex CLI in bubblewrap,
the model gateway on a UNIX socket, ``ScriptedModel`` as the upstream), scripts the model to
make the agent run probe scripts through Codex's shell tool, and reads what the commands printed
from the task's work log. A probe prints one line, ``PROBE <name>: OK|DENIED <detail>``, where
OK means the operation *succeeded*. Every group has positive controls (the same mechanism
succeeding where it must, e.g. writing to /workspace, connecting to the in-sandbox forwarder),
so a probe that fails for an unrelated reason (a typo, a missing tool) cannot pass unnoticed,
and the host checks whatever it can see for itself (its listeners, files and processes).

Strings a probe searches for are built at run time (``P=SECRET""-A-``) or written as a regex
that does not match itself (``pyt[e]st``): the probe's own command line and Codex's session
log hold the script text, and must not be what the probe finds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    CODEX_MODEL,
    Server,
    diff_of,
    engine_settings,
    git,
    make_repo,
    make_server,
    wait_for_task,
)
from openwham.runtimes.codex import FORWARDER_PORT
from openwham.runtimes.codex_cli import native_binary
from openwham.sandbox import overlay
from support.procs import host_pids, wait_gone
from support.scripted_model import Say, ScriptedModel, Shell

UPSTREAM_KEY = "sk-upstream-secret-key"  # conftest.engine_settings' model_api_key
TOKEN_ENV = "OPENWHAM_GATEWAY_TOKEN"
TERMINAL = ("completed", "failed", "cancelled")

# What every probe script starts with.
# ``probe NAME CMD...`` runs CMD and prints its verdict and first 200 characters of output.
# ``post TOKEN BODY`` posts to the in-sandbox forwarder and succeeds only on HTTP 200.
# ``/tmp/net.py KIND HOST [PORT]`` does socket work (tcp, udp, resolve, abstract) and prints
# the exception's name and text when it fails.
PRELUDE = (
    f"F={FORWARDER_PORT}\n"
    + r"""
probe() {
  local name=$1 out rc; shift
  out=$("$@" 2>&1); rc=$?
  out=$(printf '%s' "$out" | tr '\n' ' ' | cut -c1-200)
  if [ $rc -eq 0 ]; then echo "PROBE $name: OK $out"
  else echo "PROBE $name: DENIED rc=$rc $out"; fi
}
post() {
  local code
  code=$(curl -s -m 5 -o /tmp/post-body -w "%{http_code}" -X POST \
    -H "content-type: application/json" ${1:+-H "authorization: Bearer $1"} \
    -d "$2" "http://127.0.0.1:$F/v1/responses")
  echo "$code $(head -c 150 /tmp/post-body)"
  [ "$code" = 200 ]
}
cat > /tmp/net.py <<'PY'
import socket, sys
kind, host = sys.argv[1], sys.argv[2]
port = int(sys.argv[3]) if len(sys.argv) > 3 else 0
query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01"
try:
    if kind == "tcp":
        s = socket.create_connection((host, port), timeout=3)
        s.sendall(b"probe\n")
        print("connected to", s.getpeername())
    elif kind == "udp":
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.connect((host, port))
        s.send(query)
        print("answer", s.recv(512)[:16])
    elif kind == "resolve":
        print(sorted({a[4][0] for a in socket.getaddrinfo(host, 443)}))
    elif kind == "abstract":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect("\0" + host)
        print("connected to abstract socket")
    elif kind == "open-write":
        import os
        os.close(os.open(host, os.O_WRONLY))
        print("opened for writing")
    else:
        raise SystemExit("unknown probe " + kind)
except OSError as exc:
    print(type(exc).__name__, exc)
    sys.exit(1)
PY
"""
)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def engine(
    tmp_path: Path, sqlite_url: str, model: ScriptedModel, **options: Any
) -> Iterator[Server]:
    """An in-process server that runs attempts, with extra ``Settings`` options."""
    yield from make_server(tmp_path, sqlite_url, **engine_settings(model, **options))


def data_dir(server: Server) -> Path:
    return Path(server.app_state.settings.resolved_data_dir)


def turn_of(details: dict[str, Any]) -> dict[str, Any]:
    return dict(details["current_assistant_turn"])


def commands(details: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    """``(command, output, exit_code)`` of every ``container.exec`` call in the work log."""
    messages = turn_of(details)["worklog"]["messages"]
    out: list[tuple[str, str, int | None]] = []
    for i, msg in enumerate(messages):
        if msg.get("recipient") != "container.exec" or msg["author"]["role"] != "assistant":
            continue
        cmd = json.loads(msg["content"]["text"])["cmd"]
        result = next((m for m in messages[i + 1 :] if m["author"]["role"] == "tool"), None)
        if result is None:
            out.append((cmd, "", None))
            continue
        text = "".join(str(p) for p in result["content"].get("parts") or [])
        out.append((cmd, text, (result.get("metadata") or {}).get("exit_code")))
    return out


def output(details: dict[str, Any]) -> str:
    return "\n".join(text for _, text, _ in commands(details))


def probes(details: dict[str, Any]) -> dict[str, str]:
    """``name -> "OK …" | "DENIED …"`` from the ``PROBE`` lines of every command output."""
    found: dict[str, str] = {}
    for line in output(details).splitlines():
        if line.startswith("PROBE ") and ": " in line:
            name, _, verdict = line[len("PROBE ") :].partition(": ")
            found[name] = verdict
    return found


def check(found: dict[str, str], *, denied: list[str], ok: list[str]) -> None:
    """Every ``denied`` probe was refused and every ``ok`` control succeeded."""
    problems = [
        f"{name} should be {want}: {found.get(name, 'MISSING')}"
        for want, names in (("OK", ok), ("DENIED", denied))
        for name in names
        if found.get(name, "").split(" ", 1)[0] != want
    ]
    assert not problems, "\n".join(problems)


def run_script(
    server: Server, model: ScriptedModel, env_id: str, *steps: str, prompt: str = "probe"
) -> dict[str, Any]:
    """One task whose agent runs ``steps`` (shell scripts) and then answers; its details."""
    model.script = [*(Shell(s) for s in steps), Say("done")]
    task = server.api.create_task(env_id, prompt)
    return wait_for_task(server.api, task["task"]["id"])


def run_probes(
    server: Server, model: ScriptedModel, env_id: str, script: str
) -> tuple[dict[str, Any], dict[str, str]]:
    details = run_script(server, model, env_id, PRELUDE + script)
    assert turn_of(details)["turn_status"] == "completed", turn_of(details)
    return details, probes(details)


def watch_task(
    server: Server, task_id: str, tick: Callable[[], None], timeout: float = 60.0
) -> dict[str, Any]:
    """Poll the task until its attempt is terminal, calling ``tick`` and checking that the
    server answers /healthz between polls; returns the details."""
    deadline = time.monotonic() + timeout
    while True:
        tick()
        health = server.api.client.get("/healthz")
        assert health.status_code == 200, health.text
        r = server.api.get(f"tasks/{task_id}")
        assert r.status_code == 200, r.text
        details = dict(r.json())
        if turn_of(details).get("turn_status") in TERMINAL:
            return details
        assert time.monotonic() < deadline, f"task {task_id} never ended: {turn_of(details)}"
        time.sleep(0.1)


def assert_still_serving(server: Server, model: ScriptedModel, env_id: str) -> None:
    """The server answers and a following normal task completes."""
    assert server.api.client.get("/healthz").status_code == 200
    listing = server.api.get("tasks/list")
    assert listing.status_code == 200, listing.text
    details = run_script(server, model, env_id, "echo still-working", prompt="after")
    assert turn_of(details)["turn_status"] == "completed", turn_of(details)
    assert commands(details)[0][1:] == ("still-working\n", 0)


def host_addresses() -> list[str]:
    """This host's own addresses (loopback first), link-local ones excluded."""
    addrs = ["127.0.0.1", "::1"]
    try:
        out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True)
        for iface in json.loads(out.stdout):
            for info in iface.get("addr_info") or []:
                if info.get("scope") != "link" and info.get("local"):
                    addrs.append(info["local"])
    except (OSError, subprocess.CalledProcessError, ValueError):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.connect(("192.0.2.1", 9))
            addrs.append(s.getsockname()[0])
    return list(dict.fromkeys(addrs))


class Listener:
    """A TCP server on every host address (dual stack) that records who connected."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.sock.bind(("::", 0))
        except OSError:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.peers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(str(peer[0]))
            conn.close()

    def reachable_from_host(self, addr: str) -> bool:
        before = len(self.peers)
        try:
            with socket.create_connection((addr, self.port), timeout=2):
                pass
        except OSError:
            return False
        deadline = time.monotonic() + 2
        while len(self.peers) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self.peers) > before

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


# --------------------------------------------------------------------------- 1. data directory


def written(workspace: Path) -> Path:
    """Where the host finds what the agent wrote to ``workspace``: its overlay's upper
    directory (the merged view exists only in the sandbox's mount namespace), else itself."""
    upper = workspace.parent / overlay.UPPER
    return upper if (workspace.parent / overlay.LOWER).is_symlink() else workspace


def test_database_keys_and_data_dir_are_unreadable(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    data = data_dir(engine_server)
    key_file = data / "keys" / "token-signing.key"
    assert (data / "openwham.db").is_file() and key_file.is_file()  # what the probes go for
    key = key_file.read_bytes().decode("latin-1")
    env = engine_server.api.create_env(repo)
    script = (
        f"D={shlex.quote(str(data))}\n"
        + r"""
probe control_read_workspace head -c 9 /workspace/README.md
probe control_python python3 -c 'print("python works")'
probe read_db head -c 16 "$D/openwham.db"
probe read_db_wal head -c 16 "$D/openwham.db-wal"
probe sqlite_open python3 -c 'import sqlite3, sys
db = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True)
print(db.execute("select count(*) from sqlite_master").fetchone())' "$D/openwham.db"
probe list_data_dir ls -A "$D"
probe list_keys ls -A "$D/keys"
probe read_signing_key cat "$D/keys/token-signing.key"
probe read_secrets_key cat "$D/keys/secrets.key"
probe via_proc_root bash -c 'for p in /proc/[0-9]*; do
  head -c 16 "$p/root$0/openwham.db" 2>/dev/null && exit 0; done; exit 1' "$D"
probe find_db bash -c 'find / \( -path /proc -o -path /sys -o -path /usr \) -prune \
  -o \( -name "openwham.db*" -o -name "*.key" \) -print 2>/dev/null | grep .'
probe fd_into_data_dir bash -c 'for l in /proc/[0-9]*/fd/*; do t=$(readlink "$l") || continue
  case "$t" in *openwham.db*|*keys*) echo "$l -> $t"; exit 0;; esac; done; exit 1'
probe hardlink_db ln "$D/openwham.db" /workspace/db-hardlink
ln -s "$D/openwham.db" /workspace/db-link
ln -s "$D/keys/token-signing.key" /workspace/key-link
ln -s "$D/keys" /workspace/keys-link
probe read_through_symlink cat /workspace/key-link
"""
    )
    details, found = run_probes(engine_server, scripted_model, env["id"], script)
    check(
        found,
        ok=["control_read_workspace", "control_python"],
        denied=[
            "read_db",
            "read_db_wal",
            "sqlite_open",
            "list_data_dir",
            "list_keys",
            "read_signing_key",
            "read_secrets_key",
            "via_proc_root",
            "find_db",
            "fd_into_data_dir",
            "hardlink_db",
            "read_through_symlink",
        ],
    )
    text = output(details)
    assert "# widgets" in text and "SQLite format 3" not in text and key not in text

    # The symlinks the agent left behind reach the result as links, never as what they point
    # at: the host followed none of them computing the diff or cleaning up.
    diff = diff_of(details)
    assert "new file mode 120000" in diff and "db-link" in diff and "keys-link" in diff
    assert "SQLite format 3" not in diff and key not in diff
    assert key_file.read_text(encoding="latin-1") == key and (data / "openwham.db").is_file()


# --------------------------------------------------------------------------- 2. writes

OUTSIDE = ["/", "/etc", "/usr", "/usr/local/bin", "/usr/lib", "/opt", "/opt/openwham", "/run"]
OUTSIDE += ["/run/wham", "/var", "/dev", "/proc", "/sys"]


def test_only_the_workspace_is_writable_and_tmp_and_home_are_private(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path, tmp_path: Path
) -> None:
    data = data_dir(engine_server)
    codex_bin = native_binary()
    codex_before = codex_bin.stat()
    mark = f"m{uuid.uuid4().hex[:12]}"
    env = engine_server.api.create_env(repo)
    head_before = git("rev-parse", "HEAD", cwd=repo)
    # The host repository and data directory are tried by their host paths too. (Here they
    # lie under the host's /tmp, which inside is the sandbox's own tmpfs: the host-side
    # checks below are what shows nothing landed there.)
    dirs = [*OUTSIDE, str(data), str(data / "attempts"), str(repo)]
    script = f"M={mark}\n" + "\n".join(
        f"probe write:{d} bash -c 'echo x > \"$0/$1-outside\"' {shlex.quote(d)} $M" for d in dirs
    )
    script += r"""
probe control_workspace bash -c 'echo x > "/workspace/$0-ws" && cat "/workspace/$0-ws"' $M
probe control_tmp bash -c 'echo x > "/tmp/$0-tmp"' $M
probe control_home bash -c 'echo x > "$HOME/$0-home"' $M
probe control_shm bash -c 'echo x > "/dev/shm/$0-shm"' $M
probe append_codex_binary bash -c ': >> /opt/openwham/codex'
probe append_forwarder bash -c ': >> /opt/openwham/forwarder.py'
probe chmod_codex_binary chmod u+w /opt/openwham/codex
probe replace_gateway_socket bash -c 'rm -f /run/wham/gateway.sock'
probe mount_tmpfs mount -t tmpfs none /mnt
probe git_push git push -q origin "HEAD:refs/heads/$M"
probe control_origin_is_host_path git remote get-url origin
"""
    details, found = run_probes(engine_server, scripted_model, env["id"], script)
    check(
        found,
        ok=["control_workspace", "control_tmp", "control_home", "control_shm"],
        denied=[
            *(f"write:{d}" for d in dirs),
            "append_codex_binary",
            "append_forwarder",
            "chmod_codex_binary",
            "replace_gateway_socket",
            "mount_tmpfs",
            "git_push",
        ],
    )
    assert str(repo) in found["control_origin_is_host_path"]  # the push really aimed at it
    # The host: the workspace file reached the result; nothing else was created or changed.
    assert f"{mark}-ws" in diff_of(details)
    for d in dirs:
        assert not list(Path(d).glob(f"{mark}*")), d
    assert git("rev-parse", "HEAD", cwd=repo) == head_before
    assert mark not in git("branch", "--list", "--all", cwd=repo)
    assert git("status", "--porcelain", cwd=repo) == ""
    codex_after = codex_bin.stat()
    assert (codex_after.st_size, codex_after.st_mtime_ns, codex_after.st_mode) == (
        codex_before.st_size,
        codex_before.st_mtime_ns,
        codex_before.st_mode,
    )

    # /tmp, $HOME and /dev/shm were the first attempt's own: the next one starts without
    # them, and none of those files is left on the host ($HOME lives in the attempt's
    # directory, shared with its setup phase, and goes with the workspace).
    places = {"tmp": f"/tmp/{mark}-tmp", "home": f"$HOME/{mark}-home"}
    places |= {"shm": f"/dev/shm/{mark}-shm", "workspace": f"/workspace/{mark}-ws"}
    script2 = "\n".join(f'probe see:{name} cat "{path}"' for name, path in places.items())
    script2 += f"""
probe see_any bash -c 'find /tmp /home /dev/shm /workspace -name "$0*" 2>/dev/null | grep .' {mark}
probe control_tmp_again bash -c 'echo y > /tmp/again && cat /tmp/again'
"""
    _, found2 = run_probes(engine_server, scripted_model, env["id"], script2)
    check(found2, ok=["control_tmp_again"], denied=[*(f"see:{n}" for n in places), "see_any"])
    leftovers = [*Path("/tmp").glob(f"{mark}*"), *Path.home().glob(f"{mark}*")]
    for root, subdirs, files in os.walk(tmp_path):  # tolerates workspaces being removed
        leftovers += [Path(root, n) for n in subdirs + files if n.startswith(mark)]
    assert leftovers == []


def test_host_kernel_settings_are_read_only(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    env = engine_server.api.create_env(repo)
    # Opening for writing is where the kernel checks the permission; nothing is written.
    sysctls = ["kernel/core_pattern", "kernel/pid_max", "vm/drop_caches", "fs/file-max"]
    sysctls.append("kernel/printk_ratelimit_burst")
    script = "probe control_read_sysctl cat /proc/sys/kernel/pid_max\n"
    script += "probe control_open_write_workspace python3 /tmp/net.py open-write README.md\n"
    script += "\n".join(
        f"probe open:{s} python3 /tmp/net.py open-write /proc/sys/{s}" for s in sysctls
    )
    _, found = run_probes(engine_server, scripted_model, env["id"], script)
    check(found, ok=["control_read_sysctl", "control_open_write_workspace"], denied=[])
    check(found, ok=[], denied=[f"open:{s}" for s in sysctls])


# --------------------------------------------------------------------------- 3. host services


def test_host_loopback_services_and_host_addresses_are_unreachable(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    listener = Listener()
    abstract_name = f"openwham-probe-{uuid.uuid4().hex[:12]}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + abstract_name)
    abstract.listen(8)
    abstract.settimeout(0.1)
    try:
        # Host-side control: the listener answers on each address the agent will try.
        targets = [a for a in host_addresses() if listener.reachable_from_host(a)]
        assert "127.0.0.1" in targets and len(targets) >= 2, targets
        assert listener.port != FORWARDER_PORT
        model_port = int(scripted_model.url.rsplit(":", 1)[1].split("/")[0])
        listener.peers.clear()
        lines = [f"P={listener.port} MP={model_port} A={abstract_name}"]
        for addr in targets:
            lines.append(f"probe py_tcp:{addr} python3 /tmp/net.py tcp {addr} $P")
            lines.append(f"probe devtcp:{addr} timeout 4 bash -c 'exec 3<>/dev/tcp/{addr}/$0' $P")
        lines += [
            "probe model_upstream_tcp python3 /tmp/net.py tcp 127.0.0.1 $MP",
            "probe model_upstream_http curl -sS -m 3 http://127.0.0.1:$MP/v1/models",
            "probe host_abstract_socket python3 /tmp/net.py abstract $A",
            "probe control_forwarder_py python3 /tmp/net.py tcp 127.0.0.1 $F",
            "probe control_forwarder_devtcp bash -c 'exec 3<>/dev/tcp/127.0.0.1/$0' $F",
            "probe interfaces bash -c \"tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '\"",
        ]
        with engine(tmp_path, sqlite_url, scripted_model) as server:
            env = server.api.create_env(repo)
            _, found = run_probes(server, scripted_model, env["id"], "\n".join(lines))
        tried = [f"{kind}:{addr}" for addr in targets for kind in ("py_tcp", "devtcp")]
        check(
            found,
            ok=["control_forwarder_py", "control_forwarder_devtcp", "interfaces"],
            denied=[*tried, "model_upstream_tcp", "model_upstream_http", "host_abstract_socket"],
        )
        assert found["interfaces"].split() == ["OK", "lo"]  # its own network namespace
        time.sleep(0.3)
        assert listener.peers == []  # nothing from the sandbox ever reached the host listener
        with pytest.raises(TimeoutError):
            abstract.accept()
    finally:
        listener.close()
        abstract.close()


# --------------------------------------------------------------------------- 4. the network


def test_no_name_resolution_and_no_route_to_any_network(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    env = engine_server.api.create_env(repo)
    script = r"""
probe control_resolve_localhost python3 /tmp/net.py resolve localhost
probe control_forwarder python3 /tmp/net.py tcp 127.0.0.1 $F
probe resolve_example python3 /tmp/net.py resolve example.com
probe resolve_openai python3 /tmp/net.py resolve api.openai.com
probe getent_github getent hosts github.com
probe tcp_1.1.1.1:53 python3 /tmp/net.py tcp 1.1.1.1 53
probe tcp_1.1.1.1:80 python3 /tmp/net.py tcp 1.1.1.1 80
probe tcp_8.8.8.8:443 python3 /tmp/net.py tcp 8.8.8.8 443
probe tcp_v6_cloudflare python3 /tmp/net.py tcp 2606:4700:4700::1111 53
probe udp_1.1.1.1:53 python3 /tmp/net.py udp 1.1.1.1 53
probe udp_v6_google python3 /tmp/net.py udp 2001:4860:4860::8888 53
probe curl_https curl -sS -m 5 https://example.com/
probe ipv4_routes bash -c 'tail -n +2 /proc/net/route | grep .'
probe ipv6_routes_off_loopback bash -c 'grep -v " lo$" /proc/net/ipv6_route | grep .'
"""
    _, found = run_probes(engine_server, scripted_model, env["id"], script)
    routed = ["tcp_1.1.1.1:53", "tcp_1.1.1.1:80", "tcp_8.8.8.8:443", "tcp_v6_cloudflare"]
    routed += ["udp_1.1.1.1:53", "udp_v6_google"]
    check(
        found,
        ok=["control_resolve_localhost", "control_forwarder"],
        denied=[
            *routed,
            "resolve_example",
            "resolve_openai",
            "getent_github",
            "curl_https",
            "ipv4_routes",
            "ipv6_routes_off_loopback",
        ],
    )
    # Refused for lack of any route (the namespace has only loopback), not by a firewall or a
    # timeout further away: this holds on an offline host too. (Or no IPv6 at all.)
    for name in routed:
        reasons = ("Network is unreachable", "Address family not supported")
        assert any(r in found[name] for r in reasons), (name, found[name])


# --------------------------------------------------------------------------- 5. processes


def test_host_processes_are_invisible(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    env = engine_server.api.create_env(repo)
    me = os.getpid()
    script = (
        f"ME={me}\n"
        + r"""
for p in /proc/[0-9]*; do
  echo "PROC ${p#/proc/} $(tr '\0\n' '  ' < "$p/cmdline" | cut -c1-80)"
done
probe control_ps ps -eo pid=,comm=
probe see_test_runner bash -c 'grep -las "pyt[e]st" /proc/[0-9]*/cmdline'
probe proc_of_test_pid ls "/proc/$ME/cmdline"
probe signal_test_pid kill -0 "$ME"
probe host_init bash -c 'tr "\0\n" "  " < /proc/1/cmdline | grep -v bwrap'
"""
    )
    details, found = run_probes(engine_server, scripted_model, env["id"], script)
    check(
        found,
        ok=["control_ps"],
        denied=["see_test_runner", "proc_of_test_pid", "signal_test_pid", "host_init"],
    )
    visible = [line.split(" ", 2) for line in output(details).splitlines()]
    visible = [v for v in visible if v[0] == "PROC"]
    all_pids = [p for p in os.listdir("/proc") if p.isdigit()]
    # The sandbox's init (bwrap), Codex, the forwarder and this probe's shell with its pipes.
    assert 4 <= len(visible) <= 12, visible
    assert len(all_pids) > len(visible) + 5  # the host has many more
    cmdlines = " | ".join(v[-1] for v in visible)
    assert "pytest" not in cmdlines
    assert visible[0][1] == "1" and "bwrap" in visible[0][2]
    assert "/opt/openwham/codex" in cmdlines and "forwarder.py" in cmdlines


def test_background_processes_do_not_outlive_the_attempt(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    mark = f"orphan-{uuid.uuid4().hex[:12]}"
    env = engine_server.api.create_env(repo)
    script = (  # a new session, a double-forked orphan, one that ignores SIGHUP and SIGTERM
        f"setsid nohup bash -c ': {mark}-a; sleep 300; :' >/dev/null 2>&1 </dev/null &\n"
        f"( (exec -a {mark}-b sleep 301) & ) >/dev/null 2>&1\n"
        f"nohup bash -c 'trap \"\" HUP TERM; : {mark}-c; sleep 302; :' >/dev/null 2>&1 &\n"
        "sleep 1.5; echo launched"
    )
    scripted_model.script = [Shell(script), Say("done")]
    task = engine_server.api.create_task(env["id"], "orphans")
    seen: set[int] = set()
    details = watch_task(engine_server, task["task"]["id"], lambda: seen.update(host_pids(mark)))
    assert turn_of(details)["turn_status"] == "completed", turn_of(details)
    assert len(seen) >= 3, seen  # they really ran on the host during the attempt
    assert wait_gone(mark) == []


# --------------------------------------------------------------------------- 6. other attempts


def test_other_repositories_mirrors_and_attempts_are_invisible(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel
) -> None:
    secret = f"SECRET-A-{uuid.uuid4().hex}"
    repo_a = make_repo(tmp_path / "repo-a")
    (repo_a / "role-a").write_text(secret + "\n")
    git("add", ".", cwd=repo_a)
    git("commit", "-q", "-m", "a", cwd=repo_a)
    repo_b = make_repo(tmp_path / "repo-b")
    (repo_b / "role-b").write_text("B\n")
    git("add", ".", cwd=repo_b)
    git("commit", "-q", "-m", "b", cwd=repo_b)
    hold = f"31.{uuid.uuid4().int % 10**9:09d}"  # A's `sleep`, with a duration no one else uses
    holder = f"sleep\x00{hold}\x00"  # its command line

    with engine(tmp_path, sqlite_url, scripted_model, executor_concurrency=2) as server:
        data = data_dir(server)
        env_a = server.api.create_env(repo_a, label="acme/a")
        env_b = server.api.create_env(repo_b, label="acme/b")
        # A keeps its secret in its workspace and its /tmp and stays running …
        scripted_model.script = [
            Shell(f"cp role-a secret-a.txt; cp role-a /tmp/secret-a; sleep {hold}"),
            Say("done"),
        ]
        task_a = server.api.create_task(env_a["id"], "hold a secret")
        turn_a = task_a["task"]["current_turn_id"]
        ws_a = data / "attempts" / turn_a / "workspace"
        deadline = time.monotonic() + 30
        while not (written(ws_a) / "secret-a.txt").exists():
            assert time.monotonic() < deadline, "attempt A never wrote its secret"
            time.sleep(0.05)
        mirrors = sorted(p for p in (data / "mirrors").iterdir() if p.is_dir())
        assert len(mirrors) == 1  # A's
        assert host_pids(holder), "A's command is not running"
        # … while B (A's command already runs: the script may change) looks for it everywhere.
        q = shlex.quote
        script_b = f"D={q(str(data))} TA={q(turn_a)} MA={q(str(mirrors[0]))} RA={q(str(repo_a))}"
        script_b += f" HOLD={q('sleep ' + hold + ' ')}"
        script_b += r"""
P="SECRET""-A-"
probe control_own_repo cat /workspace/role-b
probe list_attempts ls -A "$D/attempts"
probe list_workspace_a ls -A "$D/attempts/$TA/workspace"
probe read_secret_a cat "$D/attempts/$TA/workspace/secret-a.txt"
probe codex_home_a ls -A "$D/attempts/$TA/codex-home"
probe list_mirrors ls -A "$D/mirrors"
probe list_mirror_a ls -A "$MA"
probe clone_mirror_a git clone -q "$MA" /tmp/clone-mirror
probe read_repo_a cat "$RA/role-a"
probe clone_repo_a git clone -q "$RA" /tmp/clone-repo
probe tmp_of_a cat /tmp/secret-a
probe grep_everywhere bash -c 'grep -rlsF -D skip "$0" / \
  --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr | grep .' "$P"
probe find_secret_file bash -c 'find / \( -path /proc -o -path /sys -o -path /usr \) -prune \
  -o -name "secret-a*" -print 2>/dev/null | grep .'
probe processes_of_a bash -c 'for p in /proc/[0-9]*; do
  [ "$(tr "\0" " " < $p/cmdline)" = "$0" ] && exit 0; done; exit 1' "$HOLD"
"""
        details_b = run_script(server, scripted_model, env_b["id"], PRELUDE + script_b)
        # B ran while A was still holding its secret.
        r = server.api.get(f"tasks/{task_a['task']['id']}")
        assert turn_of(r.json())["turn_status"] == "in_progress"
        assert (written(ws_a) / "secret-a.txt").read_text().strip() == secret
        assert len([p for p in (data / "mirrors").iterdir() if p.is_dir()]) == 2
        assert server.api.post(f"tasks/{task_a['task']['id']}/cancel").status_code == 200
        details_a = wait_for_task(server.api, task_a["task"]["id"], timeout=30)
        assert turn_of(details_a)["turn_status"] == "cancelled"

    assert turn_of(details_b)["turn_status"] == "completed", turn_of(details_b)
    check(
        probes(details_b),
        ok=["control_own_repo"],
        denied=[
            "list_attempts",
            "list_workspace_a",
            "read_secret_a",
            "codex_home_a",
            "list_mirrors",
            "list_mirror_a",
            "clone_mirror_a",
            "read_repo_a",
            "clone_repo_a",
            "tmp_of_a",
            "grep_everywhere",
            "find_secret_file",
            "processes_of_a",
        ],
    )
    assert secret not in json.dumps(details_b)
    assert wait_gone(holder) == []


# --------------------------------------------------------------------------- 7. credentials


def test_gateway_token_and_upstream_key_are_not_in_the_agents_environment(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    env = engine_server.api.create_env(repo)
    script = (
        f"T={TOKEN_ENV}\n"
        + r"""
K="sk-upstream-secret-ke[y]"   # a regex that matches the key but not itself
probe control_env_listing bash -c 'env | grep -a "^CODEX_HOME="'
probe control_self_environ grep -a CODEX_HOME /proc/self/environ
probe token_in_env bash -c 'env | grep -a "$0"' "$T"
probe token_variable_set bash -c '[ -n "${!0:-}" ]' "$T"
probe token_in_self_environ grep -a "$T" /proc/self/environ
probe key_in_env bash -c 'env | grep -a "$0"' "$K"
probe key_anywhere bash -c 'grep -rlsa -D skip "$0" /proc/[0-9]*/environ /proc/[0-9]*/cmdline \
  /home /tmp /workspace /opt /run /etc /dev/shm | grep .' "$K"
probe gateway_without_token post "" '{"model":"x","input":"no-token"}'
probe gateway_made_up_token post sk-made-up '{"model":"x","input":"made-up"}'
"""
    )
    details, found = run_probes(engine_server, scripted_model, env["id"], script)
    check(
        found,
        ok=["control_env_listing", "control_self_environ"],
        denied=[
            "token_in_env",
            "token_variable_set",
            "token_in_self_environ",
            "key_in_env",
            "key_anywhere",
            "gateway_without_token",
            "gateway_made_up_token",
        ],
    )
    assert " 401 " in found["gateway_without_token"] and " 401 " in found["gateway_made_up_token"]
    assert UPSTREAM_KEY not in json.dumps(details)
    # Only Codex's two requests reached the model, each with the key the gateway injected.
    assert len(scripted_model.requests) == 2
    assert {h.get("authorization") for h in scripted_model.headers} == {f"Bearer {UPSTREAM_KEY}"}


def test_a_command_that_takes_codex_s_gateway_token_gets_only_what_codex_has(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    """Codex keeps the gateway token out of its commands' environment, but a command can read
    it from ``/proc/<codex>/environ`` (same uid). By design that gives nothing Codex does not
    have (docs/notes-execution.md): the request is pinned to the attempt's model, carries the
    upstream key only on the host side, and the token dies with the attempt."""
    mark = f"stolen-{uuid.uuid4().hex[:12]}"
    env = engine_server.api.create_env(repo)
    script = (
        f"T={TOKEN_ENV} M={mark}\n"
        + r"""
probe control_own_environ grep -a CODEX_HOME /proc/self/environ
probe token_in_own_environ grep -a "$T" /proc/self/environ
TOKEN=$(cat /proc/[0-9]*/environ 2>/dev/null | tr '\0' '\n' | sed -n "s/^$T=//p" | head -n1)
echo "TOKEN=$TOKEN"
tools='[{"type":"function","name":"exec_command","parameters":{"type":"object"}}]'
probe use_stolen_token post "$TOKEN" '{"model":"x","stream":true,"input":"'$M'","tools":'"$tools}"
"""
    )
    details, found = run_probes(engine_server, scripted_model, env["id"], script)
    check(found, ok=["control_own_environ", "use_stolen_token"], denied=["token_in_own_environ"])
    (stolen,) = [r for r in scripted_model.requests if r.get("input") == mark]
    assert stolen["model"] == CODEX_MODEL  # pinned: not the "x" the command asked for
    assert {h.get("authorization") for h in scripted_model.headers} == {f"Bearer {UPSTREAM_KEY}"}
    token = re.search(r"TOKEN=([A-Za-z0-9_-]{20,})", json.dumps(turn_of(details)["worklog"]))
    assert token is not None
    runner = engine_server.app_state.runner
    assert runner is not None and runner.gateway_server is not None
    transport = httpx.HTTPTransport(uds=str(runner.gateway_server.socket_path))
    with httpx.Client(transport=transport, base_url="http://gateway") as gw:
        r = gw.post(
            "/v1/responses",
            json={"model": "x", "input": "after the end", "stream": True},
            headers={"Authorization": f"Bearer {token.group(1)}"},
        )
    assert r.status_code == 401, r.text  # revoked when the attempt ended


# --------------------------------------------------------------------------- 8. limits


def test_fork_bomb_is_contained(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    limit, timeout = 256, 8
    opts = {"sandbox_max_processes": limit, "attempt_timeout_seconds": timeout}
    with engine(tmp_path, sqlite_url, scripted_model, **opts) as server:
        env = server.api.create_env(repo)

        def bomb(wait_seconds: int) -> tuple[dict[str, Any], int, float]:
            """Run a task whose command sets off a fork bomb and waits ``wait_seconds`` (on a
            sleep started before it: nothing can be forked then); the details, the most bomb
            processes the host saw at once, and how long the attempt took."""
            mark = f"bomb-{uuid.uuid4().hex[:12]}"
            command = (
                f"sleep {wait_seconds} & s=$!\n"
                f"bash -c ': {mark}; :(){{ :|:& }};:' >/dev/null 2>/tmp/bomb.err\n"
                'wait $s; read -r first < /tmp/bomb.err; echo "first: $first"'
            )
            scripted_model.script = [Shell(command), Say("done")]
            t0 = time.monotonic()
            task = server.api.create_task(env["id"], "fork bomb")
            peak = [0]

            def sample() -> None:
                peak[0] = max(peak[0], len(host_pids(mark)))

            details = watch_task(server, task["task"]["id"], sample)
            elapsed = time.monotonic() - t0
            assert wait_gone(mark) == [], "bomb processes outlived the attempt"
            assert 32 < peak[0] <= limit, peak  # it really ran, and never past the cap
            return details, peak[0], elapsed

        def assert_stopped_at_the_limit(turn: dict[str, Any], elapsed: float) -> None:
            assert turn["turn_status"] == "failed", turn
            assert turn["error"]["code"] == "limit_exceeded"
            assert f"process limit of {limit} reached" in turn["error"]["message"]
            assert f"wall-clock limit of {timeout} s reached" in turn["error"]["message"]
            assert elapsed < timeout + 6

        # 1. The command reports and ends while the bomb runs on. Codex usually survives and
        #    completes the turn (the command's output shows forks refused at the cap); when it
        #    cannot get a thread itself, the wall clock ends the attempt, naming the cap. Both
        #    happen here. Either way the sandbox's end takes every bomb process with it.
        details, _, elapsed = bomb(3)
        turn = turn_of(details)
        if turn["turn_status"] == "completed":
            assert "first: " in output(details), turn["worklog"]
            assert "Resource temporarily unavailable" in output(details)  # fork refused
        else:
            assert_stopped_at_the_limit(turn, elapsed)

        # 2. The command waits for the bomb: the wall clock stops the attempt, and the error
        #    names the process limit.
        details, _, elapsed = bomb(1000)
        assert_stopped_at_the_limit(turn_of(details), elapsed)

        assert_still_serving(server, scripted_model, env["id"])


def test_huge_file_is_cut_at_the_file_size_limit(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    limit = 16 << 20
    with engine(tmp_path, sqlite_url, scripted_model, sandbox_max_file_mb=16) as server:
        env = server.api.create_env(repo)
        script = (
            "head -c 256M /dev/zero > big; echo head-exit=$?; stat -c big-size=%s big\n"
            'python3 -c \'open("/tmp/big2", "wb").write(bytes(32 << 20))\'; echo py-exit=$?\n'
            "truncate -s 1G sparse; echo truncate-exit=$?; stat -c sparse-size=%s sparse\n"
            "sleep 1; echo done"
        )
        scripted_model.script = [Shell(script), Say("done")]
        task = server.api.create_task(env["id"], "huge file")
        ws = data_dir(server) / "attempts" / task["task"]["current_turn_id"] / "workspace"
        largest = [-1]

        def sample() -> None:
            for name in ("big", "sparse"):
                with contextlib.suppress(OSError):
                    largest[0] = max(largest[0], (written(ws) / name).stat().st_size)

        details = watch_task(server, task["task"]["id"], sample)
        # Only the writing command dies (SIGXFSZ: 128 + 25); Codex goes on and completes.
        assert turn_of(details)["turn_status"] == "completed", turn_of(details)
        text = output(details)
        assert "head-exit=153" in text and "File size limit exceeded" in text
        assert "truncate-exit=153" in text and "sparse-size=0" in text
        assert "File too large" in text and "py-exit=1" in text  # Python ignores SIGXFSZ
        sizes = [int(w.split("=")[1]) for w in text.split() if w.startswith("big-size=")]
        assert sizes and 0 < sizes[0] <= limit
        assert 0 < largest[0] <= limit  # seen from the host while the attempt ran
        assert_still_serving(server, scripted_model, env["id"])


def test_endless_loop_is_stopped_at_the_wall_clock_limit(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    mark = f"loop-{uuid.uuid4().hex[:12]}"
    timeout = 8
    with engine(tmp_path, sqlite_url, scripted_model, attempt_timeout_seconds=timeout) as server:
        env = server.api.create_env(repo)
        scripted_model.script = [Shell(f"bash -c ': {mark}; while :; do :; done'"), Say("done")]
        t0 = time.monotonic()
        task = server.api.create_task(env["id"], "endless loop")
        seen = [0]

        def sample() -> None:
            seen[0] = max(seen[0], len(host_pids(mark)))

        details = watch_task(server, task["task"]["id"], sample)
        elapsed = time.monotonic() - t0
        turn = turn_of(details)
        assert turn["turn_status"] == "failed", turn
        assert turn["error"]["code"] == "limit_exceeded"
        assert f"wall-clock limit of {timeout} s reached" in turn["error"]["message"]
        assert timeout <= elapsed < timeout + 6
        assert seen[0] >= 1  # the loop ran on the host …
        assert wait_gone(mark) == []  # … and is gone
        assert_still_serving(server, scripted_model, env["id"])


def test_wall_clock_limit_also_covers_work_left_for_the_diff(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    timeout = 5
    with engine(tmp_path, sqlite_url, scripted_model, attempt_timeout_seconds=timeout) as server:
        env = server.api.create_env(repo)
        script = (
            "git config filter.slow.clean 'sleep 10; cat'\n"
            "echo 'README.md filter=slow' > .gitattributes; echo more >> README.md; echo set"
        )
        scripted_model.script = [Shell(script), Say("done")]
        t0 = time.monotonic()
        task = server.api.create_task(env["id"], "slow filter")
        details = wait_for_task(server.api, task["task"]["id"], timeout=60)
        elapsed = time.monotonic() - t0
        assert commands(details)[0][1:] == ("set\n", 0)  # the agent's part took no time
        assert elapsed < timeout + 3, f"the attempt ran {elapsed:.1f} s with a {timeout} s limit"


def test_the_agent_cannot_bend_the_diff_computed_in_its_sandbox(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path, tmp_path: Path
) -> None:
    """The diff runs in the agent's sandbox after Codex exits: the agent's leftover
    processes are killed first, and its git settings (repository config, ~/.gitconfig,
    .git/info/attributes) do not shape the diff."""
    mark = f"ticker-{uuid.uuid4().hex[:12]}"
    env = engine_server.api.create_env(repo)
    script = (
        "git config core.fsmonitor 'touch /workspace/FSMONITOR-RAN; echo'\n"
        "git config diff.noprefix true && git config color.ui always\n"
        "git config diff.external /bin/false\n"
        "printf '[diff]\\n\\tmnemonicPrefix = true\\n\\trenames = false\\n' > ~/.gitconfig\n"
        "echo '* -diff' > .git/info/attributes\n"
        "echo changed >> README.md\n"
        f"setsid nohup bash -c 'while :; do : {mark}; date +%N > ticker; sleep 0.01; done' "
        ">/dev/null 2>&1 </dev/null &\n"
        "sleep 0.5; echo set"
    )
    scripted_model.script = [Shell(script), Say("done")]
    task = engine_server.api.create_task(env["id"], "bend the diff")
    details = wait_for_task(engine_server.api, task["task"]["id"])
    assert turn_of(details)["turn_status"] == "completed", turn_of(details)
    diff = diff_of(details)
    assert diff.startswith("diff --git a/"), diff[:200]
    assert "\x1b[" not in diff and "Binary files" not in diff
    assert "+changed" in diff and "FSMONITOR-RAN" not in diff
    assert "diff --git a/ticker b/ticker" in diff  # written by the loop until it was killed
    assert wait_gone(mark) == []
    clone = tmp_path / "check"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    (tmp_path / "change.diff").write_text(diff)
    git("apply", "--check", str(tmp_path / "change.diff"), cwd=clone)


def test_git_and_loader_variables_stored_on_an_old_environment_do_not_bend_the_diff(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path, tmp_path: Path
) -> None:
    """Such names are refused now (400), but a row stored before may have them: the diff
    step runs with an environment of its own, so ``GIT_DIR`` and friends do not reach git."""
    from openwham.store import models as m

    api = engine_server.api
    env = api.create_env(repo)
    with engine_server.app_state.db.session() as s:
        row = s.get(m.Environment, env["id"])
        assert row is not None
        old = {
            "GIT_DIR": "/tmp/not-the-repository",
            "GIT_WORK_TREE": "/",
            "GIT_INDEX_FILE": "/tmp/elsewhere.index",
            "GIT_DIFF_OPTS": "--unified=0",
            "GIT_EXTERNAL_DIFF": "/bin/false",
        }
        row.body = {**row.body, "env_vars": old}
    scripted_model.script = [
        Shell("echo changed >> README.md; echo 'new file' > added.txt; env | grep ^GIT_DIR="),
        Say("done"),
    ]
    task = api.create_task(env["id"], "change two files")
    details = wait_for_task(api, task["task"]["id"])
    assert turn_of(details)["turn_status"] == "completed", turn_of(details)
    # the agent's own commands had them (the owner's choice back then) ...
    assert commands(details)[0][1].strip() == "GIT_DIR=/tmp/not-the-repository"
    # ... the diff did not
    diff = diff_of(details)
    assert "diff --git a/README.md b/README.md" in diff and "+changed" in diff, diff
    assert "diff --git a/added.txt b/added.txt" in diff and "+new file" in diff, diff
    clone = tmp_path / "check"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    (tmp_path / "change.diff").write_text(diff)
    git("apply", "--check", str(tmp_path / "change.diff"), cwd=clone)


# --------------------------------------------------------------------------- 9. stalls

PTRACE_INIT = (
    "python3 -c 'import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
    "r = libc.ptrace(ctypes.c_long(16), ctypes.c_long(1), None, None); "
    'print("attach", r, os.strerror(ctypes.get_errno()) if r else "ok")\''
)


def setup_lines(server: Server, task_id: str, turn_id: str) -> list[str]:
    r = server.api.get(f"tasks/{task_id}/turns/{turn_id}/logs")
    return [str(e["line"]) for e in r.json()["logs"]]


def test_a_setup_script_that_ptraces_init_is_refused_and_does_not_hang(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    """The reported attack: the setup script PTRACE_ATTACHes bwrap's init (pid 1). The
    seccomp filter refuses it, so setup goes on and the attempt completes at once (it used to
    show "Setting up" until the setup time limit)."""
    with engine(tmp_path, sqlite_url, scripted_model, setup_timeout_seconds=40) as server:
        env = server.api.create_env(repo, setup=[PTRACE_INIT, "echo setup went on"])
        scripted_model.script = [Say("done")]
        t0 = time.monotonic()
        created = server.api.create_task(env["id"], "ptrace init")
        details = wait_for_task(server.api, created["task"]["id"], timeout=60)
        turn = turn_of(details)
        assert turn["turn_status"] == "completed", turn
        assert time.monotonic() - t0 < 25
        lines = setup_lines(server, created["task"]["id"], created["turn"]["id"])
        assert lines == ["attach -1 Operation not permitted", "setup went on"], lines


def test_a_stopped_setup_sandbox_is_failed_as_stalled_and_frees_its_slot(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    """The setup script stops its own process group: nothing in the sandbox can run again.
    The watchdog fails the attempt after ``attempt_stall_seconds`` (not the setup time
    limit) with ``sandbox_stalled``, and the only executor slot is free for the next task."""
    opts = {"attempt_stall_seconds": 2, "setup_timeout_seconds": 60, "executor_concurrency": 1}
    with engine(tmp_path, sqlite_url, scripted_model, **opts) as server:
        stuck = server.api.create_env(repo, setup=["echo stopping", "kill -STOP 0"])
        t0 = time.monotonic()
        created = server.api.create_task(stuck["id"], "stop myself")
        details = wait_for_task(server.api, created["task"]["id"], timeout=60)
        elapsed = time.monotonic() - t0
        turn = turn_of(details)
        assert turn["turn_status"] == "failed", turn
        assert turn["error"]["code"] == "sandbox_stalled", turn["error"]
        message = turn["error"]["message"]
        assert message.startswith("The setup script's sandbox stalled: no output"), message
        assert "for 2 s" in message and "stopped or zombie" in message, message
        assert 2 <= elapsed < 20, elapsed
        assert setup_lines(server, created["task"]["id"], created["turn"]["id"]) == ["stopping"]
        env = server.api.create_env(repo, label="acme/plain")
        assert_still_serving(server, scripted_model, env["id"])


def test_an_agent_command_that_stops_every_process_fails_the_attempt_as_stalled(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    """A command SIGSTOPs every process it may (Codex, the launcher, the forwarder) and
    exits, left a zombie of the stopped Codex: the attempt fails with ``sandbox_stalled``
    after the stall time, and the next task completes on the one executor slot."""
    opts = {"attempt_stall_seconds": 2, "executor_concurrency": 1}
    with engine(tmp_path, sqlite_url, scripted_model, **opts) as server:
        env = server.api.create_env(repo)
        scripted_model.script = [Shell("kill -STOP -1; echo stopped-all"), Say("never")]
        t0 = time.monotonic()
        task = server.api.create_task(env["id"], "stop everything")
        details = wait_for_task(server.api, task["task"]["id"], timeout=90)
        elapsed = time.monotonic() - t0
        turn = turn_of(details)
        assert turn["turn_status"] == "failed", turn
        assert turn["error"]["code"] == "sandbox_stalled", turn["error"]
        assert turn["error"]["message"].startswith("The agent's sandbox stalled: "), turn
        assert elapsed < 30, elapsed
        assert_still_serving(server, scripted_model, env["id"])


# --------------------------------------------------------------------------- 10. disk budget

DISK_MB = 50
OVER_BUDGET = f"The attempt wrote more than {DISK_MB} MB (WHAM_SANDBOX_DISK_MB)"
# What each MODE of an environment makes its commands do: write past a 50 MB budget in files
# of 8 MB (under the file-size limit) beside a process that waits (`fill`; MARK names it),
# or end at once (`quick`: only the last measures may see it); 20,000 empty files (an inode
# each: 80 MB); 60 MB in a directory made unreadable; 60 MB in a file deleted while open; or
# (`fine`) a 6 MB file with 300 hard links and a 20 GB sparse file, well within the budget.
# Everything goes to the home, part of the attempt's directory but not of its diff.
DISK_MODES = r"""
case "${MODE:-}" in
fill) (exec -a "sleeper-$MARK" sleep 60) & sleep 1
      for i in $(seq 12); do head -c 8M /dev/zero > ~/fill$i; done; echo wrote; wait ;;
quick) for i in $(seq 8); do head -c 8M /dev/zero > ~/fill$i; done; echo wrote ;;
small) python3 -c 'import os
for i in range(20000): os.close(os.open(os.path.expanduser(f"~/e{i}"), os.O_CREAT))'
       echo wrote; sleep 60 ;;
hidden) mkdir -p ~/a/b; for i in $(seq 8); do head -c 8M /dev/zero > ~/a/b/f$i; done
        chmod 000 ~/a/b ~/a; echo wrote; sleep 60 ;;
deleted) python3 -c 'import os, time
fd = os.open(os.path.expanduser("~"), os.O_TMPFILE | os.O_RDWR)
for _ in range(8): os.write(fd, bytes(8 << 20))
print("wrote", flush=True); time.sleep(60)' ;;
fine) head -c 6M /dev/urandom > ~/f; mkdir ~/l; for i in $(seq 300); do ln ~/f ~/l/$i; done
      truncate -s 20G ~/sparse; sleep 2; echo within ;;
*) echo plain ;;
esac
"""


def attempt_files(server: Server, details: dict[str, Any]) -> Path:
    return data_dir(server) / "attempts" / turn_of(details)["id"]


def assert_over_disk(server: Server, details: dict[str, Any], elapsed: float) -> None:
    """Failed with ``disk_quota_exceeded`` well before the command's 60 s sleep ended, and
    the attempt's files are gone."""
    turn = turn_of(details)
    assert turn["turn_status"] == "failed", turn
    assert turn["error"] == {"code": "disk_quota_exceeded", "message": OVER_BUDGET}, turn["error"]
    assert elapsed < 40, elapsed
    files = attempt_files(server, details)
    deadline = time.monotonic() + 10  # removed right after the terminal status is written
    while files.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not files.exists(), sorted(p.name for p in files.iterdir())


def test_an_agent_that_writes_past_its_disk_budget_fails_while_the_task_beside_it_completes(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    """The reported attack (an attempt wrote 2.7 GB to the host's disk), at 50 MB: the
    agent's command writes past the budget and waits; the monitor kills its sandbox and the
    attempt fails saying why, while a task started beside it on the other executor slot
    completes. A command that writes and ends at once is caught too."""
    mark = f"disk-{uuid.uuid4().hex[:12]}"
    with engine(tmp_path, sqlite_url, scripted_model, sandbox_disk_mb=DISK_MB) as server:
        filler = server.api.create_env(repo, env_vars={"MODE": "fill", "MARK": mark})
        plain = server.api.create_env(repo, label="acme/plain")
        scripted_model.script = [Shell(DISK_MODES), Say("done")]
        t0 = time.monotonic()
        bad = server.api.create_task(filler["id"], "fill the disk")
        good = server.api.create_task(plain["id"], "beside it")
        seen = [0]

        def sample() -> None:
            seen[0] = max(seen[0], len(host_pids(f"sleeper-{mark}")))

        details = watch_task(server, bad["task"]["id"], sample, timeout=90)
        assert_over_disk(server, details, time.monotonic() - t0)
        assert seen[0] == 1  # it ran …
        assert wait_gone(f"sleeper-{mark}") == []  # … and died with the sandbox
        beside = wait_for_task(server.api, good["task"]["id"], timeout=90)
        assert turn_of(beside)["turn_status"] == "completed", turn_of(beside)
        assert commands(beside)[0][1] == "plain\n"

        quick = server.api.create_env(repo, label="acme/quick", env_vars={"MODE": "quick"})
        t0 = time.monotonic()
        task = server.api.create_task(quick["id"], "write and stop")
        details = wait_for_task(server.api, task["task"]["id"], timeout=90)
        assert_over_disk(server, details, time.monotonic() - t0)
        assert_still_serving(server, scripted_model, plain["id"])


def test_a_setup_script_that_writes_past_the_disk_budget_fails_while_the_task_beside_it_completes(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    """The same from the setup script (its sandbox, the same budget): the attempt fails
    before the agent starts, and the task beside it completes."""
    opts = {"sandbox_disk_mb": DISK_MB, "setup_timeout_seconds": 120}
    with engine(tmp_path, sqlite_url, scripted_model, **opts) as server:
        filler = server.api.create_env(repo, env_vars={"MODE": "fill"}, setup=[DISK_MODES])
        plain = server.api.create_env(repo, label="acme/plain")
        scripted_model.script = [Shell(DISK_MODES), Say("done")]
        t0 = time.monotonic()
        bad = server.api.create_task(filler["id"], "fill the disk in setup")
        good = server.api.create_task(plain["id"], "beside it")
        details = wait_for_task(server.api, bad["task"]["id"], timeout=90)
        assert_over_disk(server, details, time.monotonic() - t0)
        assert commands(details) == []  # the agent never started
        beside = wait_for_task(server.api, good["task"]["id"], timeout=90)
        assert turn_of(beside)["turn_status"] == "completed", turn_of(beside)


@pytest.mark.parametrize("mode", ["small", "hidden", "deleted"])
def test_files_hidden_from_the_disk_budget_still_count(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path, mode: str
) -> None:
    """Attacks on the measure: many empty files (no data blocks), a directory made
    unreadable, a file written after it was deleted (held open). Each still fails the
    attempt with ``disk_quota_exceeded``."""
    with engine(tmp_path, sqlite_url, scripted_model, sandbox_disk_mb=DISK_MB) as server:
        env = server.api.create_env(repo, env_vars={"MODE": mode})
        scripted_model.script = [Shell(DISK_MODES), Say("done")]
        t0 = time.monotonic()
        task = server.api.create_task(env["id"], f"hide {mode}")
        details = wait_for_task(server.api, task["task"]["id"], timeout=90)
        assert_over_disk(server, details, time.monotonic() - t0)


def test_hard_links_and_sparse_files_are_no_reason_to_fail(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    """No false kill: 300 names of one 6 MB file and a 20 GB sparse file fit in 50 MB."""
    opts = {"sandbox_disk_mb": DISK_MB, "sandbox_max_file_mb": 32 << 10}
    with engine(tmp_path, sqlite_url, scripted_model, **opts) as server:
        env = server.api.create_env(repo, env_vars={"MODE": "fine"})
        details = run_script(server, scripted_model, env["id"], DISK_MODES)
        assert turn_of(details)["turn_status"] == "completed", turn_of(details)
        assert commands(details)[0][1:] == ("within\n", 0)
