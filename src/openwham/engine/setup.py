"""The setup phase: an environment's setup script, run before the agent in its own sandbox.

The script runs with bash ``-e`` (a failing command ends it) in ``/workspace`` on the
attempt's workspace and home directory (what it installs there stays for the agent phase),
with the environment's variables and secrets, and with the network through the egress proxy
only (``http_proxy`` / ``https_proxy`` point at a forwarder inside the sandbox; the proxy
refuses host and private addresses, ``sandbox.egress``). Its output (stdout and stderr in
order) is stored line by line as the turn's setup log, redacted, while it runs. The agent
phase then starts in a new sandbox without the secrets and without the egress socket.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from openwham.gateway import forwarder_path
from openwham.runtimes import codex
from openwham.sandbox.bwrap import SANDBOX_HOME, Limits, SandboxResult, SandboxSpec
from openwham.sandbox.disk import DiskBudget
from openwham.sandbox.egress import EgressPolicy, EgressProxy
from openwham.sandbox.provider import Sandbox, SandboxProvider
from openwham.wire.common import naive_iso


class SetupLog(Protocol):
    """Where a setup run's log and proxy events go: the attempt's ``TurnRecorder``, or
    :class:`Collected` for a maintenance script run while a standby is prepared (no turn
    yet; replayed on the attempt that takes it)."""

    def set(self, **fields: Any) -> None: ...

    def setup_log(self, key: dict[str, Any], lines: list[tuple[str, str]]) -> None: ...

    def proxy_event(self, event: dict[str, Any]) -> None: ...


class Collected:
    """A :class:`SetupLog` that keeps the lines and proxy events (not redacted here: the
    recorder they are replayed on redacts them)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.events: list[dict[str, Any]] = []

    def set(self, **fields: Any) -> None:
        pass  # the log's key: the replay makes its own

    def setup_log(self, key: dict[str, Any], lines: list[tuple[str, str]]) -> None:
        self.lines.extend(lines)

    def proxy_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)


SANDBOX_EGRESS_SOCKET = "/run/wham/egress.sock"
PROXY_LISTEN = "127.0.0.1:3128"
# the same forwarder, Python and launcher status as the agent's gateway forwarder
SANDBOX_PYTHON, SANDBOX_FORWARDER = codex.SANDBOX_PYTHON, codex.SANDBOX_FORWARDER
LAUNCHER_FAILED = codex.LAUNCHER_FAILED
FLUSH_SECONDS = 0.2
MAX_LOG_LINES = 20_000  # per setup log; later lines are dropped with a note
MAX_LINE_CHARS = 16_000

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY")

_LAUNCHER = """\
set -u
python=$1 forwarder=$2 listen=$3 socket=$4 script=$5
exec 3< <(exec "$python" -I "$forwarder" --listen "$listen" --unix "$socket" --pass-socket \
  </dev/null 2>/tmp/.openwham-egress.log)
if ! read -r -t 10 line <&3 || [ "${line%% *}" != ready ]; then
  echo "openwham: the network forwarder did not start: $(tail -c 2000 /tmp/.openwham-egress.log)"
  exit @FAILED@
fi
exec 3<&- 2>&1
exec /bin/bash -e -c "$script" setup
""".replace("@FAILED@", str(LAUNCHER_FAILED))


def proxy_env(listen: str = PROXY_LISTEN) -> dict[str, str]:
    """What points tools (curl, pip, npm, git, …) at the in-sandbox forwarder."""
    url = f"http://{listen}"
    local = "localhost,127.0.0.1,::1"
    return dict(zip(PROXY_VARS, (url, url, url, url, local, local), strict=True))


def argv(script: str) -> list[str]:
    """The setup sandbox's command: start the forwarder to the egress socket, then the script."""
    return [
        "/bin/bash",
        "-c",
        _LAUNCHER,
        "openwham-setup",
        SANDBOX_PYTHON,
        SANDBOX_FORWARDER,
        PROXY_LISTEN,
        SANDBOX_EGRESS_SOCKET,
        script,
    ]


def log_key(now: float | None = None) -> dict[str, Any]:
    """The key of a setup log (docs/reference/wham-api.md §4.9): its name carries the start time."""
    now = time.time() if now is None else now
    return {
        "type": "UserSetupScript",
        "name": f"userscript_{int(now)}",
        "created_at": naive_iso(now),
    }


def note(rec: SetupLog, lines: tuple[str, ...]) -> dict[str, Any]:
    """Start the turn's setup log with the server's own ``lines``; returns its key."""
    key = log_key()
    rec.set(logs={"logs": [{"key": key, "value": f"file_{uuid.uuid4().hex}"}]})
    if lines:
        rec.setup_log(key, [("stdout", line) for line in lines])
    return key


class _Lines:
    """Output lines collected from the reader thread, handed to the recorder in batches."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lines: list[tuple[str, str]] = []
        self.count = 0
        self.dropped = 0

    def add(self, stream: str, line: str) -> None:
        with self.lock:
            if self.count >= MAX_LOG_LINES:
                self.dropped += 1
                return
            self.count += 1
            if len(line) > MAX_LINE_CHARS:
                line = line[:MAX_LINE_CHARS] + " […]"
            self.lines.append((stream, line))

    def take(self) -> list[tuple[str, str]]:
        with self.lock:
            lines, self.lines = self.lines, []
            return lines


def run(
    script: str,
    *,
    workspace: Path,
    home: Path,
    env: Mapping[str, str],
    egress: EgressProxy,
    limits: Limits,
    rec: SetupLog,
    attach: Callable[[Sandbox | None], None],
    sandbox: SandboxProvider,
    disk: DiskBudget | None = None,
    preface: tuple[str, ...] = (),
) -> SandboxResult:
    """Run ``script`` to its end in a sandbox from ``sandbox``, recording its log (after the
    server's ``preface`` lines) and network requests on ``rec``; ``disk`` is the attempt's
    disk budget."""
    key = note(rec, preface)
    lines = _Lines()
    with egress.open(
        EgressPolicy(), on_event=lambda e: rec.proxy_event({**e.wire(), "phase": "setup"})
    ) as session:
        spec = SandboxSpec(
            workspace=workspace,
            ro_binds={forwarder_path(): SANDBOX_FORWARDER, session.socket: SANDBOX_EGRESS_SOCKET},
            rw_binds={home: SANDBOX_HOME},
            env={**env, **proxy_env()},
            limits=limits,
            idle_helpers=(SANDBOX_FORWARDER,),
            disk=disk,
        )
        proc = sandbox.start(spec, argv(script), on_output=lines.add)
        attach(proc)
        try:
            while True:
                try:
                    result: SandboxResult | None = proc.wait(timeout=FLUSH_SECONDS)
                except TimeoutError:
                    result = None
                if batch := lines.take():
                    rec.setup_log(key, batch)
                if result is not None:
                    break
        finally:
            attach(None)
            if proc.poll() is None:
                proc.kill("setup ended")
    if lines.dropped:
        rec.setup_log(key, [("stdout", f"[openwham: {lines.dropped} more lines not kept]")])
    return result
