"""Another process that writes a turn's events as a worker's recorder does (append, commit,
``bus.publish``), on the PostgreSQL bus, one step per line read from stdin:

- ``publish TURN``: publish only (no row);
- ``append TASK TURN N``: N work-log events, each committed and published on its own;
- ``end TASK TURN``: the terminal status event;
- ``quit``: close the bus (flushing what is queued) and exit.

Each step answers one line on stdout (``ok`` and the new event ids), so a test can go in
lockstep with it. Run as ``python tests/support/remote_writer.py DATABASE_URL``.
"""

from __future__ import annotations

import sys

from sqlalchemy import select

from openwham.store import events
from openwham.store import models as m
from openwham.store.db import Database
from openwham.store.pgbus import PgEventBus


def _newest(db: Database, turn_id: str) -> int:
    with db.sessions() as s:
        newest = s.scalar(
            select(m.TurnEvent.id)
            .where(m.TurnEvent.turn_id == turn_id)
            .order_by(m.TurnEvent.id.desc())
            .limit(1)
        )
        return int(newest or 0)


def main(url: str) -> None:
    db = Database(url)
    bus = PgEventBus(url)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        ids: list[int] = []
        if words[0] == "publish":
            bus.publish(words[1])
        elif words[0] == "append":
            task_id, turn_id, n = words[1], words[2], int(words[3])
            for i in range(n):
                with db.session() as s:
                    payload = {"id": f"r{i}", "text": f"remote {i}"}
                    events.append(s, task_id, turn_id, events.WORK_LOG_MESSAGE, payload)
                ids.append(_newest(db, turn_id))
                bus.publish(turn_id)
        elif words[0] == "end":
            task_id, turn_id = words[1], words[2]
            with db.session() as s:
                payload = events.status_payload("Done", "completed")
                events.append(s, task_id, turn_id, events.TASK_TURN_EVENT, payload)
            ids.append(_newest(db, turn_id))
            bus.publish(turn_id)
        elif words[0] == "quit":
            break
        print("ok", *ids, flush=True)
    bus.close()
    db.dispose()
    print("bye", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
