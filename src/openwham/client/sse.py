"""The turn stream (``tasks/{id}/turns/{turn_id}/stream``) read as typed events, sans I/O.

:class:`StreamReader` parses SSE lines into :class:`StreamEvent` and remembers the last event
id, so a client that lost its connection reconnects with ``Last-Event-ID`` and the server
replays what was missed. Both clients feed it lines; it decides when the stream is over (after
the attempt's terminal status) and when to give up reconnecting.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from openwham.client.attempts import TERMINAL

TASK_TURN_EVENT = "task_turn_event"
WORK_LOG_MESSAGE = "work_log_message"
LOG = "log"
PROXY_EVENT = "proxy_event"
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

    @property
    def text(self) -> str:
        """A one-glance line (or lines) for this event, never empty: see :func:`describe`."""
        return describe(self)


def describe(event: StreamEvent) -> str:
    """What a person wants to read for an event of any kind.

    Status changes read as their status line (and the error, when the attempt failed), the
    title as ``Title: …``, setup-log lines as ``setup: …``, and work-log messages as in the
    web UI: the prompt, a command as ``$ <shell line>``, its output (and a non-zero exit
    code), file edits as ``Edited calc.py``, and the agent's messages as their text. Frames of
    a kind this client does not know are shown as their type and payload.
    """
    payload = event.payload
    if event.item_type == TASK_TURN_EVENT:
        text = _string(payload.get("text")) or event.turn_status or "status"
        error = payload.get("error")
        message = _string(error.get("message")) if isinstance(error, dict) else ""
        return f"{text}: {message}" if message and message != text else text
    if event.item_type == TITLE:
        return f"Title: {_string(payload.get('title'))}"
    if event.item_type == LOG:
        if "line" in payload:
            return f"setup: {_string(payload.get('line'))}"
        return _string(payload.get("text")) or f"log: {json.dumps(payload)}"
    if event.item_type == WORK_LOG_MESSAGE:
        return worklog_text(payload)
    if event.item_type == PROXY_EVENT:
        return network_text(payload)
    return f"{event.item_type or 'event'}: {json.dumps(payload, ensure_ascii=False)}"


def network_text(event: dict[str, Any]) -> str:
    """A request through the environment's egress proxy (``proxy_event`` payload) as text."""
    verdict = "allowed" if event.get("decision") == "allow" else "refused"
    port = event.get("port")
    where = f"{_string(event.get('domain'))}{f':{port}' if port else ''}"
    text = f"network ({_string(event.get('phase')) or 'agent'}): {verdict} "
    text += f"{_string(event.get('method'))} {where}{_string(event.get('path'))}"
    if event.get("decision") != "allow" and event.get("reason"):
        text += f" ({_string(event.get('reason'))})"
    return text


def worklog_text(message: dict[str, Any]) -> str:
    """A work-log message (``work_log_message`` payload) as text; never empty."""
    author = message.get("author")
    role = _string(author.get("role")) if isinstance(author, dict) else ""
    content = message.get("content")
    content = content if isinstance(content, dict) else {}
    recipient = _string(message.get("recipient"))
    body = _content_text(content)
    if role == "user":
        return f"Prompt: {body.strip()}"
    if content.get("content_type") == "code":
        if recipient == "container.exec":
            return f"$ {command_line(body)}"
        if recipient == "apply_patch":
            return edit_summary(body) or "Editing files"
        return f"{recipient or 'tool'} {body}".rstrip()
    if role == "tool":
        metadata = message.get("metadata")
        code = metadata.get("exit_code") if isinstance(metadata, dict) else None
        output = body.rstrip("\n") or "(no output)"
        return f"{output}\n(exit {code})" if isinstance(code, int) and code != 0 else output
    metadata = message.get("metadata")
    thinking = isinstance(metadata, dict) and metadata.get("reasoning_status")
    text = body.strip() or "(empty message)"
    return f"Thinking: {text}" if thinking else text


def command_line(text: str) -> str:
    """A ``container.exec`` call (``{"cmd": "<script>"}`` or ``{"cmd": [argv…]}``) as the
    shell line it runs; text that is not such JSON is returned as it is."""
    try:
        call = json.loads(text)
    except ValueError:
        return text
    cmd = call.get("cmd") if isinstance(call, dict) else None
    if isinstance(cmd, str):
        return cmd
    if isinstance(cmd, list) and all(isinstance(a, str) for a in cmd):
        if len(cmd) == 3 and cmd[1] in ("-lc", "-c") and cmd[0].endswith("sh"):
            return str(cmd[2])
        return shlex.join(cmd)
    return text


_VERBS = {"A": "Added", "D": "Deleted", "M": "Edited"}


def edit_summary(text: str) -> str:
    """An ``apply_patch`` listing (``M calc.py`` lines) as ``Edited calc.py, Added x.py``."""
    items = []
    for line in text.splitlines():
        verb = _VERBS.get(line[:1]) if line[1:2] == " " else None
        if line.strip():
            items.append(f"{verb} {line[2:]}" if verb else line.strip())
    return ", ".join(items)


def _content_text(content: dict[str, Any]) -> str:
    text = content.get("text")
    if isinstance(text, str):
        return text
    parts = content.get("parts")
    if not isinstance(parts, list):
        return ""
    return "".join(
        p if isinstance(p, str) else _string(p.get("text")) if isinstance(p, dict) else ""
        for p in parts
    )


def _string(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


# Status lines that only name the step the work log shows anyway, or that the agent is busy.
_STEP_STATUSES = ("Running ", "Editing ", "Calling ", "Searching the web")
_BUSY_STATUSES = ("Working", "Thinking")


@dataclass
class Steps:
    """Picks out each step of a turn stream once, for a reader that prints as it goes.

    The stream sends a work-log message again whenever it changes (a command when it starts
    and when it ends, the answer when it is written and again when the turn marks it final).
    :meth:`new` is true once per message id — for a command as soon as it starts, for output
    and text once they are finished — and for a status line unless it only names the current
    step (the step itself is shown), says the agent is busy again, or repeats the last one.
    ``wham task watch`` prints by this rule; ``if steps.new(event): print(event.text)`` too.
    """

    status: str | None = None
    shown: set[str] = field(default_factory=set)

    def new(self, event: StreamEvent) -> bool:
        payload = event.payload
        if event.item_type == TASK_TURN_EVENT:
            text = _string(payload.get("text")) or event.turn_status or ""
            error = payload.get("error")
            failed = isinstance(error, dict) and bool(error.get("message"))
            if not failed and (
                text.startswith(_STEP_STATUSES)
                or (text in _BUSY_STATUSES and self.status in _BUSY_STATUSES)
                or text == self.status
            ):
                return False
            self.status = text
            return True
        if event.item_type != WORK_LOG_MESSAGE:
            return True
        message_id = _string(payload.get("id"))
        if message_id in self.shown:
            return False
        author = payload.get("author")
        role = _string(author.get("role")) if isinstance(author, dict) else ""
        content = payload.get("content")
        code = isinstance(content, dict) and content.get("content_type") == "code"
        if payload.get("status") == "in_progress" and not (role == "assistant" and code):
            return False  # text and output: once they are complete
        self.shown.add(message_id)
        return True


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
