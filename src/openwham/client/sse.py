"""The turn stream (``tasks/{id}/turns/{turn_id}/stream``) read as typed events, sans I/O.

:class:`StreamReader` parses SSE lines into :class:`StreamEvent` and remembers the last event
id, so a client that lost its connection reconnects with ``Last-Event-ID`` and the server
replays what was missed. Both clients feed it lines; it decides when the stream is over (after
the attempt's terminal status) and when to give up reconnecting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from openwham.client.attempts import TERMINAL

TASK_TURN_EVENT = "task_turn_event"
WORK_LOG_MESSAGE = "work_log_message"
LOG = "log"
TITLE = "task_title_generated"


@dataclass(frozen=True)
class StreamEvent:
    """One frame: ``item_type`` says what ``payload`` is (status, work-log entry, log line…)."""

    id: str | None
    item_type: str
    payload: dict[str, Any]
    timestamp: Any = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def turn_status(self) -> str | None:
        """The attempt's status, for ``task_turn_event`` frames."""
        if self.item_type != TASK_TURN_EVENT:
            return None
        status = self.payload.get("turn_status")
        return status if isinstance(status, str) else None

    @property
    def is_terminal(self) -> bool:
        return self.turn_status in TERMINAL


@dataclass
class StreamReader:
    """SSE line parser plus the reconnect bookkeeping of one turn's stream."""

    last_event_id: str | None = None
    max_reconnects: int = 5
    done: bool = False
    failures: int = 0
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        return headers

    def feed(self, line: str) -> StreamEvent | None:
        """One line of the body (without its newline); an event when a frame ends."""
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "data":
            self._data.append(value)
        elif key == "id":
            self._id = value or None
        return None

    def end_of_body(self) -> StreamEvent | None:
        """The body ended; a frame without its blank line still counts."""
        return self._dispatch()

    def _dispatch(self) -> StreamEvent | None:
        data, frame_id = self._data, self._id
        self._data, self._id = [], None
        if not data:
            return None
        try:
            body = json.loads("\n".join(data))
        except json.JSONDecodeError:
            return None
        if not isinstance(body, dict):
            return None
        item_type = str(body.get("item_type") or "")
        payload = body.get("payload", body.get(item_type))
        event = StreamEvent(
            id=frame_id or (str(body["id"]) if body.get("id") is not None else None),
            item_type=item_type,
            payload=payload if isinstance(payload, dict) else {},
            timestamp=body.get("timestamp"),
            raw=body,
        )
        if event.id:
            self.last_event_id = event.id
        self.failures = 0
        if event.is_terminal:
            self.done = True
        return event

    def should_reconnect(self) -> bool:
        """After a broken or ended connection: try again unless finished or out of tries."""
        if self.done:
            return False
        self.failures += 1
        return self.failures <= self.max_reconnects

    def backoff(self) -> float:
        return float(min(0.25 * (2 ** (self.failures - 1)), 4.0))
