"""More than one API process on one port (``wham serve --processes N``).

One Python process serves requests on one core at most (the GIL), and the API's hot reads
cost ~1 ms of CPU each, so a machine's other cores are idle while requests queue. With
``--processes N`` the first process binds the port, opens (and migrates) the store and runs
the executor as always, then starts N - 1 API-only processes that accept on the same
listening socket (inherited, so the kernel hands each connection to whichever process
accepts first). They need what makes processes interchangeable: PostgreSQL (one database
for all, and ``LISTEN/NOTIFY`` carrying "turn X has new events" to every process's streams)
and the queue executor (an attempt posted to any process becomes a job the first process's
worker runs). On SQLite the bus is in-process, so the option is refused there.

The extra processes die with the first (``openwham.lifeline``'s parent-death signal), are
stopped with it, and one that exits on its own is started again (at most once every few
seconds each).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from openwham.config import Settings
from openwham.lifeline import die_with_parent

log = logging.getLogger(__name__)

RESTART_AFTER_SECONDS = 2.0


def problem(settings: Settings, processes: int) -> str | None:
    """Why ``processes`` API processes cannot serve with ``settings`` (``None``: they can)."""
    if processes == 1:
        return None
    url = settings.database_url or ""
    if not url.startswith("postgresql"):
        return (
            "--processes needs PostgreSQL (WHAM_DATABASE_URL): on SQLite the event bus is "
            "in-process, so streams served by the other processes would not see events"
        )
    if settings.executor != "queue":
        return (
            "--processes needs WHAM_EXECUTOR=queue: an attempt posted to any process must "
            "become a job the executor's process runs"
        )
    return None


@dataclass
class ApiProcesses:
    """The extra API-only processes of one ``wham serve``, sharing ``sock``."""

    sock: socket.socket
    count: int
    data_dir: Path
    log_level: str
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _stopped: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _argv(self) -> list[str]:
        return [
            *(sys.executable, "-c", "from openwham.cli.main import main; main()", "serve"),
            *("--listen-fd", str(self.sock.fileno()), "--data-dir", str(self.data_dir)),
            *("--log-level", self.log_level),
        ]

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "WHAM_EXECUTOR_CONCURRENCY": "0", "WHAM_EXECUTOR": "queue"}
        return subprocess.Popen(
            self._argv(),
            env=env,
            pass_fds=(self.sock.fileno(),),
            preexec_fn=die_with_parent(),  # killed if this thread ends: it outlives them
        )

    def start(self) -> ApiProcesses:
        self._thread = threading.Thread(target=self._own, name="wham-api-processes", daemon=True)
        self._thread.start()
        return self

    def _own(self, timeout: float = 10.0) -> None:
        """The one thread that starts, restarts, stops and waits for the children (the
        parent-death signal is tied to the thread that started a child)."""
        try:
            self._serve_children(timeout)
        finally:
            self._stopped.set()

    def _serve_children(self, timeout: float) -> None:
        self.children = [self._spawn() for _ in range(self.count)]
        last: dict[int, float] = {}
        while not self._stopping.wait(0.5):
            for i, child in enumerate(self.children):
                code = child.poll()
                if code is None:
                    continue
                if time.monotonic() - last.get(i, 0.0) < RESTART_AFTER_SECONDS:
                    continue
                log.warning("API process %d exited (%s); starting another", child.pid, code)
                last[i] = time.monotonic()
                self.children[i] = self._spawn()
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.terminate()
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the children (SIGTERM, then SIGKILL after 10 s) and wait for them."""
        self._stopping.set()
        self._stopped.wait(timeout)
