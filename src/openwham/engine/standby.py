"""Standby sandboxes: a workspace and a started Codex waiting for its prompt.

Most of an attempt's start-up is not the task's own work: cloning the workspace, starting
bubblewrap and the gateway forwarder, and Codex's own start-up before it reads its prompt
(config, state databases, ~100-250 ms). After an attempt ends, the engine prepares the next
one for the same repository, branch and agent settings in the background; the next attempt
that matches takes it (a ``rename`` of its directory and a token hand-over) and only writes
its prompt. A standby is used only while the branch head is unchanged, is dropped after
``max_age`` seconds, and at most ``size`` are kept (least recently used go first). A key may
have several (``refill(key, count)``): a best-of-N task's attempts each find one, prepared in
parallel after the last such task (one once its attempts have their prompts, the others once
the last of them ended), instead of all but one starting cold. The count a key is
refilled to is the largest asked for it within ``max_age`` (a single-attempt task between two
best-of-4 tasks leaves four, not three).

Standbys are prepared while attempts run (a refill begins once an attempt has its prompt), so
their sandboxes start at the background CPU weight (``SandboxSpec.background``): four Codex
start-ups of the next best-of-4 do not take the cores from the four attempts running. That
lasts while attempts of the key start (``attempt_running``): once the last one's first
model request went through (``attempt_started``) or it ended (``attempt_ended``), or when none
runs, a fill has the normal weight, so a task posted right
after the last one ended finds its fill at full speed. A standby being prepared is also
*hurried* to the normal weight when an attempt waits for it (``take``), and a taken one gets
it with its prompt (``Sandbox.send``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openwham.sandbox.provider import Sandbox
from openwham.sandbox.snapshots import RepoAt, Snapshot

log = logging.getLogger(__name__)

#: a standby's directory name under the attempts root: ``.standby-<pid>-<random>``
STANDBY_PREFIX = ".standby-"


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
    #: the environment's MCP servers, canonical JSON ("" without): written into Codex's config
    mcp_servers: str = ""
    #: the agent's internet access, canonical JSON ("" when off): its egress policy and
    #: Codex's config are made with the sandbox, so a standby never runs under another
    network: str = ""
    #: for an environment with a setup script: the environment, its cache generation and
    #: the maintenance script, hashed (``claim.standby_setup``; "" without a setup script);
    #: such a standby is started from its post-setup snapshot (``engine.workspace``), so a
    #: changed setup script, variables, secrets, repositories, cache invalidation key or
    #: maintenance script makes another key
    setup: str = ""


@dataclass(frozen=True)
class FromSnapshot:
    """How a standby of an environment with a setup script was made: the snapshot it stacks,
    what checking the branch head out on top said, and the maintenance script's run when
    the standby was prepared (its log lines and proxy events, replayed on the attempt that
    takes it; ``ran_at`` 0: there is no maintenance script)."""

    snapshot: Snapshot
    base: str
    lines: tuple[str, ...] = ()
    log: tuple[tuple[str, str], ...] = ()
    events: tuple[dict[str, Any], ...] = ()
    ran_at: float = 0.0
    #: a multi-repository standby's: where each repository was checked out (in order)
    repos: tuple[RepoAt, ...] = ()


@dataclass
class Prepared:
    """A workspace at ``base`` and a held sandbox running Codex, waiting for its prompt.
    ``owner`` is the id its gateway token counts for."""

    dir: Path
    base: str
    proc: Sandbox
    owner: str
    created: float = field(default_factory=time.monotonic)
    #: where the agent's proxy events go (engine/network.py), when it may go out
    network: Any = None
    #: a multi-repository workspace's repositories: key -> {dir, branch, sha} (in order)
    repos: dict[str, dict[str, str]] = field(default_factory=dict)
    #: a standby of an environment with a setup script: the snapshot it was started from
    resumed: FromSnapshot | None = None


class StandbyPool:
    """Prepared sandboxes by key. ``make`` builds one (in a background thread), ``drop``
    disposes of one (kills the sandbox, forgets the token, removes the directory).

    A standby is ready while it is in the ready list, and only then: what :meth:`take` has
    at once, what :meth:`ready` and ``len`` count and what ``shown`` is told. ``settle``
    (a clone's index refresh) takes it out of the list while it runs, as a fill under way,
    without holding the pool's lock."""

    def __init__(
        self,
        *,
        size: int,
        max_age: float,
        make: Callable[[AgentKey], Prepared],
        drop: Callable[[Prepared], None],
        settle: Callable[[Prepared], None] | None = None,
        settle_after: float = 1.1,
        shown: Callable[[Prepared, bool], None] | None = None,
    ) -> None:
        self.size = size
        #: told (lock held) when a standby enters the ready list (``True``) and when it
        #: leaves it (``False``: taken, settling, dropped): what the server shows as ready
        self._shown = shown
        self._settle = settle
        self._settle_after = settle_after
        self.max_age = max_age
        self._make = make
        self._drop = drop
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a fill ended (ready or failed)
        self._ready: OrderedDict[AgentKey, list[Prepared]] = OrderedDict()
        self._filling: dict[AgentKey, list[threading.Thread]] = {}
        #: the largest count asked for each key within ``max_age``, and when it was asked
        self._wanted: dict[AgentKey, tuple[int, float]] = {}
        #: sandboxes of fills under way (``started``), by key and fill thread
        self._starting: dict[AgentKey, dict[threading.Thread, Sandbox]] = {}
        #: takes waiting for a key's fills: its sandboxes started meanwhile are hurried
        self._waiting: dict[AgentKey, int] = {}
        #: attempts running, by turn id: their key's fills stay in the background meanwhile
        self._running: dict[str, AgentKey] = {}
        #: attempts running until their end (``_running`` loses them at their first model
        #: request): a best-of-N's refill waits until none of its key is left
        self._live: dict[str, AgentKey] = {}
        #: when a take of each key last had to wait for a fill under way (:meth:`depth`)
        self._rushed: dict[AgentKey, float] = {}
        self._closed = threading.Event()
        self._pruner: threading.Thread | None = None

    def take(self, key: AgentKey, *, wait: bool = True) -> Prepared | None:
        """The standby for ``key`` if it is alive and fresh, else ``None`` (a stale one is
        dropped in the background); whether its checkout is still the branch head is the
        caller's to check. A standby being prepared for the key is waited for: it started
        earlier than a cold start would. One that died or expired is passed over for the
        next (and dropped in the background). Without ``wait``: only a ready one, at once."""
        stale: list[Prepared] = []
        with self._changed:
            prepared = self._pop_usable(key, stale)
            # wait while fills for the key that were under way when this take began are:
            # each ends in one standby, and the attempts of a best-of-N waiting together take
            # one each (none waits on a fill another has taken; when none is left, the rest
            # start cold). A fill begun later (the refill of an attempt that just started)
            # would end no sooner than a cold start begun now: not waited for, else waiters
            # would queue behind one fill after another.
            before = set(self._filling.get(key, ())) if wait else set()
            if prepared is None and before:
                # the attempt waits for those fills: their sandboxes get the normal weight
                self._rushed[key] = time.monotonic()  # tasks come faster than a fill: depth
                self._waiting[key] = self._waiting.get(key, 0) + 1
                for proc in self._starting.get(key, {}).values():
                    proc.hurry()
                try:
                    while (
                        prepared is None
                        and before.intersection(self._filling.get(key, ()))
                        and not self._closed.is_set()
                    ):
                        self._changed.wait(1.0)
                        prepared = self._pop_usable(key, stale)
                finally:
                    self._waiting[key] -= 1
                    if not self._waiting[key]:
                        del self._waiting[key]
        for old in stale:
            self._drop_later(old)
        return prepared

    def depth(self, key: AgentKey) -> int:
        """How many standbys a single attempt of ``key`` keeps ready or on their way for the
        next task: 2 once a take of the key had to wait for a fill under way (within
        ``max_age``), else 1. Tasks posted back to back come faster than a fill then (the
        fill, begun at the last attempt's prompt, shares the cores with that attempt), and
        each waited for the fill in its start; with two, the one a take gets began an
        attempt earlier. (At most ``size``, as every refill.)"""
        with self._lock:
            at = self._rushed.get(key)
            if at is not None and time.monotonic() - at >= self.max_age:
                del self._rushed[key]
                at = None
        return 1 if at is None else 2

    def refill(self, key: AgentKey, count: int = 1, *, top_up: bool = True) -> None:
        """Prepare standbys for ``key`` in the background, in parallel, until ``count`` (at
        most ``size``) are ready or being prepared; with ``top_up``, as many as the largest
        count asked for the key within ``max_age``, if that is more: a best-of-N task's
        attempts find N standbys also after a smaller task like it took one."""
        if self.size <= 0 or self._closed.is_set():
            return
        with self._lock:
            wanted = self._wanted_count(key, count)
            count = wanted if top_up else count
            have = len(self._ready.get(key, ())) + len(self._filling.get(key, ()))
            threads = [
                threading.Thread(target=self._fill, args=(key,), name="standby-fill", daemon=True)
                for _ in range(max(0, min(count, self.size) - have))
            ]
            if not threads:
                return
            self._filling.setdefault(key, []).extend(threads)
            if self._pruner is None:
                self._pruner = threading.Thread(
                    target=self._prune_loop, name="standby-prune", daemon=True
                )
                self._pruner.start()
        for thread in threads:
            thread.start()

    def started(self, key: AgentKey, proc: Sandbox) -> None:
        """A fill's sandbox for ``key`` started (``make`` calls this from its thread before
        waiting for its start-up): hurried at once while an attempt waits for the key's
        fills or no attempt of the key runs, else when one of those becomes true."""
        with self._lock:
            self._starting.setdefault(key, {})[threading.current_thread()] = proc
            hurry = key in self._waiting or key not in self._running.values()
        if hurry:
            proc.hurry()

    def attempt_running(self, key: AgentKey, turn_id: str) -> None:
        """Attempt ``turn_id`` of ``key`` runs (it has its prompt): the key's fills keep the
        background weight until it ends."""
        with self._lock:
            self._running[turn_id] = key
            self._live[turn_id] = key

    def attempt_started(self, turn_id: str) -> None:
        """Attempt ``turn_id``'s first model request went through: its start-up (the task's
        start latency) is behind it, so it no longer keeps its key's fills in the background;
        see :meth:`attempt_ended`. A task posted right after this one ends then finds the
        next standby further along (back to back, the take waits for that fill)."""
        self._foreground(turn_id)

    def attempts_running(self, key: AgentKey) -> bool:
        """Whether an attempt of ``key`` runs (marked by :meth:`attempt_running`, not ended;
        started or not)."""
        with self._lock:
            return key in self._live.values()

    def attempt_ended(self, turn_id: str) -> None:
        """Attempt ``turn_id`` ended (also one never marked running): when it was the last of
        its key, the key's fills under way get the normal weight."""
        with self._lock:
            self._live.pop(turn_id, None)
        self._foreground(turn_id)

    def _foreground(self, turn_id: str) -> None:
        """Attempt ``turn_id`` no longer keeps its key's fills in the background: when it was
        the last that did, they get the normal weight."""
        with self._lock:
            key = self._running.pop(turn_id, None)
            if key is None or key in self._running.values():
                return
            procs = list(self._starting.get(key, {}).values())
            # and those whose fill ended meanwhile (a fill quicker than the attempt's first
            # model request was left at the background weight until it was taken)
            procs += [p.proc for p in self._ready.get(key, ())]
        for proc in procs:
            proc.hurry()

    def close(self) -> None:
        """Drop every standby (server stopping); nothing is prepared afterwards."""
        self._closed.set()
        with self._lock:
            filling = [t for threads in self._filling.values() for t in threads]
        for thread in filling:
            thread.join(timeout=30)
        with self._lock:
            ready = [p for prepared in self._ready.values() for p in prepared]
            self._ready.clear()
            for prepared in ready:
                self._show(prepared, False)
        for prepared in ready:
            self._drop(prepared)

    def discard(self, match: Callable[[AgentKey], bool]) -> int:
        """Drop the ready standbys whose key ``match`` es, now; returns how many."""
        with self._lock:
            dropped = [p for key in list(self._ready) if match(key) for p in self._ready.pop(key)]
            for prepared in dropped:
                self._show(prepared, False)
        for prepared in dropped:
            self._drop(prepared)
        return len(dropped)

    def ready(self) -> dict[AgentKey, int]:
        """How many standbys are ready per key (what the queue executor offers others)."""
        with self._lock:
            return {
                key: n
                for key, prepared in self._ready.items()
                if (n := sum(1 for p in prepared if self._usable(p)))
            }

    @property
    def busy(self) -> bool:
        """Whether a standby is being prepared."""
        with self._lock:
            return bool(self._filling)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(prepared) for prepared in self._ready.values())

    # ------------------------------------------------------------------ internals

    def _pop(self, key: AgentKey) -> Prepared | None:
        """The key's oldest ready standby, taken out of the pool (lock held)."""
        ready = self._ready.get(key)
        if not ready:
            return None
        prepared = ready.pop(0)
        if not ready:
            del self._ready[key]
        self._show(prepared, False)
        return prepared

    def _pop_usable(self, key: AgentKey, stale: list[Prepared]) -> Prepared | None:
        """The key's oldest ready standby that is alive and fresh, taken out of the pool;
        those passed over go to ``stale`` (lock held)."""
        while (prepared := self._pop(key)) is not None and not self._usable(prepared):
            stale.append(prepared)
        return prepared

    def _show(self, prepared: Prepared, ready: bool) -> None:
        """Tell ``shown`` (lock held) that ``prepared`` entered or left the ready list."""
        if self._shown is not None:
            try:
                self._shown(prepared, ready)
            except Exception:  # what is shown must not break the pool
                log.exception("showing a standby as %s failed", "ready" if ready else "gone")

    def _wanted_count(self, key: AgentKey, count: int) -> int:
        """``count``, or the larger one asked for ``key`` within ``max_age`` (lock held)."""
        now = time.monotonic()
        for old in [k for k, (_, at) in self._wanted.items() if now - at >= self.max_age]:
            del self._wanted[old]
        wanted = self._wanted.get(key)
        if wanted is not None and wanted[0] > count:
            return wanted[0]
        self._wanted[key] = (count, now)
        return count

    def _usable(self, prepared: Prepared) -> bool:
        return prepared.proc.poll() is None and time.monotonic() - prepared.created < self.max_age

    def _fill(self, key: AgentKey) -> None:
        try:
            prepared = self._make(key)
        except Exception as exc:  # the next attempt starts cold and reports the real error
            log.info("no standby sandbox for %s: %s", key.repo_key, exc)
            self._forget_filling(key)
            return
        if not self._made(key, prepared):
            return
        settle = self._settle
        if settle is not None and not self._closed.wait(self._settle_after):
            self._settle_ready(key, prepared, settle)

    def _made(self, key: AgentKey, prepared: Prepared) -> bool:
        """This fill thread's standby is ready: into the key's ready list (by age; the least
        recently refilled key's oldest evicted beyond ``size``), and the takers waiting for
        the fill look again; ``False`` (dropped) when the pool closed meanwhile."""
        evicted: list[Prepared] = []
        with self._lock:
            self._forget_thread(key)
            closed = self._closed.is_set()
            if not closed:
                ready = self._ready.setdefault(key, [])
                at = next((i for i, p in enumerate(ready) if p.created > prepared.created), None)
                ready.insert(len(ready) if at is None else at, prepared)
                self._show(prepared, True)
                self._ready.move_to_end(key)
                while sum(len(p) for p in self._ready.values()) > self.size:
                    oldest = self._pop(next(iter(self._ready)))  # least recently refilled key
                    assert oldest is not None
                    evicted.append(oldest)
        for old in evicted:
            self._drop(old)
        if closed:
            self._drop(prepared)
        return not closed

    def _settle_ready(
        self, key: AgentKey, prepared: Prepared, settle: Callable[[Prepared], None]
    ) -> None:
        """``settle`` a ready standby (it changes the standby's files, so no take may have it
        meanwhile): out of the ready list while it runs, and counted as a fill under way, so
        a take that finds none ready waits for it as for a fill, and neither other takes nor
        :meth:`ready` wait for the settle (the pool's lock is not held during it: a take of
        a ready standby never waits for another one's settle)."""
        with self._lock:
            ready = self._ready.get(key, [])
            at = next((i for i, p in enumerate(ready) if p is prepared), None)
            if at is None:  # taken, evicted or pruned meanwhile
                return
            del ready[at]
            if not ready:
                del self._ready[key]
            self._show(prepared, False)
            self._filling.setdefault(key, []).append(threading.current_thread())
        try:
            settle(prepared)
        finally:
            self._made(key, prepared)

    def _forget_thread(self, key: AgentKey) -> None:
        """This fill thread is done (lock held); takers waiting for it look again."""
        self._changed.notify_all()
        starting = self._starting.get(key, {})
        starting.pop(threading.current_thread(), None)
        if not starting:
            self._starting.pop(key, None)
        threads = self._filling.get(key, [])
        if threading.current_thread() in threads:
            threads.remove(threading.current_thread())
        if not threads:
            self._filling.pop(key, None)

    def _forget_filling(self, key: AgentKey) -> None:
        with self._lock:
            self._forget_thread(key)

    def _drop_later(self, prepared: Prepared) -> None:
        threading.Thread(target=self._drop, args=(prepared,), daemon=True).start()

    def _prune_loop(self) -> None:
        while not self._closed.wait(min(30.0, max(1.0, self.max_age / 4))):
            with self._lock:
                dropped: list[Prepared] = []
                for key in list(self._ready):
                    keep: list[Prepared] = []
                    for p in self._ready[key]:
                        (keep if self._usable(p) else dropped).append(p)
                    if keep:
                        self._ready[key] = keep
                    else:
                        del self._ready[key]
                for prepared in dropped:
                    self._show(prepared, False)
            for prepared in dropped:
                self._drop(prepared)
