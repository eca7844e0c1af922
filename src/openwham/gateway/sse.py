"""Incremental parsing of what passes through the gateway, for metering only.

The gateway forwards every chunk as it arrives; :class:`StreamMeter` looks at the same bytes
on the side. For a Responses SSE stream it splits events (``data:`` lines up to a blank line,
any of the three SSE line endings, across chunk boundaries) and hands the terminal events
(``response.completed``, ``response.incomplete``, ``response.failed``), and any ``extra``
event types asked for, to a callback. For a
non-streaming JSON answer (``stream: false``) it keeps the body (bounded) and reports it whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

# Events whose ``response`` object carries usage or an error; only these (and the ``extra``
# events a parser is asked for) are decoded.
TERMINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")
_LINE_END = re.compile(rb"\r\n|\r|\n")

EventHandler = Callable[[dict[str, Any]], None]


class SSEParser:
    """Splits an SSE byte stream into events and passes the interesting ones on."""

    def __init__(
        self,
        on_event: EventHandler,
        *,
        extra: tuple[str, ...] = (),
        max_event_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self._on_event = on_event
        self._types = frozenset(TERMINAL_EVENTS + extra)
        self._markers = tuple(f'"{name}"'.encode() for name in self._types)
        self._max = max_event_bytes
        self._buffer = bytearray()
        self._scanned = 0
        self._data: list[bytes] = []
        self._size = 0
        self._oversized = False
        self.terminal_seen: str | None = None

    @property
    def at_boundary(self) -> bool:
        """True between events: a frame injected now cannot corrupt a partial event."""
        return not self._buffer and not self._data and not self._oversized

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        start = 0
        while True:
            match = _LINE_END.search(self._buffer, max(start, self._scanned))
            if match is None:
                break
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break  # may be the first half of a CRLF split across chunks
            self._line(bytes(self._buffer[start : match.start()]))
            start = match.end()
            self._scanned = start
        del self._buffer[:start]
        self._scanned = max(0, len(self._buffer) - 1)
        if len(self._buffer) > self._max:
            self._buffer.clear()
            self._scanned = 0
            self._oversized = True

    def close(self) -> None:
        """End of stream: a final event without its blank line still counts."""
        if self._buffer:
            self._line(bytes(self._buffer.rstrip(b"\r")))
            self._buffer.clear()
        self._dispatch()

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(b":"):
            return
        field, _, value = line.partition(b":")
        if field != b"data":
            return
        if value.startswith(b" "):
            value = value[1:]
        self._size += len(value) + 1
        if self._size > self._max:
            self._oversized = True
            self._data.clear()
            return
        if not self._oversized:
            self._data.append(value)

    def _dispatch(self) -> None:
        data = b"\n".join(self._data)
        self._data = []
        self._size = 0
        self._oversized = False
        if not data or not any(marker in data for marker in self._markers):
            return
        try:
            event = json.loads(data)
        except ValueError:
            return
        if isinstance(event, dict) and event.get("type") in self._types:
            if event["type"] in TERMINAL_EVENTS:
                self.terminal_seen = str(event["type"])
            self._on_event(event)


class JSONBody:
    """Collects a non-streaming JSON answer (bounded) and reports it at the end."""

    def __init__(self, on_body: EventHandler, *, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._on_body = on_body
        self._max = max_bytes
        self._parts: list[bytes] = []
        self._size = 0

    at_boundary = False

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self._max:
            self._parts.append(chunk)

    def close(self) -> None:
        if self._size > self._max:
            return
        try:
            body = json.loads(b"".join(self._parts))
        except ValueError:
            return
        if isinstance(body, dict):
            self._on_body(body)


def usage_numbers(usage: Any) -> dict[str, int] | None:
    """The Responses ``usage`` object as flat integers (``None`` when absent or malformed)."""
    if not isinstance(usage, dict):
        return None

    def number(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    details_in = usage.get("input_tokens_details")
    details_out = usage.get("output_tokens_details")
    input_tokens = number(usage.get("input_tokens"))
    output_tokens = number(usage.get("output_tokens"))
    total = number(usage.get("total_tokens")) or input_tokens + output_tokens
    return {
        "input_tokens": input_tokens,
        "cached_input_tokens": number(
            details_in.get("cached_tokens") if isinstance(details_in, dict) else 0
        ),
        "output_tokens": output_tokens,
        "reasoning_output_tokens": number(
            details_out.get("reasoning_tokens") if isinstance(details_out, dict) else 0
        ),
        "total_tokens": total,
    }
