"""Locks that hold across processes and nodes, not only across threads of one process.

Several ``wham serve`` processes (one data directory) or nodes (one PostgreSQL database) may
act on the same thing at once: two PR pushes for one task must not both name a new branch.
:func:`database_locks` gives the right kind for the database in use:

- PostgreSQL: a session advisory lock (``pg_advisory_lock`` on a 64-bit hash of the key) held
  on a connection of its own for the lock's lifetime; the server releases it when that
  connection ends, so a killed node never leaves a lock behind.
- SQLite (one node): an exclusive ``flock`` on a file in the data directory's ``locks/``;
  the kernel releases it when the process dies.

What is per node (a repository's mirror in the node's data directory) uses :func:`file_lock`
in any case. Waiting longer than the timeout raises :class:`LockTimeout` with a clear message.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

# how often a file lock with a timeout is tried again
_POLL = 0.05


class LockTimeout(RuntimeError):
    """Another process or node held the lock for longer than the caller waits."""


class Locks(Protocol):
    """Named exclusive locks shared by every process (and node) of one installation."""

    def hold(self, key: str, timeout: float) -> AbstractContextManager[None]:
        """Hold ``key`` for the ``with`` block; :class:`LockTimeout` after ``timeout`` s."""
        ...


def _busy(key: str, timeout: float) -> LockTimeout:
    return LockTimeout(
        f"{key} is busy: another request or node has held it for more than {timeout:g} s; "
        "try again later"
    )


@contextmanager
def file_lock(path: Path, timeout: float | None = None, *, key: str = "") -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing): held across threads,
    processes and, when the file is on a shared local disk, everything on the machine.
    ``timeout=None`` waits as long as it takes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if timeout is None:
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise _busy(key or str(path), timeout) from None
                    time.sleep(_POLL)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class FileLocks:
    """:class:`Locks` as files in ``root`` (one node: SQLite), one file per key's hash."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def hold(self, key: str, timeout: float) -> AbstractContextManager[None]:
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        return file_lock(self.root / f"{name}.lock", timeout, key=key)


def advisory_key(key: str) -> int:
    """The signed 64-bit number PostgreSQL's advisory locks take, from the key's SHA-256."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


class AdvisoryLocks:
    """:class:`Locks` as PostgreSQL session advisory locks, each on a connection of its own
    (not the request pool's: a lock held across a slow ``git push`` must not starve it)."""

    def __init__(self, url: str) -> None:
        self._engine: Engine = create_engine(url, poolclass=NullPool)

    @contextmanager
    def hold(self, key: str, timeout: float) -> Iterator[None]:
        number = advisory_key(key)
        with self._engine.connect() as conn:
            # lock_timeout bounds the wait in the server; the lock itself is the session's
            conn.execute(text(f"SET lock_timeout = {max(1, int(timeout * 1000))}"))
            try:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": number})
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
                    raise _busy(key, timeout) from exc
                raise
            conn.commit()
            try:
                yield
            finally:
                # a broken connection released the lock with its session already
                with contextlib.suppress(DBAPIError):
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": number})
                    conn.commit()

    def dispose(self) -> None:
        self._engine.dispose()


def database_locks(url: str, data_dir: Path) -> Locks:
    """Advisory locks when ``url`` is PostgreSQL, else file locks in ``data_dir/locks``."""
    if url.startswith("postgresql"):
        return AdvisoryLocks(url)
    return FileLocks(data_dir / "locks")
