"""How an attempt is stopped and how it fails: ``Control`` (an executor's handle on a running
attempt: ``cancel`` kills its sandbox at once), ``Stopped`` and ``AttemptFailed`` (the error
code and message an attempt fails with)."""

from __future__ import annotations

import threading

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


class Control:
    """How an executor stops an attempt: ``cancel`` kills its sandbox at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None  # "cancelled" or "shutdown"
        self._process: Sandbox | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            proc = self._process
        if proc is not None:
            proc.kill("cancelled by the user" if reason == "cancelled" else "server stopping")

    def attach(self, proc: Sandbox | None) -> None:
        with self._lock:
            self._process = proc
            stopped = self.reason is not None
        if proc is not None and stopped:
            proc.kill("cancelled by the user")

    def check(self) -> None:
        if self.reason is not None:
            raise Stopped()


class Stopped(Exception):
    """Raised by :meth:`Control.check` once the attempt is cancelled or the server stops."""
