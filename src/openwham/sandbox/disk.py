"""A sandbox's disk budget: how much its host directories may hold, measured from the host.

Why a monitor and not a size-limited file system: a loop-mounted ext4 per attempt (or an XFS
project quota) needs ``CAP_SYS_ADMIN`` and loop devices, which unprivileged containers (a
usual CI runner) do not have, a ``mkfs`` at every attempt start, and leaves mounts behind
when the server is killed; the monitor works wherever a sandbox does. What it measures
(:class:`Meter`), so that an agent cannot hide what it writes:

- **Blocks, not sizes**: ``st_blocks`` (sparse files count what they take, ``fallocate``
  counts what it reserved), and every inode at least :data:`MIN_CHARGE` (an empty file still
  takes one of the file system's limited inodes, so a million empty files are 4 GB).
- **Hard links once**: an inode with several names counts once, each further name
  :data:`LINK_CHARGE`.
- **Unreadable directories**: the walk reads through ``chmod 000`` (root needs nothing for
  that; another server user owns the sandbox's files, so it lends itself read access and
  puts the mode back).
- **Deleted but open files**: files the sandbox's processes hold open (``/proc/PID/fd``) or
  mapped (``/proc/PID/map_files``) after unlinking them, and ``O_TMPFILE`` files.
- **A consistent picture**: the sandbox's cgroup is frozen while it is measured, where the
  host offers a freezer, so files cannot be moved behind the walk (an agent can see the
  walk with inotify). Without one, such moves can escape single walks.
- **Depth**: directories nested deeper than :data:`MAX_DEPTH` are not walked; the budget
  counts as exceeded (no real tree is that deep; the walk holds a descriptor per level).

The directories are opened once: a standby sandbox's directory is renamed to its attempt's
while the sandbox runs, and the descriptors follow it. The walk stops as soon as the total
is over the limit, so a tree never costs more than its budget's worth of entries.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

MIN_CHARGE = 4096  # bytes an inode counts at least (one block)
QUIET_BYTES = 1 << 20  # growth signals below this between two measures: no new measure …
QUIET_SECONDS = 10.0  # … for at most this long
LINK_CHARGE = 256  # bytes each further name of a hard-linked inode counts
MAX_DEPTH = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class DiskBudget:
    """``paths`` (host directories, measured together) may hold ``max_bytes`` at most.
    ``what``, ``limit_mb`` and ``setting`` word the reason a run is killed for."""

    paths: tuple[Path, ...]
    max_bytes: int
    start_bytes: int = 0  # what they held when the budget was made (the first measure)
    what: str = "the sandbox"
    limit_mb: int | None = None
    setting: str = ""

    def reason(self, usage: Usage) -> str:
        """Why ``usage`` is over the budget, as a sentence's start."""
        setting = f" ({self.setting})" if self.setting else ""
        if usage.over_reason:
            why = usage.over_reason
            return f"{self.what} made what its disk budget cannot measure: {why}{setting}"
        limit = self.limit_mb if self.limit_mb is not None else self.max_bytes >> 20
        return f"{self.what} wrote more than {limit} MB{setting}"


@dataclass
class Usage:
    """One measure: bytes charged, entries seen, and why it is over (beyond the byte count)."""

    bytes: int = 0
    entries: int = 0
    over_reason: str | None = None
    _seen: set[tuple[int, int]] = field(default_factory=set, repr=False)

    def add(self, st: os.stat_result) -> None:
        self.entries += 1
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in self._seen:
                self.bytes += LINK_CHARGE
                return
            self._seen.add(key)
        self.bytes += max(st.st_blocks * 512, MIN_CHARGE)

    def add_unlinked(self, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += st.st_blocks * 512


class _Over(Exception):
    pass


class Meter:
    """Measures a set of host directories (opened now, followed through renames)."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self._fds: list[int] = []
        try:
            for path in paths:
                self._fds.append(os.open(path, _DIR_FLAGS))
        except BaseException:
            self.close()
            raise
        if not self._fds:
            raise ValueError("a disk budget needs at least one directory")
        self.devices = frozenset(os.fstat(fd).st_dev for fd in self._fds)
        self._root = os.geteuid() == 0

    @property
    def fd(self) -> int:
        """A descriptor of the first directory (for ``fstatvfs``); ``OSError`` (``EBADF``) once
        closed: the sandbox's thread closes its meter when the run ends, which another thread
        looking at the meter (``SandboxProcess.check_disk``) may see at any moment."""
        fds = self._fds
        if not fds:
            raise OSError(errno.EBADF, "the disk meter is closed")
        return fds[0]

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def measure(self, limit: int | None = None, pids: Iterable[int] = ()) -> Usage:
        """What the directories hold, plus the deleted files ``pids`` hold open or mapped.
        Stops early once over ``limit`` (then ``bytes > limit`` or ``over_reason`` is set)."""
        usage = Usage()
        try:
            for pid in pids:
                self._unlinked(pid, usage, limit)
            for fd in self._fds:
                self._walk(fd, usage, limit)
        except _Over:
            pass
        return usage

    def _check(self, usage: Usage, limit: int | None) -> None:
        if usage.over_reason is not None or (limit is not None and usage.bytes > limit):
            raise _Over

    def _unlinked(self, pid: int, usage: Usage, limit: int | None) -> None:
        for kind in ("fd", "map_files"):
            try:
                names = os.listdir(f"/proc/{pid}/{kind}")
            except OSError:
                continue
            for name in names:
                try:
                    st = os.stat(f"/proc/{pid}/{kind}/{name}")
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and st.st_dev in self.devices:
                    usage.add_unlinked(st)
            self._check(usage, limit)

    def _walk(self, top: int, usage: Usage, limit: int | None) -> None:
        usage.add(os.fstat(top))
        dev = os.fstat(top).st_dev
        # per open directory: its fd, the subdirectories still to walk, and the mode to put
        # back once it is done (when the walk lent itself rights to it)
        stack: list[tuple[int, list[str], int | None]] = []
        try:
            fd = os.dup(top)
            stack.append((fd, [], None))
            stack[-1] = (fd, self._list(fd, dev, usage, limit), None)
            while stack:
                fd, names, mode = stack[-1]
                if not names:
                    stack.pop()
                    _close(fd, mode)
                    continue
                try:
                    opened = self._open(fd, names.pop())
                except OSError as exc:
                    usage.over_reason = f"a directory the disk monitor cannot read ({exc})"
                    raise _Over from exc
                if opened is None:
                    continue
                child, child_mode = opened
                stack.append((child, [], child_mode))  # closed by ``finally`` if listing fails
                if len(stack) > MAX_DEPTH:
                    usage.over_reason = f"directories nested more than {MAX_DEPTH} deep"
                    raise _Over
                stack[-1] = (child, self._list(child, dev, usage, limit), child_mode)
        finally:
            for fd, _, mode in reversed(stack):
                _close(fd, mode)

    def _list(self, fd: int, dev: int, usage: Usage, limit: int | None) -> list[str]:
        """Charge every entry of the directory ``fd``; its subdirectories' names."""
        subdirs: list[str] = []
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:  # gone meanwhile
                    continue
                if st.st_dev != dev:  # a mount point: not this tree's
                    continue
                usage.add(st)
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(entry.name)
            self._check(usage, limit)
        return subdirs

    def _open(self, parent: int, name: str) -> tuple[int, int | None] | None:
        """The subdirectory ``name`` of ``parent`` for reading, and the mode to put back
        when done; ``None`` when it is gone or no longer a directory. A server that is not
        root reads through ``chmod 000`` by lending itself the owner's rights (it owns the
        sandbox's files) until the walk leaves the directory (the sandbox is frozen
        meanwhile, where the host can)."""
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent), None
        except PermissionError:
            if self._root:
                raise
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # changed meanwhile
                return None
            raise
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=parent)
        try:
            mode = stat.S_IMODE(os.fstat(path_fd).st_mode)
            proc = f"/proc/self/fd/{path_fd}"
            os.chmod(proc, mode | stat.S_IRWXU)
            try:
                return os.open(proc, _DIR_FLAGS & ~os.O_NOFOLLOW), mode  # the magic link
            except BaseException:
                os.chmod(proc, mode)
                raise
        finally:
            os.close(path_fd)


def _close(fd: int, mode: int | None) -> None:
    with contextlib.suppress(OSError):
        if mode is not None:
            os.fchmod(fd, mode)
        os.close(fd)


@dataclass(frozen=True)
class Signals:
    """Cheap signs of growth, read between measures: what the sandbox's processes wrote
    (``write_bytes`` of ``/proc/PID/io``: every page they dirtied, reaped children included
    in their parents') and the file system's free bytes and inodes (``fallocate``, empty
    files). None of them is attributable alone, and together they can be fooled (another
    attempt freeing space meanwhile); they only decide when to measure, never whether the
    budget holds."""

    written: int
    free: int
    free_inodes: int

    def written_since(self, earlier: Signals) -> int:
        """What the sandbox's own processes wrote since ``earlier`` (attributable)."""
        return self.written - earlier.written

    def growth_since(self, earlier: Signals) -> int:
        """The most the directories can have grown since ``earlier``, by any of the signs
        (the file system's may come from other programs)."""
        return max(
            self.written_since(earlier),
            earlier.free - self.free,
            (earlier.free_inodes - self.free_inodes) * MIN_CHARGE,
        )


def signals(fd: int, pids: Iterable[int]) -> Signals:
    """:class:`Signals` of the file system of ``fd`` and the processes ``pids``."""
    written = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io", "rb") as f:
                for line in f:
                    if line.startswith(b"write_bytes:"):
                        written += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue
    st = os.fstatvfs(fd)
    return Signals(written, st.f_bavail * st.f_frsize, st.f_favail)


def usage(paths: Iterable[Path]) -> int:
    """Bytes the directories hold now, as a :class:`Meter` counts them (an attempt's budget
    starts from what its checkout already takes)."""
    with Meter(paths) as meter:
        return meter.measure().bytes
