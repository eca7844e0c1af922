"""How an attempt is stopped, bounded and how it fails: ``Control`` (an executor's handle on
a running attempt: ``cancel`` kills its sandbox, or interrupts its agent's turn first),
``Stopped``, ``AttemptFailed`` (the
error code and message an attempt fails with) and its limits (``attempt_limits``,
``disk_budget``: what every sandbox of an attempt may use)."""

from __future__ import annotations

import threading
from pathlib import Path

from openwham.config import Settings
from openwham.sandbox import disk
from openwham.sandbox.bwrap import Limits
from openwham.sandbox.disk import DiskBudget
from openwham.sandbox.provider import Sandbox


class AttemptFailed(Exception):
    """Ends an attempt as ``failed`` with ``error{code, message}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


DISK_QUOTA_EXCEEDED = "disk_quota_exceeded"
DISK_SETTING = "WHAM_SANDBOX_DISK_MB"


def over_disk(reason: str) -> AttemptFailed:
    return AttemptFailed(DISK_QUOTA_EXCEEDED, reason[:1].upper() + reason[1:])


def attempt_limits(settings: Settings) -> Limits:
    """An attempt's sandbox limits, from the ``WHAM_SANDBOX_*`` and timeout settings."""
    s = settings
    return Limits(
        wall_clock_seconds=float(s.attempt_timeout_seconds),
        max_processes=s.sandbox_max_processes,
        memory_bytes=s.sandbox_memory_mb << 20,
        max_file_bytes=s.sandbox_max_file_mb << 20,
        cpus=s.sandbox_cpus,
        stall_seconds=s.attempt_stall_seconds,
    )


def disk_budget(settings: Settings, directory: Path) -> DiskBudget | None:
    """What an attempt's directory may hold: what it holds now (the checkout) plus
    ``WHAM_SANDBOX_DISK_MB``, for every sandbox of the attempt (None: no budget)."""
    mb = settings.sandbox_disk_mb
    if mb <= 0:
        return None
    start = disk.usage([directory])
    return DiskBudget(
        paths=(directory,),
        max_bytes=start + (mb << 20),
        start_bytes=start,
        what="the attempt",
        limit_mb=mb,
        setting=DISK_SETTING,
    )


#: how long an interrupted agent may take to end its turn and exit before its sandbox is killed
INTERRUPT_SECONDS = 3.0


class Control:
    """How an executor stops an attempt: ``cancel`` kills its sandbox at once; a user's
    cancel of an agent attached with an ``interrupt`` signal (app-server mode) sends it that
    signal instead (the agent interrupts its turn and exits, the launcher then ends the
    sandbox) and kills the sandbox only if it still runs :data:`INTERRUPT_SECONDS` later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None  # "cancelled", "shutdown" or "superseded"
        self._process: Sandbox | None = None
        self._interrupt: int | None = None
        #: the agent was sent its interrupt signal (later cancels leave it to the grace)
        self.interrupted = False

    def cancel(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            proc, signum = self._process, self._interrupt
            gentle = reason == "cancelled" and signum is not None and proc is not None
            if gentle and self.interrupted:
                return  # interrupted already: the grace's kill follows if it hangs
            self.interrupted = self.interrupted or gentle
        if proc is None:
            return
        if gentle and signum is not None and proc.signal_command(signum):
            kill = threading.Timer(INTERRUPT_SECONDS, proc.kill, args=(_KILLED["cancelled"],))
            kill.daemon = True
            kill.start()
            return
        proc.kill(_KILLED.get(reason, "server stopping"))

    def attach(self, proc: Sandbox | None, interrupt: int | None = None) -> None:
        """The attempt's sandbox from now on (``None``: none); ``interrupt``: see the class."""
        with self._lock:
            self._process, self._interrupt = proc, interrupt
            stopped = self.reason is not None
        if proc is not None and stopped:
            proc.kill("cancelled by the user")

    def check(self) -> None:
        if self.reason is not None:
            raise Stopped()


_KILLED = {
    "cancelled": "cancelled by the user",
    "superseded": "the attempt was requeued and is run by another worker",
}


class Stopped(Exception):
    """Raised by :meth:`Control.check` once the attempt is cancelled or the server stops."""
