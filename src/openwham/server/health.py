"""``/healthz``'s database probe: bounded in time, one at a time, its answer kept briefly.

The probe runs ``SELECT 1`` on a new connection (``Database.ping``) in a thread of its own
limiter, so neither the request pool nor AnyIO's default thread limiter (both busy under
overload) can hold it up. Concurrent probes share one answer and an answer is reused for
``ttl`` seconds, so a flood of ``/healthz`` opens at most one connection per ``ttl``. A
database that hangs leaves one abandoned thread at most (the next probes wait on the
limiter, time out and answer "unavailable" too).
"""

from __future__ import annotations

import logging

import anyio

from openwham.store.db import Database

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 2.0
PROBE_TTL_SECONDS = 1.0


class HealthProbe:
    def __init__(
        self,
        db: Database,
        timeout: float = PROBE_TIMEOUT_SECONDS,
        ttl: float = PROBE_TTL_SECONDS,
    ) -> None:
        self.db = db
        self.timeout = timeout
        self.ttl = ttl
        self._limiter: anyio.CapacityLimiter | None = None
        self._lock: anyio.Lock | None = None
        self._answer: tuple[float, bool] | None = None

    async def database_ok(self) -> bool:
        """Whether the database answered within ``timeout`` (now or less than ``ttl`` ago)."""
        if self._lock is None:
            self._lock = anyio.Lock()
            self._limiter = anyio.CapacityLimiter(1)
        async with self._lock:
            now = anyio.current_time()
            if self._answer is not None and now - self._answer[0] < self.ttl:
                return self._answer[1]
            ok = False
            with anyio.move_on_after(self.timeout):
                ok = await anyio.to_thread.run_sync(
                    self._ping, abandon_on_cancel=True, limiter=self._limiter
                )
            self._answer = (anyio.current_time(), ok)
            return ok

    def _ping(self) -> bool:
        try:
            self.db.ping(self.timeout)
        except Exception as exc:  # any failure is "unavailable"; the reason goes to the log only
            log.warning("health probe: the database did not answer: %s", exc)
            return False
        return True
