"""A ``SandboxProvider`` for fast engine tests: no bubblewrap, no Codex, a scripted process.

``ScriptedSandboxes`` answers every ``start`` with a :class:`ScriptedSandbox` that, once sent
its input, writes the script's files into the sandbox's binds, prints its stdout and stderr
lines and ends with its exit code (or, ``hang``, runs until killed), so the engine's own
logic — claim, setup, cancel, failure codes, results and diffs — runs in milliseconds. Held
starts (the agent) play ``script``, others (the setup script) ``setup``, ``run`` (a diff
computed anew, a standby's index refresh) plays ``helper``. It records what the engine asked
for (specs, argv, stdin) for the test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from openwham.sandbox.bwrap import SANDBOX_WORKSPACE, SandboxResult, SandboxSpec
from openwham.sandbox.provider import Sandbox

OutputSink = Callable[[str, str], None]


@dataclass(frozen=True)
class Script:
    """What a scripted process does: write ``files`` (sandbox path → text: the host file
    behind the workspace or a writable bind), print ``stdout`` then ``stderr``, then exit."""

    stdout: Sequence[str] = ()
    stderr: Sequence[str] = ()
    exit_code: int = 0
    hang: bool = False  # keep running until killed (a cancel, a limit)
    files: Mapping[str, str] = field(default_factory=dict)


def host_path(spec: SandboxSpec, inside: str) -> Path:
    """The host path behind ``inside`` in a sandbox made from ``spec`` (workspace or a
    writable bind); a path the sandbox could not write is a test error."""
    path = PurePosixPath(inside)
    mounts = {dest: host for host, dest in spec.rw_binds.items()}
    if not spec.workspace_readonly:
        mounts[SANDBOX_WORKSPACE] = spec.workspace
    for dest, host in mounts.items():
        if path.is_relative_to(dest):
            return Path(host) / path.relative_to(dest)
    raise AssertionError(f"{inside} is not writable in this sandbox")


class ScriptedSandbox:
    """One scripted run (implements ``openwham.sandbox.provider.Sandbox``)."""

    def __init__(self, spec: SandboxSpec, argv: Sequence[str], script: Script) -> None:
        self.spec = spec
        self.argv = list(argv)
        self.script = script
        self.stdin: bytes | None = None
        self.sent = threading.Event()
        self.signals: list[int] = []
        self.hurried = False
        self._lock = threading.Lock()
        self._exit_events: list[threading.Event] = []
        self._result: SandboxResult | None = None
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def hurry(self) -> None:
        self.hurried = True

    def send(self, stdin: bytes, on_output: OutputSink | None = None) -> bool:
        self.hurry()
        if self._done.is_set():
            return False
        self.stdin = stdin
        self.sent.set()
        threading.Thread(target=self._play, args=(on_output,), daemon=True).start()
        return True

    def _play(self, sink: OutputSink | None) -> None:
        for inside, text in self.script.files.items():
            host_path(self.spec, inside).write_text(text)
        for line in self.script.stdout:
            if sink is not None and not self._done.is_set():
                sink("stdout", line)
        for line in self.script.stderr:
            if sink is not None and not self._done.is_set():
                sink("stderr", line)
        if not self.script.hang:
            self._end(self.script.exit_code, None)

    def _end(self, exit_code: int, killed_reason: str | None) -> SandboxResult:
        with self._lock:
            if self._result is None:
                self._result = SandboxResult(
                    exit_code=exit_code,
                    timed_out=False,
                    killed_reason=killed_reason,
                    stdout="\n".join(self.script.stdout),
                    stderr="\n".join(self.script.stderr),
                    duration=time.monotonic() - self._t0,
                )
                self._done.set()
                for event in self._exit_events:
                    event.set()
            return self._result

    def wait_ready(self, timeout: float) -> bool:
        return True

    def signal_command(self, signum: int) -> bool:
        self.signals.append(signum)
        return not self._done.is_set()

    def check_disk(self) -> bool:
        return False

    def drain(self, timeout: float) -> bool:
        return True  # _play hands every line over before the run ends

    def notify_on_exit(self, event: threading.Event) -> None:
        with self._lock:
            self._exit_events.append(event)
            if self._result is not None:
                event.set()

    def poll(self) -> SandboxResult | None:
        return self._result

    def wait(self, timeout: float | None = None) -> SandboxResult:
        if not self._done.wait(timeout):
            raise TimeoutError("the scripted sandbox is still running")
        assert self._result is not None
        return self._result

    def kill(self, reason: str = "killed on request") -> SandboxResult:
        return self._end(-9, reason)


@dataclass
class ScriptedSandboxes:
    """The provider: a held ``start`` (the agent) plays ``script``, any other ``start`` (the
    setup script) ``setup``, ``run`` (short helper commands) ``helper``."""

    script: Script = field(default_factory=Script)
    setup: Script = field(default_factory=Script)
    helper: Script = field(default_factory=Script)
    started: list[ScriptedSandbox] = field(default_factory=list)
    ran: list[ScriptedSandbox] = field(default_factory=list)
    first_start: threading.Event = field(default_factory=threading.Event)

    def start(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_output: OutputSink | None = None,
        hold: bool = False,
        ready_marker: str | None = None,
    ) -> Sandbox:
        proc = ScriptedSandbox(spec, argv, self.script if hold else self.setup)
        self.started.append(proc)
        self.first_start.set()
        if not hold:
            proc.send(stdin or b"", on_output)
        return proc

    def run(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_output: OutputSink | None = None,
    ) -> SandboxResult:
        proc = ScriptedSandbox(spec, argv, self.helper)
        self.ran.append(proc)
        proc.send(stdin or b"", on_output)
        return proc.wait()

    def selftest(self) -> str | None:
        return None

    def host_gaps(self) -> list[str]:
        return []

    def disk_enforcement(self, limit_mb: int) -> str:
        return "not enforced (a scripted sandbox)"
