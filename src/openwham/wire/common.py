"""Small shapes used across several endpoints."""

import datetime as dt
from enum import StrEnum

from pydantic import Field

from openwham.wire.base import OmittingWireModel, WireModel


class DiffStats(WireModel):
    """Size of a turn's diff; each count is ``null`` until a diff exists."""

    files_modified: int | None = None
    lines_added: int | None = None
    lines_removed: int | None = None


class SuccessResponse(WireModel):
    """Body of task and turn actions such as ``POST …/turns/{turn_id}/viewed``."""

    success: bool = True


class CancelResponse(SuccessResponse, OmittingWireModel):
    """Body of ``POST tasks/{id}/cancel`` and ``…/turns/{turn_id}/cancel``: chatgpt.com's
    ``{"success": true}``, plus the attempts this request cancelled (openwham; ``[]`` when none
    was still queued or running). ``None`` when the server does not say (chatgpt.com)."""

    cancelled_turn_ids: list[str] | None = None
    omit_when_unset = ("cancelled_turn_ids",)


class ErrorBody(WireModel):
    """FastAPI-style error body ``{"detail": "<message>"}``."""

    detail: str


class TurnError(WireModel):
    """``error`` of a failed assistant turn (also used in worklog message metadata).

    Lives here rather than in ``turns`` so that ``worklog`` can use it without an import cycle;
    ``openwham.wire.turns`` re-exports it.
    """

    code: str = Field(default="unknown_error", examples=["failed_to_apply_patch_error"])
    message: str = ""


def naive_iso(epoch: float) -> str:
    """A timestamp as setup-log keys and proxy events carry it: naive ISO 8601, in UTC."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).replace(tzinfo=None).isoformat()


class HealthStatus(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"  # the process answers, its database does not


class DatabaseHealth(StrEnum):
    OK = "ok"
    UNAVAILABLE = "unavailable"


class RequestLoad(WireModel):
    """The admission gate's state (``server.admission``): requests at work (``active``, at
    most ``capacity``), waiting (at most ``queue``), and refused with 503 since the start."""

    capacity: int
    queue: int
    active: int
    waiting: int
    refused: int


class Health(WireModel):
    """``GET /healthz`` (openwham): 200 with ``status: ok``, or 503 with ``status: degraded``
    when the database did not answer ``SELECT 1`` within ``database_timeout_seconds``.
    Never gated, so it answers under any load."""

    status: HealthStatus
    version: str
    database: DatabaseHealth
    requests: RequestLoad
