"""The statuses of an attempt (an assistant turn), as stored and as the API sends them.

The values are the wire strings (``wire.turns.TURN_STATUSES``). Only ``store.turnstate``
changes a turn's status; this module has no imports so that the ORM models can use the enum
for the column type (loaded rows carry ``TurnStatus`` members, and an unknown string is
refused when it is bound).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class TurnStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE: Final = frozenset({TurnStatus.PENDING, TurnStatus.IN_PROGRESS})
TERMINAL: Final = frozenset({TurnStatus.COMPLETED, TurnStatus.FAILED, TurnStatus.CANCELLED})
