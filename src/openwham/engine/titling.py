"""The task's title beside its first attempt: asked of the model through the gateway
(``titles.TitleJob``), settled before the attempt's terminal event, written once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.gateway import Gateway
from openwham.store import events
from openwham.store import models as m
from openwham.store.db import Database, rowcount
from openwham.store.events import EventBus

from .claim import Claim
from .control import Control
from .titles import TitleJob


@dataclass
class Titles:
    """Makes and writes task titles for the engine."""

    settings: Settings
    db: Database
    bus: EventBus

    def start(self, claim: Claim, gateway: Gateway | None, socket_path: Path | None) -> None:
        """Ask the model for the task's title (first attempt of a new task), through the
        gateway as ``<turn>:title``; without a usable gateway the derived title is written
        when the attempt ends (:meth:`ensure`)."""
        if not claim.needs_title:
            return
        claim.title = TitleJob(
            claim.prompt,
            lambda title: self._write(claim, title),
            timeout=float(self.settings.title_timeout_seconds),
        )
        if gateway and socket_path and claim.prompt.strip():
            claim.title.start(gateway, socket_path, f"{claim.turn_id}:title", claim.model)

    def ensure(self, claim: Claim, *, wait: bool = True, control: Control | None = None) -> None:
        """Before the attempt's terminal event (a stream ends there): the model's title, or
        the derived one if the model failed or has not answered in time (``wait`` false, or
        ``control`` cancelled: not waiting, so a cancel ends the attempt at once)."""
        if claim.title is not None:
            stop = (lambda: control.reason is not None) if control is not None else None
            claim.title.settle(wait=wait, stop=stop)

    def _write(self, claim: Claim, title: str) -> None:
        """The title and its event in the group commit with the attempts' writes; both or
        neither: a run that lost its attempt names nothing (its event refused, the title's
        update is undone with it, alone: its savepoint in a batch)."""

        def write(s: Session) -> bool:
            done = rowcount(
                s.execute(
                    update(m.Task)
                    .where(m.Task.id == claim.task_id, m.Task.has_generated_title.is_(False))
                    .values(title=title, has_generated_title=True)
                )
            )
            payload = {"title": title, "task_id": claim.task_id}
            if done and not events.append(
                s,
                claim.task_id,
                claim.turn_id,
                events.TASK_TITLE_GENERATED,
                payload,
                run=claim.run_id,
            ):
                raise _Refused
            return bool(done)

        try:
            done = self.db.writes.run(write)
        except _Refused:
            return
        if done:
            self.bus.publish(claim.turn_id)


class _Refused(Exception):
    """A title write undone: the run no longer holds its attempt."""
