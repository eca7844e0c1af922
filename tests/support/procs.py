"""Host processes seen from the test: what a sandbox left behind.

Other programs run on the same machine (another openwham, another test run), so a test only
ever looks for *its own* processes: by a marker unique to the test (in a command line or an
environment) or by the PID namespace of a sandbox it started. A generic needle such as the
Codex binary's path would match someone else's sandbox, so :func:`host_pids` refuses it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# A marker must carry something random: a uuid fragment, a nanosecond clock or a token.
_UNIQUE = re.compile(r"[0-9a-f]{8,}|[0-9]{9,}|[A-Za-z0-9_-]{24,}")


def unique_marker(prefix: str) -> str:
    """A needle no other program on the machine carries."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _require_unique(needle: str) -> None:
    if not _UNIQUE.search(needle):
        raise ValueError(
            f"{needle!r} is not unique to this test: it could match another program's "
            "processes; put a unique_marker() into what the test starts, or match by namespace"
        )


def _live(entry: Path) -> bool:
    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"  # zombies are dead, only not yet reaped


def _scan(match: Callable[[Path], bool]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if match(entry) and _live(entry):
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def host_pids(needle: str, *, source: str = "cmdline") -> list[int]:
    """Live host pids whose ``/proc/<pid>/<source>`` (``cmdline`` or ``environ``) contains
    ``needle``, which must be unique to the calling test."""
    _require_unique(needle)
    data = needle.encode()
    return _scan(lambda entry: data in (entry / source).read_bytes())


def host_pids_each(needles: list[str]) -> dict[str, list[int]]:
    """:func:`host_pids` of each of ``needles`` in one pass over ``/proc`` (each process's
    ``cmdline`` read once): a scan costs a GIL hand-over per file read, and a busy thread of
    the test process makes each of those wait (~5 ms), so four scans of a few hundred
    processes could take seconds."""
    for needle in needles:
        _require_unique(needle)
    found: dict[str, list[int]] = {n: [] for n in needles}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            hits = [n for n in needles if n.encode() in cmdline]
            if hits and _live(entry):
                for n in hits:
                    found[n].append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def cwd_pids(directory: Path) -> list[int]:
    """Live host pids working inside ``directory`` (e.g. git run by a server in its data
    directory), whose path must be unique to the calling test."""
    _require_unique(str(directory))
    inside = os.fspath(directory.resolve()) + os.sep

    def match(entry: Path) -> bool:
        return (os.readlink(entry / "cwd") + os.sep).startswith(inside)

    return _scan(match)


def pid_namespace(pid: int) -> str:
    """The PID namespace of a process (``pid:[inode]``)."""
    return os.readlink(f"/proc/{pid}/ns/pid")


def sandbox_namespace(outer_pid: int, timeout: float = 5.0) -> str:
    """The PID namespace a sandbox started by this test runs in: that of the first
    descendant of ``outer_pid`` (bwrap, in the host's namespace) that lives in another one."""
    host = pid_namespace(outer_pid)
    deadline = time.monotonic() + timeout
    while True:
        pending = [outer_pid]
        while pending:
            pid = pending.pop()
            try:
                ns = pid_namespace(pid)
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            if ns != host:
                return ns
            pending += [int(c) for c in children]
        if time.monotonic() > deadline:
            raise AssertionError(f"no sandboxed process under pid {outer_pid}")
        time.sleep(0.02)


def namespace_pids(namespace: str) -> list[int]:
    """Live host pids inside the given PID namespace."""
    return _scan(lambda entry: os.readlink(entry / "ns" / "pid") == namespace)


def wait_gone(
    needle: str | None = None,
    timeout: float = 3.0,
    *,
    namespace: str | None = None,
    interval: float = 0.02,
) -> list[int]:
    """Wait until none of the test's processes (by ``needle`` or ``namespace``) is left;
    returns those still left."""
    if (needle is None) == (namespace is None):
        raise TypeError("give exactly one of needle and namespace")

    def left() -> list[int]:
        return namespace_pids(namespace) if namespace is not None else host_pids(needle or "")

    deadline = time.monotonic() + timeout
    while (pids := left()) and time.monotonic() < deadline:
        time.sleep(interval)
    return pids


@contextmanager
def foreign_process(argv0: str, *args: str) -> Iterator[int]:
    """A process that is not the test's own but looks like one (``argv[0]`` set to, say, the
    sandbox's Codex path), as another openwham on the machine would leave running: a test
    that still passes beside it does not mistake other programs' processes for its own."""
    proc = subprocess.Popen(
        ["bash", "-c", 'exec -a "$0" sleep 300', argv0, *args], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0] != argv0.encode():
            assert time.monotonic() < deadline, "the foreign process did not start"
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# A setpriv that lets its parent (the "server") be killed first, then does its job: the
# window between the server's vfork and the armed parent-death signal, widened at will.
_SLOW_SETPRIV = """#!/bin/sh
echo $$ > {pid}
kill -9 $PPID
while [ "$(cut -d' ' -f4 /proc/$$/stat)" = "$PPID" ]; do sleep 0.01; done
exec {setpriv} "$@"
"""


def slow_setpriv(directory: Path) -> tuple[Path, Path]:
    """A ``setpriv`` for ``openwham.lifeline.setpriv`` that SIGKILLs the process that started
    it, waits until it is reparented, then runs the real one; and the file it writes its pid
    to first (``lifeline.command``'s command keeps that pid)."""
    from openwham import lifeline

    script, pid = directory / "slow-setpriv", directory / "slow-setpriv.pid"
    script.write_text(_SLOW_SETPRIV.format(pid=pid, setpriv=lifeline.setpriv()))
    script.chmod(0o755)
    return script, pid
