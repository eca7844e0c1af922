"""Executors call ``Engine.run_turn``; the in-process one runs attempts on worker threads.

``Executor`` is the small interface a server talks to (submit, cancel, start, stop), so that a
queue-backed executor (e.g. procrastinate on PostgreSQL) can replace the embedded default.

Recovery: every attempt records the executor that claimed it and is kept alive by heartbeats
(``updated_at``). On start, and every ``SWEEP_SECONDS`` after, the executor looks for attempts
left ``in_progress`` by an executor that is gone (a dead process on this host, or no heartbeat
for ``STALE_SECONDS``) and runs them again from scratch while they have tries left
(``WHAM_ATTEMPT_MAX_TRIES``), else fails them with the reason. Pending attempts nobody queued
(e.g. created while no executor ran) are queued by the same sweep.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Collection, Iterable
from typing import Protocol

from sqlalchemy import select

from openwham.store import events, turnstate
from openwham.store import models as m
from openwham.store.status import TurnStatus

from . import storage
from .attempt import FAILED, Control, Engine
from .recorder import latest_event
from .turns import requeue

log = logging.getLogger(__name__)

STALE_SECONDS = 60.0
SWEEP_SECONDS = 15.0


class Executor(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, turn_ids: Iterable[str]) -> None:
        """Queue pending attempts (already committed): the attempts of one prompt (a
        best-of-N task's), started together."""
        ...

    def cancel(self, turn_id: str) -> bool:
        """Stop a queued or running attempt at once; ``True`` if this executor had it."""
        ...


def _owner_gone(owner: str | None) -> bool:
    """Whether the executor id ``host:pid:nonce`` names a process on this host that is dead."""
    if not owner:
        return True
    parts = owner.split(":")
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    if int(parts[1]) == os.getpid():  # an earlier server with our pid (e.g. pid 1 in a container)
        return True
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover(
    engine: Engine,
    *,
    now: float | None = None,
    turn_ids: Collection[str] | None = None,
    stale_after: float = STALE_SECONDS,
) -> list[str]:
    """Requeue or fail attempts whose executor is gone; returns the turns to run again.
    ``turn_ids``: only these (the queue's stalled jobs, whose worker stopped beating)."""
    now = now or time.time()
    again: list[str] = []
    touched: list[str] = []
    lost: list[str] = []
    max_tries = max(1, engine.settings.attempt_max_tries)
    with engine.db.session() as s:
        query = select(m.Turn).where(m.Turn.turn_status == TurnStatus.IN_PROGRESS)
        if turn_ids is not None:
            query = query.where(m.Turn.id.in_(list(turn_ids)))
        rows = s.scalars(query).all()
        for turn in rows:
            run = dict(turn.body.get("run") or {})
            owner = run.get("executor")
            if owner == engine.executor_id:
                continue
            if not (_owner_gone(owner) or now - turn.updated_at > stale_after):
                continue
            tries = int(run.get("tries") or 1)
            touched.append(turn.id)
            if tries < max_tries:
                note = (
                    "The server running this attempt stopped; starting it again from scratch "
                    f"(try {tries + 1} of {max_tries})"
                )
                if requeue(s, turn, note, seen=turn.updated_at):
                    again.append(turn.id)
                continue
            error = {
                "code": "executor_lost",
                "message": f"The server running this attempt stopped {tries} time(s); "
                "it was not started again",
            }
            body = {**turn.body, "latest_event": latest_event(FAILED)}
            seen = turn.updated_at  # judged by this: a heartbeat since means it lives
            if not turnstate.fail(s, turn.id, body=body, error=error, now=now, seen=seen):
                continue  # alive after all, cancelled, or taken by another node meanwhile
            lost.append(turn.id)
            events.append(
                s,
                turn.task_id,
                turn.id,
                events.TASK_TURN_EVENT,
                events.status_payload(FAILED, TurnStatus.FAILED, error=error),
            )
    for turn_id in touched:
        engine.bus.publish(turn_id)
    for turn_id in lost:  # nothing of a failed attempt is needed again
        storage.tidy(engine.attempts_root, engine.db, turn_id)
    if touched:
        log.warning("recovered %d attempt(s) left by a stopped server", len(touched))
    return again


class InProcessExecutor:
    """``concurrency`` slots taking prompts' attempts from a FIFO queue. The attempts of one
    prompt (those of one ``submit``: a best-of-N task's N) share one slot and start at once,
    each on a thread of its own; the slot is free again when the last of them ended. So a
    best-of-4 task runs its four agents side by side at any concurrency (with one slot per
    attempt it ran two at a time at the default, two cores: twice a single attempt's wall at
    least), and ``concurrency`` bounds how many tasks run at once, not their attempts."""

    def __init__(self, engine: Engine, concurrency: int) -> None:
        self.engine = engine
        self.concurrency = max(1, concurrency)
        self._cond = threading.Condition()
        self._queue: deque[list[str]] = deque()  # groups: the attempts of one prompt each
        self._queued: set[str] = set()
        self._running: dict[str, Control] = {}
        self._busy = 0  # slots running a group
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._stopped = threading.Event()  # wakes the sweeper only to stop it

    # ------------------------------------------------------------------ interface

    def start(self) -> None:
        self._sweep()
        for i in range(self.concurrency):
            t = threading.Thread(target=self._work, args=(i,), name=f"wham-slot-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._sweeper, name="wham-sweeper", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop running attempts (they go back to ``pending`` and resume on the next start)."""
        with self._cond:
            self._stopping = True
            running = list(self._running.values())
            self._cond.notify_all()
        self._stopped.set()
        for control in running:
            control.cancel("shutdown")
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def submit(self, turn_ids: Iterable[str]) -> None:
        """Queue the attempts of one prompt: they take one slot and start together."""
        self._enqueue([list(turn_ids)])

    def _enqueue(self, groups: list[list[str]]) -> None:
        """Queue each group (the attempts of one prompt) for a slot of its own, leaving out
        attempts queued or running already; those left behind busy slots show "Waiting"."""
        with self._cond:
            for ids in groups:
                group = [
                    turn_id
                    for turn_id in dict.fromkeys(ids)
                    if turn_id not in self._queued and turn_id not in self._running
                ]
                if group:
                    self._queue.append(group)
                    self._queued.update(group)
            free = self.concurrency - self._busy
            waiting = [t for g in list(self._queue)[max(0, free) :] for t in g]
            self._cond.notify_all()
        if waiting:
            self.engine.mark_waiting(waiting)

    def cancel(self, turn_id: str) -> bool:
        with self._cond:
            if turn_id in self._queued:
                self._queued.discard(turn_id)
                for group in self._queue:
                    if turn_id in group:
                        group.remove(turn_id)
                        if not group:
                            self._queue.remove(group)
                        break
                return True
            control = self._running.get(turn_id)
        if control is None:
            return False
        control.cancel("cancelled")
        return True

    @property
    def running(self) -> list[str]:
        with self._cond:
            return list(self._running)

    # ------------------------------------------------------------------ internals

    def _work(self, slot: int) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                group = self._queue.popleft()
                controls = [(turn_id, Control()) for turn_id in group]
                for turn_id, control in controls:
                    self._queued.discard(turn_id)
                    self._running[turn_id] = control
                self._busy += 1
            try:
                others = [
                    threading.Thread(
                        target=self._run,
                        args=(turn_id, control),
                        name=f"wham-attempt-{slot}-{k}",
                        daemon=True,
                    )
                    for k, (turn_id, control) in enumerate(controls[1:], 1)
                ]
                for t in others:
                    t.start()
                self._run(*controls[0])
                for t in others:
                    t.join()
            finally:
                with self._cond:
                    self._busy -= 1

    def _run(self, turn_id: str, control: Control) -> None:
        try:
            self.engine.run_turn(turn_id, control)
        except Exception:
            log.exception("attempt %s: executor error", turn_id)
        finally:
            with self._cond:
                self._running.pop(turn_id, None)

    def _sweeper(self) -> None:
        while not self._stopped.wait(SWEEP_SECONDS):
            try:
                self._sweep()
            except Exception:
                log.exception("sweeping for orphaned attempts failed")

    def _sweep(self) -> None:
        recover(self.engine)  # what it puts back is pending now, queued below
        with self.engine.db.sessions() as s:
            pending = s.execute(
                select(m.Turn.id, m.Turn.parent_id)
                .where(m.Turn.turn_status == TurnStatus.PENDING, m.Turn.role == "assistant")
                .order_by(m.Turn.created_at, m.Turn.attempt_placement)
            ).all()
        groups: dict[str, list[str]] = {}  # by prompt, in order: one slot each
        for turn_id, parent in pending:
            groups.setdefault(parent or turn_id, []).append(turn_id)
        self._enqueue(list(groups.values()))
