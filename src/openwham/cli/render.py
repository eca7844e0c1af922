"""How tasks, attempts, live events and usage look in a terminal (and as ``--json``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.markup import escape

from openwham.client import StreamEvent, readiness, turn_messages
from openwham.client.attempts import Exchange, list_status
from openwham.client.sse import Steps, command_line, edit_summary
from openwham.wire import (
    AssistantTurn,
    PrOutputItem,
    RateLimitStatusPayload,
    RateLimitWindow,
    Task,
    TaskDetails,
    TaskListItem,
    WorklogMessage,
)

STATUS_STYLE = {"ready": "green", "error": "red", "pending": "yellow"}
OUTPUT_LINES = 12  # command output lines shown by `task watch` (the rest is elided)


def age(epoch: float | None, now: float | None = None) -> str:
    if epoch is None:
        return "-"
    seconds = max(0, int((now or time.time()) - epoch))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return "just now"


def summary(files: int, added: int, removed: int) -> str:
    return f"+{added}/-{removed} • {files} file{'' if files == 1 else 's'}"


def list_row(item: TaskListItem) -> dict[str, Any]:
    """One task of `task list`, as printed and as ``--json``."""
    display = item.task_status_display
    latest = display.latest_turn_status_display if display else None
    stats = latest.diff_stats if latest else None
    status = list_status(item)
    return {
        "id": item.id,
        "title": item.title,
        "status": readiness(status),
        "turn_status": status,
        "environment_label": display.environment_label if display else None,
        "branch": display.branch_name if display else None,
        "updated_at": item.updated_at,
        "summary": {
            "files_changed": stats.files_modified if stats else 0,
            "lines_added": stats.lines_added if stats else 0,
            "lines_removed": stats.lines_removed if stats else 0,
        },
        "attempt_total": len(latest.sibling_turn_ids) + 1 if latest else 1,
        "has_unread_turn": item.has_unread_turn,
        "archived": item.archived,
    }


def list_lines(row: dict[str, Any], url: str) -> list[str]:
    s = row["summary"]
    unread = " •" if row["has_unread_turn"] else ""
    attempts = f" • {row['attempt_total']} attempts" if row["attempt_total"] > 1 else ""
    style = STATUS_STYLE.get(row["status"], "white")
    return [
        f"[bold]{escape(row['id'])}[/]{unread}  [dim]{escape(url)}[/]",
        f"  [{style}]\\[{row['status'].upper()}][/] {escape(row['title'])}",
        f"  {escape(row['environment_label'] or '-')} • {escape(row['branch'] or '-')} • "
        f"{age(row['updated_at'])}{attempts} • "
        f"{summary(s['files_changed'], s['lines_added'], s['lines_removed'])}",
    ]


def attempt_row(turn: AssistantTurn, index: int) -> dict[str, Any]:
    stats = next(
        (
            (i.output_diff.files_modified, i.output_diff.lines_added, i.output_diff.lines_removed)
            for i in turn.output_items
            if isinstance(i, PrOutputItem)
        ),
        None,
    )
    return {
        "attempt": index,
        "turn_id": turn.id,
        "turn_status": turn.turn_status,
        "status_text": turn.latest_event.text if turn.latest_event else None,
        "error": turn.error.model_dump(mode="json") if turn.error else None,
        "summary": {
            "files_changed": (stats[0] or 0) if stats else 0,
            "lines_added": (stats[1] or 0) if stats else 0,
            "lines_removed": (stats[2] or 0) if stats else 0,
        },
        "messages": turn_messages(turn),
        "setup_cache": turn.setup_cache.model_dump(mode="json") if turn.setup_cache else None,
    }


def pr_branch(task: Task) -> dict[str, Any] | None:
    """The branch a PR push made for the task (``wham task pr``), with where it went."""
    pushed = task.external_pull_requests[-1] if task.external_pull_requests else None
    meta = task.denormalized_metadata
    branch = (pushed.pull_request.head if pushed else None) or meta.pushed_branch_name
    if not branch:
        return None
    pull = pushed.pull_request if pushed else None
    return {
        "branch": branch,
        "url": pull.url if pull else None,
        "turn_id": (pushed.assistant_turn_id if pushed else None) or meta.last_pushed_turn_id,
        # a pull request opened on a forge (0: only the branch was pushed)
        "number": pull.number if pull else 0,
        "state": pull.state if pull else None,
    }


def _outcome(turn: AssistantTurn) -> str:
    """What an attempt without an answer has to say instead."""
    if turn.turn_status == "completed":
        return "(no answer)"
    if turn.turn_status in ("failed", "cancelled"):
        message = turn.error.message if turn.error else None
        return f"({turn.turn_status}{': ' + message if message else ''})"
    now = turn.latest_event.text if turn.latest_event and turn.latest_event.text else None
    return (
        f"({'queued' if turn.turn_status == 'pending' else 'running'}{': ' + now if now else ''})"
    )


def exchange_rows(exchanges: list[Exchange]) -> list[dict[str, Any]]:
    """The conversation of `task show` (``--json``: ``conversation``), oldest first."""
    return [
        {
            "prompt": e.prompt,
            "turn_id": e.attempt.id,
            "attempt": e.attempt.attempt_placement + 1,
            "attempt_total": e.attempt_total,
            "turn_status": e.attempt.turn_status,
            "answer": "\n\n".join(e.answer) or None,
        }
        for e in exchanges
    ]


def conversation_lines(exchanges: list[Exchange]) -> list[str]:
    """Each prompt, then the answer of the attempt the conversation went on from."""
    lines: list[str] = []
    for index, row in enumerate(exchange_rows(exchanges)):
        label = "Prompt" if index == 0 else f"Follow-up {index}"
        which = f" (attempt {row['attempt']} of {row['attempt_total']})"
        answer = row["answer"] or _outcome(exchanges[index].attempt)
        lines += ["", f"[bold]{label}[/]", *_indented(row["prompt"] or "(no prompt)")]
        lines += [f"[bold]Answer[/]{which if row['attempt_total'] > 1 else ''}"]
        lines += _indented(answer)
    return lines


def _indented(text: str) -> list[str]:
    return [f"  {escape(line)}" if line else "" for line in text.splitlines()]


def details_lines(
    details: TaskDetails,
    attempts: list[AssistantTurn],
    url: str,
    exchanges: list[Exchange] | None = None,
    *,
    answers: bool = True,
) -> list[str]:
    """`task show`: header, PR branch, attempts, then the conversation (or, without it, the
    current attempt's answer). ``answers=False``: no conversation, no answer (`task watch`
    ends with this, after it printed the answer as it came)."""
    task = details.task
    display = details.task_status_display or task.task_status_display
    current = details.current_assistant_turn
    state = readiness(current.turn_status if current else None)
    style = STATUS_STYLE[state]
    lines = [
        f"[bold]{escape(task.title)}[/]",
        f"[{style}]\\[{state.upper()}][/] {escape(url)}",
        f"environment: {escape((display.environment_label if display else None) or '-')}"
        f"  branch: {escape((display.branch_name if display else None) or '-')}",
    ]
    pushed = pr_branch(task)
    if pushed and pushed["number"]:
        lines.append(
            f"Pull request #{pushed['number']} ({escape(str(pushed['state']))}): "
            f"{escape(pushed['url'] or '')}  branch: {escape(pushed['branch'])}"
        )
    elif pushed:
        where = f" ({escape(pushed['url'])})" if pushed["url"] else ""
        lines.append(f"PR branch: {escape(pushed['branch'])}{where}")
    for index, turn in enumerate(attempts, 1):
        row = attempt_row(turn, index)
        s = row["summary"]
        text = row["status_text"] or turn.turn_status
        lines.append(
            f"  attempt {index}: {escape(turn.turn_status)} ({escape(text)}) "
            f"{summary(s['files_changed'], s['lines_added'], s['lines_removed'])}"
        )
        if row["error"]:
            lines.append(f"    [red]{escape(str(row['error'].get('message') or ''))}[/]")
        if turn.setup_cache is not None:
            lines.append(f"    [dim]{escape(turn.setup_cache.summary())}[/]")
    if not answers:
        return lines
    if exchanges:
        return lines + conversation_lines(exchanges)
    for message in turn_messages(current):
        lines += ["", escape(message)]
    return lines


def cancelled_rows(turn_ids: list[str], attempts: list[AssistantTurn]) -> list[dict[str, Any]]:
    """The attempts a cancel stopped, numbered as `task show` numbers them (``attempt`` is
    ``None`` for an attempt of an earlier turn)."""
    numbers = {t.id: i for i, t in enumerate(attempts, 1)}
    return [{"attempt": numbers.get(turn_id), "turn_id": turn_id} for turn_id in turn_ids]


def attempts_text(rows: list[dict[str, Any]]) -> str:
    """``attempt 1, attempt 2`` (an attempt of an earlier turn by its id)."""
    return ", ".join(
        f"attempt {r['attempt']}" if r["attempt"] else f"attempt {r['turn_id']}" for r in rows
    )


@dataclass
class WatchView:
    """What `task watch` prints, event by event: each step once (the SDK's
    :class:`~openwham.client.sse.Steps` decides which events), formatted for the terminal."""

    steps: Steps = field(default_factory=Steps)

    def lines(self, event: StreamEvent) -> list[str]:
        if not self.steps.new(event):
            return []
        payload = event.payload
        if event.item_type == "task_turn_event":
            text = str(payload.get("text") or payload.get("turn_status") or "")
            lines = [f"[bold cyan]● {escape(text)}[/]"]
            error = payload.get("error")
            if isinstance(error, dict) and error.get("message"):
                lines.append(f"[red]  {escape(str(error['message']))}[/]")
            return lines
        if event.item_type == "log":
            return [f"[dim]setup │ {escape(str(payload.get('line', '')))}[/]"]
        if event.item_type == "task_title_generated":
            return [f"[dim]title: {escape(str(payload.get('title', '')))}[/]"]
        if event.item_type == "work_log_message":
            try:
                message = WorklogMessage.model_validate(payload)
            except ValueError:
                return []
            return worklog_lines(message)
        return []


def _text(message: WorklogMessage) -> str:
    content = message.content
    if content.text is not None:
        return content.text
    parts = content.parts or []
    return "".join(p if isinstance(p, str) else str(getattr(p, "text", "") or "") for p in parts)


def worklog_lines(message: WorklogMessage) -> list[str]:
    """A work-log message as terminal lines: a command as ``$ <shell line>``, an edit as the
    files it changed, a command's output (its last lines, and a non-zero exit code), the
    agent's text; nothing for the prompt."""
    role = message.author.role
    text = _text(message).rstrip()
    if role == "user" or not text:
        return []
    kind = message.content.content_type
    if role == "assistant" and kind == "code":
        if message.recipient == "apply_patch":
            return [f"[magenta]✎ {escape(edit_summary(text) or text)}[/]"]
        if message.recipient == "container.exec":
            first, *rest = command_line(text).splitlines() or [""]
            return [f"[bold]$ {escape(first)}[/]", *(f"[bold]  {escape(ln)}[/]" for ln in rest)]
        return [f"[bold]→ {escape(message.recipient or 'tool')}[/] {escape(text)}"]
    if role == "tool":
        if message.author.name == "apply_patch" and message.status != "failed":
            return []  # the edit's files are already shown
        lines = text.splitlines()
        shown = lines[-OUTPUT_LINES:]
        more = (
            [f"[dim]  … {len(lines) - len(shown)} more lines[/]"] if len(lines) > len(shown) else []
        )
        code = (message.metadata.model_extra or {}).get("exit_code")
        failed = [f"[red]  (exit {code})[/]"] if isinstance(code, int) and code != 0 else []
        return more + [f"[dim]  {escape(line)}[/]" for line in shown] + failed
    if message.channel == "analysis" or message.metadata.reasoning_status:
        return [f"[italic dim]{escape(text)}[/]"]
    return [escape(text)]


def _window(name: str, window: RateLimitWindow | None) -> dict[str, Any] | None:
    if window is None:
        return None
    reset = window.reset_at
    return {
        "window": name,
        "used_percent": window.used_percent,
        "limit_window_seconds": window.limit_window_seconds,
        "reset_at": reset,
        "resets": datetime.fromtimestamp(reset, UTC).strftime("%Y-%m-%d %H:%M UTC")
        if reset
        else None,
    }


def usage_rows(payload: RateLimitStatusPayload) -> list[dict[str, Any]]:
    limit = payload.rate_limit
    if limit is None:
        return []
    rows = [_window("primary", limit.primary_window), _window("secondary", limit.secondary_window)]
    return [r for r in rows if r is not None]


def bar(percent: float, width: int = 30) -> str:
    filled = max(0, min(width, round(percent / 100 * width)))
    return "█" * filled + "░" * (width - filled)
