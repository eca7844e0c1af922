"""Standby sandboxes: a workspace and a started Codex waiting for its prompt.

Most of an attempt's start-up is not the task's own work: cloning the workspace, starting
bubblewrap and the gateway forwarder, and Codex's own start-up before it reads its prompt
(config, state databases, ~100-250 ms). After an attempt ends, the engine prepares the next
one for the same repository, branch and agent settings in the background; the next attempt
that matches takes it (a ``rename`` of its directory and a token hand-over) and only writes
its prompt. A standby is used only while the branch head is unchanged, is dropped after
``max_age`` seconds, and at most ``size`` are kept (least recently used go first).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from openwham.sandbox.bwrap import SandboxProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentKey:
    """Everything a prepared sandbox is bound to before it knows its task."""

    repo_key: str
    repo_url: str
    branch: str
    qa_mode: bool
    model: str
    reasoning_effort: str | None
    custom_instructions: str | None


@dataclass
class Prepared:
    """A workspace at ``base`` and a held sandbox running Codex, waiting for its prompt.
    ``owner`` is the id its gateway token counts for."""

    dir: Path
    base: str
    proc: SandboxProcess
    owner: str
    created: float = field(default_factory=time.monotonic)


class StandbyPool:
    """Prepared sandboxes by key. ``make`` builds one (in a background thread), ``drop``
    disposes of one (kills the sandbox, forgets the token, removes the directory)."""

    def __init__(
        self,
        *,
        size: int,
        max_age: float,
        make: Callable[[AgentKey], Prepared],
        drop: Callable[[Prepared], None],
        settle: Callable[[Prepared], None] | None = None,
        settle_after: float = 1.1,
    ) -> None:
        self.size = size
        self._settle = settle
        self._settle_after = settle_after
        self.max_age = max_age
        self._make = make
        self._drop = drop
        self._lock = threading.Lock()
        self._ready: OrderedDict[AgentKey, Prepared] = OrderedDict()
        self._filling: dict[AgentKey, threading.Thread] = {}
        self._closed = threading.Event()
        self._pruner: threading.Thread | None = None

    def take(self, key: AgentKey) -> Prepared | None:
        """The standby for ``key`` if it is alive and fresh, else ``None`` (a stale one is
        dropped in the background); whether its checkout is still the branch head is the
        caller's to check. A standby being prepared for the key is waited for: it started
        earlier than a cold start would."""
        with self._lock:
            filling = self._filling.get(key)
        if filling is not None:
            filling.join()
        with self._lock:
            prepared = self._ready.pop(key, None)
        if prepared is None:
            return None
        if self._usable(prepared):
            return prepared
        self._drop_later(prepared)
        return None

    def refill(self, key: AgentKey) -> None:
        """Prepare a standby for ``key`` in the background unless there is one already."""
        if self.size <= 0 or self._closed.is_set():
            return
        with self._lock:
            if key in self._filling or key in self._ready:
                return
            thread = threading.Thread(
                target=self._fill, args=(key,), name="standby-fill", daemon=True
            )
            self._filling[key] = thread
            if self._pruner is None:
                self._pruner = threading.Thread(
                    target=self._prune_loop, name="standby-prune", daemon=True
                )
                self._pruner.start()
        thread.start()

    def close(self) -> None:
        """Drop every standby (server stopping); nothing is prepared afterwards."""
        self._closed.set()
        with self._lock:
            filling = list(self._filling.values())
        for thread in filling:
            thread.join(timeout=30)
        with self._lock:
            ready = list(self._ready.values())
            self._ready.clear()
        for prepared in ready:
            self._drop(prepared)

    @property
    def busy(self) -> bool:
        """Whether a standby is being prepared."""
        with self._lock:
            return bool(self._filling)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ready)

    # ------------------------------------------------------------------ internals

    def _usable(self, prepared: Prepared) -> bool:
        return prepared.proc.poll() is None and time.monotonic() - prepared.created < self.max_age

    def _fill(self, key: AgentKey) -> None:
        try:
            prepared = self._make(key)
        except Exception as exc:  # the next attempt starts cold and reports the real error
            log.info("no standby sandbox for %s: %s", key.repo_key, exc)
            self._forget_filling(key)
            return
        evicted: list[Prepared] = []
        with self._lock:
            self._filling.pop(key, None)
            closed = self._closed.is_set()
            if not closed:
                self._ready[key] = prepared
                while len(self._ready) > self.size:
                    evicted.append(self._ready.popitem(last=False)[1])
        for old in evicted:
            self._drop(old)
        if closed:
            self._drop(prepared)
            return
        # settle() changes the standby's files: only while it is still in the pool
        if self._settle is not None and not self._closed.wait(self._settle_after):
            with self._lock:
                if self._ready.get(key) is prepared:
                    self._settle(prepared)

    def _forget_filling(self, key: AgentKey) -> None:
        with self._lock:
            self._filling.pop(key, None)

    def _drop_later(self, prepared: Prepared) -> None:
        threading.Thread(target=self._drop, args=(prepared,), daemon=True).start()

    def _prune_loop(self) -> None:
        while not self._closed.wait(min(30.0, max(1.0, self.max_age / 4))):
            with self._lock:
                stale = [k for k, p in self._ready.items() if not self._usable(p)]
                dropped = [self._ready.pop(k) for k in stale]
            for prepared in dropped:
                self._drop(prepared)
