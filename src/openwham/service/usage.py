"""Rate limits: sliding primary and secondary windows counted from attempts actually started."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.store import models as m
from openwham.wire import (
    RateLimitDetails,
    RateLimitReachedType,
    RateLimitResetCredits,
    RateLimitStatusPayload,
    RateLimitWindow,
    TaskRateLimit,
    TaskRateLimitWindow,
)

from .accounts import Principal
from .errors import RateLimited


@dataclass(frozen=True)
class WindowState:
    limit: int
    window_seconds: int
    used: int
    reset_after: int
    now: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def used_percent(self) -> int:
        return min(100, math.ceil(self.used * 100 / self.limit)) if self.limit else 0

    def wire(self) -> RateLimitWindow:
        return RateLimitWindow(
            used_percent=self.used_percent,
            limit_window_seconds=self.window_seconds,
            reset_after_seconds=self.reset_after,
            reset_at=int(self.now + self.reset_after),
        )

    def task_window(self) -> TaskRateLimitWindow:
        return TaskRateLimitWindow(
            limit=self.limit,
            remaining=self.remaining,
            resets_after=self.reset_after,
            limit_window_mins=math.ceil(self.window_seconds / 60),
        )


def _window(db: Session, account_id: str, limit: int, seconds: int, now: float) -> WindowState:
    since = now - seconds
    used, oldest = db.execute(
        select(func.count(), func.min(m.UsageEvent.created_at)).where(
            m.UsageEvent.account_id == account_id, m.UsageEvent.created_at > since
        )
    ).one()
    # The window frees its oldest slot first; with nothing used it is a full window away.
    reset_after = math.ceil(oldest + seconds - now) if oldest is not None else seconds
    return WindowState(limit, seconds, int(used), max(0, reset_after), now)


def _primary_secondary(
    db: Session, settings: Settings, account_id: str
) -> tuple[WindowState | None, WindowState | None]:
    """The two windows; ``None`` for a window disabled by a limit of 0."""
    now = time.time()
    out: list[WindowState | None] = []
    for limit, seconds in (
        (settings.rate_limit_primary, settings.rate_limit_primary_window_seconds),
        (settings.rate_limit_secondary, settings.rate_limit_secondary_window_seconds),
    ):
        out.append(_window(db, account_id, limit, seconds, now) if limit > 0 else None)
    return out[0], out[1]


def windows(db: Session, settings: Settings, account_id: str) -> list[WindowState]:
    """The enabled windows, primary first."""
    return [w for w in _primary_secondary(db, settings, account_id) if w is not None]


def _text(seconds: int) -> str:
    if seconds < 90:
        return f"in {seconds} seconds"
    if seconds < 90 * 60:
        return f"in {round(seconds / 60)} minutes"
    if seconds < 36 * 3600:
        return f"in {round(seconds / 3600)} hours"
    return f"in {round(seconds / 86400)} days"


def task_rate_limit(
    db: Session, settings: Settings, principal: Principal, *, need: int = 1
) -> TaskRateLimit:
    """``tasks/rate_limit``: the tightest window decides ``allowed`` and ``remaining``."""
    ws = windows(db, settings, principal.account_id)
    if not ws:
        return TaskRateLimit(
            allowed=True,
            limit_reached=False,
            limit=0,
            remaining=0,
            resets_after=0,
            resets_after_text=None,
            user_plan_type=principal.account.plan_type,
            windows=[],
        )
    tight = min(ws, key=lambda w: (w.remaining, -w.reset_after))
    return TaskRateLimit(
        allowed=all(w.remaining >= need for w in ws),
        limit_reached=any(w.remaining == 0 for w in ws),
        limit=tight.limit,
        remaining=tight.remaining,
        resets_after=tight.reset_after,
        resets_after_text=_text(tight.reset_after),
        user_plan_type=principal.account.plan_type,
        windows=[w.task_window() for w in ws],
    )


def status_payload(db: Session, settings: Settings, principal: Principal) -> RateLimitStatusPayload:
    """``GET usage`` in the RateLimitStatusPayload shape the Codex CLI reads."""
    first, second = _primary_secondary(db, settings, principal.account_id)
    # A disabled window is null, so a disabled primary never shows the weekly window instead.
    reached = any(w is not None and w.remaining == 0 for w in (first, second))
    primary = first.wire() if first else None
    secondary = second.wire() if second else None
    return RateLimitStatusPayload(
        plan_type=principal.account.plan_type,
        rate_limit=RateLimitDetails(
            allowed=not reached,
            limit_reached=reached,
            primary_window=primary,
            secondary_window=secondary,
        ),
        credits=None,
        additional_rate_limits=None,
        rate_limit_reached_type=RateLimitReachedType(type="rate_limit_reached")
        if reached
        else None,
        spend_control=None,
        rate_limit_reset_credits=RateLimitResetCredits(available_count=0),
    )


def _lock_account(db: Session, account_id: str) -> None:
    """Serialise the creators of one account until this transaction ends.

    A no-op UPDATE of the account row: PostgreSQL holds a row lock until commit, and SQLite
    takes its write lock (pysqlite begins the transaction at the first write), so the count
    below and the usage recorded after it cannot interleave with another request's.
    """
    db.execute(
        update(m.Account)
        .where(m.Account.id == account_id)
        .values(plan_type=m.Account.plan_type)
        .execution_options(synchronize_session=False)
    )


def check(db: Session, settings: Settings, principal: Principal, need: int) -> TaskRateLimit:
    """Raise 429 (with the payload) when ``need`` more attempts would exceed a window.

    Call it in the transaction that then records the attempts (``record``): it locks the
    account so that concurrent requests cannot together go over the limit.
    """
    _lock_account(db, principal.account_id)
    rl = task_rate_limit(db, settings, principal, need=need)
    if not rl.allowed:
        payload = rl.model_dump(mode="json")
        raise RateLimited(
            f"Rate limit reached: {rl.remaining} attempt(s) left, {need} requested; "
            f"resets {rl.resets_after_text}",
            extra={"rate_limit": payload},
        )
    return rl


def record(db: Session, principal: Principal, task_id: str, turn_ids: list[str]) -> None:
    now = time.time()
    for turn_id in turn_ids:
        db.add(
            m.UsageEvent(
                account_id=principal.account_id,
                user_id=principal.user_id,
                task_id=task_id,
                turn_id=turn_id,
                created_at=now,
            )
        )
