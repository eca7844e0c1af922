"""Host processes seen from the test: what a sandbox left behind."""

from __future__ import annotations

import time
from pathlib import Path


def host_pids(needle: str, *, source: str = "cmdline") -> list[int]:
    """Live host pids whose ``/proc/<pid>/<source>`` (``cmdline`` or ``environ``) contains
    ``needle``; zombies excluded (they are dead, only not yet reaped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / source).read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle.encode() in data and state != "Z":
            found.append(int(entry.name))
    return found


def wait_gone(needle: str, timeout: float = 3.0, *, interval: float = 0.02) -> list[int]:
    """Wait until no host process matches ``needle``; returns those still left."""
    deadline = time.monotonic() + timeout
    while (left := host_pids(needle)) and time.monotonic() < deadline:
        time.sleep(interval)
    return left
