"""``SandboxProvider``: what the engine needs of a sandbox, and bubblewrap's implementation.

The engine starts held sandboxes (an agent waiting for its prompt) and sandboxes that run to
their end (an environment's setup script), runs short commands in one (a diff computed anew,
a standby's index refresh) and checks the host can make one at all (``wham serve``'s runner).
It does so through this protocol, so engine logic (claim, setup, cancel, failure codes,
results and diffs) can be tested with a provider that runs a scripted process in milliseconds
(tests/support/fake_sandbox.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from . import bwrap
from .bwrap import SandboxResult, SandboxSpec

OutputSink = Callable[[str, str], None]


class Sandbox(Protocol):
    """A running sandbox as the engine drives it (``bwrap.SandboxProcess``)."""

    @property
    def spec(self) -> SandboxSpec: ...

    def send(self, stdin: bytes, on_output: OutputSink | None = None) -> bool:
        """A held sandbox's input; False if it died meanwhile."""
        ...

    def wait_ready(self, timeout: float) -> bool: ...

    def hurry(self) -> None:
        """The normal CPU weight from now on (a ``background`` sandbox waited for)."""
        ...

    def signal_command(self, signum: int) -> bool: ...

    def check_disk(self) -> bool: ...

    def drain(self, timeout: float) -> bool:
        """Once ended: wait until all its output went through ``on_output``."""
        ...

    def notify_on_exit(self, event: threading.Event) -> None: ...

    def poll(self) -> SandboxResult | None: ...

    def wait(self, timeout: float | None = None) -> SandboxResult: ...

    def kill(self, reason: str = "killed on request") -> SandboxResult: ...


class SandboxProvider(Protocol):
    """Makes sandboxes (see ``bwrap.start`` / ``bwrap.run`` for the contract)."""

    def start(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_output: OutputSink | None = None,
        hold: bool = False,
        ready_marker: str | None = None,
    ) -> Sandbox: ...

    def run(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_output: OutputSink | None = None,
    ) -> SandboxResult: ...

    def selftest(self) -> str | None:
        """``None`` if sandboxes work on this host, else why not."""
        ...

    def host_gaps(self) -> list[str]:
        """Limits this host cannot enforce (for the log)."""
        ...

    def disk_enforcement(self, limit_mb: int) -> str:
        """How an attempt's disk budget of ``limit_mb`` is enforced here (for the log)."""
        ...


class Bubblewrap:
    """The production provider: bubblewrap with cgroups, seccomp and rlimits (bwrap.py)."""

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
        return bwrap.start(
            spec, argv, stdin=stdin, on_output=on_output, hold=hold, ready_marker=ready_marker
        )

    def run(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_output: OutputSink | None = None,
    ) -> SandboxResult:
        return bwrap.run(spec, argv, stdin=stdin, on_output=on_output)

    def selftest(self) -> str | None:
        return bwrap.selftest()

    def host_gaps(self) -> list[str]:
        return bwrap.host_gaps()

    def disk_enforcement(self, limit_mb: int) -> str:
        return bwrap.disk_enforcement(limit_mb)


BUBBLEWRAP: SandboxProvider = Bubblewrap()
