"""Turning wire models into what the templates show (plain dicts and strings).

The templates only lay things out; every decision about what a task, attempt or
environment shows is made here, where it can be read and tested.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from openwham.service.errors import BadRequest
from openwham.store.status import ACTIVE, TurnStatus
from openwham.wire import TaskListItem

STATUS_LABELS: dict[str, str] = {
    TurnStatus.PENDING: "Queued",
    TurnStatus.IN_PROGRESS: "Running",
    TurnStatus.COMPLETED: "Completed",
    TurnStatus.FAILED: "Failed",
    TurnStatus.CANCELLED: "Cancelled",
}


def ago(ts: float | None, now: float | None = None) -> str:
    """``5 min ago``: how long ago a timestamp was, coarsely."""
    if ts is None:
        return ""
    seconds = max(0, int((now if now is not None else time.time()) - ts))
    if seconds < 45:
        return "just now"
    if seconds < 90 * 60:
        return f"{max(1, round(seconds / 60))} min ago"
    if seconds < 36 * 3600:
        return f"{round(seconds / 3600)} h ago"
    if seconds < 60 * 86400:
        return f"{round(seconds / 86400)} d ago"
    return time.strftime("%Y-%m-%d", time.localtime(ts))


def iso(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else ""


def text_of(content: Any) -> str:
    """The text of a list of content fragments (strings or ``{content_type: text, text}``)."""
    out: list[str] = []
    for part in content or []:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            out.append(part["text"])
    return "".join(out)


def prompt_of(turn: dict[str, Any] | None) -> str:
    for item in (turn or {}).get("input_items") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            return text_of(item.get("content"))
    return ""


def has_starting_patch(turn: dict[str, Any] | None) -> bool:
    return any(
        isinstance(i, dict) and i.get("type") == "pre_apply_patch"
        for i in (turn or {}).get("input_items") or []
    )


def final_message(turn: dict[str, Any] | None) -> str:
    for item in (turn or {}).get("output_items") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            return text_of(item.get("content"))
    return ""


def diff_of(turn: dict[str, Any] | None) -> dict[str, Any] | None:
    """The attempt's ``output_diff`` (from its ``pr`` item, or a bare diff item)."""
    for item in (turn or {}).get("output_items") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "pr" and isinstance(item.get("output_diff"), dict):
            return dict(item["output_diff"])
        if item.get("type") == "output_diff":
            return dict(item)
    return None


@dataclass
class Row:
    """One line of the tasks page."""

    id: str
    title: str
    status: str
    status_label: str
    environment: str
    branch: str
    added: int | None
    removed: int | None
    files: int | None
    attempts: int
    unread: bool
    created: str
    created_iso: str
    archived: bool

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


def row(item: TaskListItem, now: float | None = None) -> Row:
    display = item.task_status_display
    latest = display.latest_turn_status_display if display else None
    stats = latest.diff_stats if latest else None
    status = latest.turn_status if latest else "pending"
    return Row(
        id=item.id,
        title=item.title,
        status=status,
        status_label=STATUS_LABELS.get(status, status),
        environment=(display.environment_label if display else None) or "",
        branch=(display.branch_name if display else None) or "",
        added=stats.lines_added if stats else None,
        removed=stats.lines_removed if stats else None,
        files=stats.files_modified if stats else None,
        attempts=len(latest.sibling_turn_ids) + 1 if latest else 1,
        unread=item.has_unread_turn,
        created=ago(item.created_at, now),
        created_iso=iso(item.created_at),
        archived=item.archived,
    )


@dataclass
class Attempt:
    turn: dict[str, Any]
    index: int

    @property
    def id(self) -> str:
        return str(self.turn["id"])

    @property
    def status(self) -> str:
        return str(self.turn.get("turn_status") or "pending")

    @property
    def status_label(self) -> str:
        return STATUS_LABELS.get(self.status, self.status)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def status_line(self) -> str:
        latest = self.turn.get("latest_event") or {}
        return str(latest.get("text") or self.status_label)

    @property
    def error(self) -> str:
        err = self.turn.get("error") or {}
        return str(err.get("message") or "") if isinstance(err, dict) else ""

    @property
    def final(self) -> str:
        return final_message(self.turn)

    @property
    def diff(self) -> dict[str, Any] | None:
        return diff_of(self.turn)


@dataclass
class Exchange:
    """A prompt and the attempt chosen to answer it, with that attempt's siblings."""

    prompt: str
    starting_patch: bool
    attempt: Attempt | None
    siblings: list[Attempt] = field(default_factory=list)
    user_turn_id: str | None = None


def chain(mapping: dict[str, Any], selected: str) -> list[Exchange]:
    """The conversation leading to attempt ``selected``, oldest first.

    A task's history is a tree (follow-ups of any attempt); the page shows one path
    through it: each prompt with the attempt that was followed up (or the selected one).
    """
    out: list[Exchange] = []
    attempt_id: str | None = selected
    seen: set[str] = set()
    while attempt_id and attempt_id in mapping and attempt_id not in seen:
        seen.add(attempt_id)
        entry = mapping[attempt_id]
        user_id = entry.get("parent")
        user_entry = mapping.get(user_id or "") or {}
        siblings = [
            mapping[c]["turn"]
            for c in user_entry.get("children") or []
            if c in mapping and (mapping[c]["turn"].get("role") == "assistant")
        ]
        siblings.sort(key=lambda t: int(t.get("attempt_placement") or 0))
        attempts = [Attempt(t, i) for i, t in enumerate(siblings)]
        chosen = next((a for a in attempts if a.id == attempt_id), None)
        user_turn = user_entry.get("turn")
        out.append(
            Exchange(
                prompt=prompt_of(user_turn),
                starting_patch=has_starting_patch(user_turn),
                attempt=chosen or Attempt(entry["turn"], 0),
                siblings=attempts,
                user_turn_id=user_id,
            )
        )
        attempt_id = user_entry.get("parent")
    out.reverse()
    return out


def parse_pairs(text: str, what: str) -> dict[str, str]:
    """``NAME=value`` lines (blank lines and ``#`` comments skipped) into a dict."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = raw.partition("=")
        if not sep:
            raise ValueError(f"{what}, line {number}: write NAME=value")
        out[name.strip()] = value
    return out


M = TypeVar("M", bound=BaseModel)


def utc_minute(ts: float | None) -> str:
    """A stored time as the settings pages list it (``never`` when unset)."""
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def form_model(model: type[M], values: dict[str, str]) -> M:
    """A settings form as the API's body: empty fields are left out (the defaults); a bad
    value is a 400 naming the field."""
    given = {k: v.strip() for k, v in values.items() if v.strip()}
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "form"
        raise BadRequest(f"{where}: {first['msg']}") from exc
