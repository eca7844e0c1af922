"""``wham task …``: submit, list, show, watch, diff, apply, follow up, cancel, archive, PR."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from . import diffs, pager
from .common import print_json
from .context import (
    FAILED,
    OK,
    PENDING,
    USAGE,
    die,
    handles_errors,
    open_client,
    out,
    read_prompt,
)

if TYPE_CHECKING:  # the SDK and render (the wire models) load when a command runs
    from openwham.client import StreamEvent, WhamClient
    from openwham.wire import CreateTaskResponse, TaskDetails

app = typer.Typer(
    help="Tasks: submit, follow, review and apply the agent's work.", no_args_is_help=True
)

JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON")
AttemptOption = typer.Option(1, "--attempt", "-a", min=1, max=4, help="Attempt number (1-based)")
RepositoryOption = typer.Option(
    None,
    "--repository",
    help="A multi-repository task: this repository's diff (name or owner/name; default: the first)",
)


def task_id_from(task: str) -> str:
    """A task id from an id or a task URL (the SDK's rule, loaded with the SDK)."""
    from openwham.client.urls import task_id_from as parse

    return parse(task)


def _exit_for(details: TaskDetails, attempts_done: bool = True) -> int:
    """0 when ready, 3 while running, 1 when it failed or was cancelled."""
    from openwham.client import readiness

    turn = details.current_assistant_turn
    state = readiness(turn.turn_status if turn else None)
    if state == "ready" and attempts_done:
        return OK
    return PENDING if state == "pending" or not attempts_done else FAILED


def _show(wham: WhamClient, task_id: str, as_json: bool, *, answers: bool = True) -> int:
    from openwham.client import readiness, task_url
    from openwham.client.attempts import TERMINAL, conversation

    from . import render

    details = wham.get_task(task_id)
    attempts = wham.attempts(task_id)
    current = details.current_assistant_turn
    exchanges = conversation(wham.turns(task_id), current.id) if current and current.id else []
    url = task_url(wham.base_url, task_id)
    done = all(t.turn_status in TERMINAL for t in attempts)
    if as_json:
        rows = render.exchange_rows(exchanges)
        print_json(
            {
                "id": details.task.id,
                "url": url,
                "title": details.task.title,
                "status": readiness(current.turn_status) if current else "pending",
                "environment_id": details.task.environment_id,
                "archived": details.task.archived,
                "attempts": [render.attempt_row(t, i) for i, t in enumerate(attempts, 1)],
                "prompt": rows[0]["prompt"] if rows else None,
                "conversation": rows,
                "pr_branch": render.pr_branch(details.task),
                "task": details.model_dump(mode="json"),
            }
        )
    else:
        for line in render.details_lines(details, attempts, url, exchanges, answers=answers):
            out.print(line)
    return _exit_for(details, done)


def _watch(wham: WhamClient, task_id: str, turn_id: str | None, as_json: bool) -> None:
    from . import render

    view = render.WatchView()
    event: StreamEvent
    for event in wham.stream(task_id, turn_id):
        if as_json:
            print_json({"id": event.id, "item_type": event.item_type, "payload": event.payload})
            sys.stdout.flush()
            continue
        for line in view.lines(event):
            out.print(line)


def _created(wham: WhamClient, created: CreateTaskResponse, as_json: bool, follow: str) -> str:
    from openwham.client import task_url

    task_id = created.task.id
    if as_json and follow == "":
        print_json(
            {
                "id": task_id,
                "url": task_url(wham.base_url, task_id),
                "turn_id": created.turn.id,
                "user_turn_id": created.user_turn.id,
            }
        )
    elif not as_json:
        out.print(task_url(wham.base_url, task_id), markup=False)
    return task_id


def _follow(
    wham: WhamClient, task_id: str, turn_id: str | None, wait: bool, watch: bool, as_json: bool
) -> None:
    if watch:
        _watch(wham, task_id, turn_id, as_json)
    if wait or watch:
        wham.wait(task_id)
        raise typer.Exit(_show(wham, task_id, as_json, answers=not watch))


@app.command("new")
@handles_errors
def new(
    ctx: typer.Context,
    prompt: str | None = typer.Argument(None, help="What to do ('-' or omitted: read stdin)"),
    env: str | None = typer.Option(
        None, "--env", "-e", help="Environment label or id (default: the one for this checkout)"
    ),
    branch: str | None = typer.Option(None, "--branch", "-b", help="Branch to start from"),
    attempts: int = typer.Option(1, "--attempts", "-n", min=1, max=4, help="Best-of-N (1-4)"),
    ask: bool = typer.Option(False, "--ask", help="Ask mode: answer only, no changes"),
    starting_diff: Path | None = typer.Option(
        None, "--starting-diff", help="A patch to apply before the agent starts"
    ),
    model: str | None = typer.Option(None, "--model", help="Model (openwham)"),
    wait: bool = typer.Option(False, "--wait", help="Wait until finished; exit as `task show`"),
    watch: bool = typer.Option(False, "--watch", help="Stream the work live, then wait"),
    as_json: bool = JsonOption,
) -> None:
    """Submit a task; prints its URL."""
    text = read_prompt(prompt)
    diff = None
    if starting_diff is not None:
        try:
            diff = starting_diff.read_text()
        except OSError as e:
            die(f"cannot read {starting_diff}: {e.strerror}", USAGE)
    with open_client(ctx) as wham:
        environment = wham.resolve_environment(env, repo=Path.cwd())
        created = wham.create_task(
            text,
            environment.id,
            branch=branch,
            attempts=attempts,
            ask=ask,
            starting_diff=diff,
            model=model,
        )
        follow = "watch" if watch else "wait" if wait else ""
        task_id = _created(wham, created, as_json, follow)
        _follow(wham, task_id, created.turn.id, wait, watch, as_json)


@app.command("list")
@handles_errors
def list_(
    ctx: typer.Context,
    env: str | None = typer.Option(None, "--env", "-e", help="Only this environment (label or id)"),
    task_filter: str = typer.Option(
        "current", "--filter", help="current, archived or all", case_sensitive=False
    ),
    limit: int = typer.Option(20, "--limit", min=1, max=100, help="Tasks per page"),
    cursor: str | None = typer.Option(None, "--cursor", help="Page cursor from an earlier list"),
    as_json: bool = JsonOption,
) -> None:
    """List tasks, newest first, one page at a time."""
    if task_filter not in ("current", "archived", "all"):
        die("--filter must be current, archived or all", USAGE)
    from openwham.client import task_url

    from . import render

    with open_client(ctx) as wham:
        env_id = wham.resolve_environment(env, repo=None).id if env else None
        page = wham.list_tasks(
            task_filter=task_filter,  # type: ignore[arg-type]
            limit=limit,
            cursor=cursor,
            environment_id=env_id,
        )
        rows = [render.list_row(item) for item in page.items]
        if as_json:
            for row in rows:
                row["url"] = task_url(wham.base_url, row["id"])
            print_json({"tasks": rows, "cursor": page.cursor})
            return
        if not rows:
            out.print("No tasks found.")
        for row in rows:
            for line in render.list_lines(row, task_url(wham.base_url, row["id"])):
                out.print(line)
        if page.cursor:
            out.print(f"\nmore: wham task list --cursor '{page.cursor}'", markup=False)


@app.command("show")
@handles_errors
def show(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task id or URL"),
    as_json: bool = JsonOption,
) -> None:
    """Show a task: status, attempts, stats, final message. Exit 0 only when ready."""
    with open_client(ctx) as wham:
        raise typer.Exit(_show(wham, task_id_from(task), as_json))


@app.command("watch")
@handles_errors
def watch(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task id or URL"),
    attempt: int = AttemptOption,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event"),
) -> None:
    """Follow an attempt live: status line, commands with output, messages."""
    task_id = task_id_from(task)
    with open_client(ctx) as wham:
        turn = wham.attempts(task_id)
        if not turn:
            die(f"task {task_id} has no attempts yet", FAILED)
        if attempt > len(turn):
            die(f"task {task_id} has {len(turn)} attempt(s)", USAGE)
        _watch(wham, task_id, turn[attempt - 1].id, as_json)
        if not as_json:
            raise typer.Exit(_show(wham, task_id, False, answers=False))


@app.command("diff")
@handles_errors
def diff(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task id or URL"),
    attempt: int = AttemptOption,
    stat: bool = typer.Option(
        False, "--stat", help="Lines added and removed per file, and a summary (git diff --stat)"
    ),
    color: str = typer.Option(
        "auto",
        "--color",
        help="auto (on a terminal unless NO_COLOR is set), always or never",
        case_sensitive=False,
    ),
    no_pager: bool = typer.Option(
        False, "--no-pager", help="Print directly (on a terminal: $WHAM_PAGER, $PAGER, less -FRX)"
    ),
    as_json: bool = JsonOption,
    repository: str | None = RepositoryOption,
) -> None:
    """Print an attempt's unified diff; coloured and paged on a terminal, as git does."""
    choice = color.lower()
    if choice not in pager.COLOR_CHOICES:
        die("--color must be auto, always or never", USAGE)
    task_id = task_id_from(task)
    with open_client(ctx) as wham:
        text = wham.diff(task_id, attempt=attempt, repository=repository)
    files = diffs.stats(text) if stat else []
    if as_json:
        body: dict[str, object] = {"id": task_id, "attempt": attempt, "diff": text}
        if stat:
            body["files"] = [
                {"path": f.path, "added": f.added, "removed": f.removed, "binary": f.binary}
                for f in files
            ]
            body["summary"] = {
                "files_changed": len(files),
                "lines_added": sum(f.added for f in files),
                "lines_removed": sum(f.removed for f in files),
            }
        print_json(body)
        return
    paint = pager.wants_color(choice)
    if stat:
        shown = diffs.stat_text(files, color=paint)
    else:
        shown = diffs.colored(text) if paint else text if text.endswith("\n") else text + "\n"
    pager.show(shown, page=not no_pager)


@app.command("apply")
@handles_errors
def apply(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task id or URL"),
    attempt: int = AttemptOption,
    check: bool = typer.Option(False, "--check", help="Only check that it applies"),
    repo: Path = typer.Option(Path("."), "--repo", help="The git checkout to apply to"),
    as_json: bool = JsonOption,
    repository: str | None = RepositoryOption,
) -> None:
    """Apply an attempt's diff to a local checkout (git apply --3way; changes are staged)."""
    task_id = task_id_from(task)
    with open_client(ctx) as wham:
        result = wham.apply(task_id, repo, attempt=attempt, check=check, repository=repository)
    if as_json:
        print_json(
            {
                "id": task_id,
                "attempt": attempt,
                "status": result.status,
                "checked_only": result.checked_only,
                "applied": result.applied,
                "skipped": result.skipped,
                "conflicts": result.conflicts,
            }
        )
    else:
        out.print(f"{task_id}: {result.message}", markup=False)
        for path in result.conflicts:
            out.print(f"  conflict: {path}", markup=False)
        for path in result.skipped:
            out.print(f"  skipped: {path}", markup=False)
    raise typer.Exit(OK if result.status == "success" else FAILED)


@app.command("follow-up")
@handles_errors
def follow_up(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task id or URL"),
    message: str | None = typer.Argument(None, help="The follow-up ('-' or omitted: stdin)"),
    turn: str | None = typer.Option(None, "--turn", help="Attempt turn id (default: current)"),
    attempts: int = typer.Option(1, "--attempts", "-n", min=1, max=4, help="Best-of-N (1-4)"),
    ask: bool = typer.Option(False, "--ask", help="Ask mode: answer only, no changes"),
    wait: bool = typer.Option(False, "--wait", help="Wait until finished; exit as `task show`"),
    watch: bool = typer.Option(False, "--watch", help="Stream the work live, then wait"),
    as_json: bool = JsonOption,
) -> None:
    """Continue a task with another message."""
    text = read_prompt(message, "message")
    with open_client(ctx) as wham:
        created = wham.follow_up(task_id_from(task), text, turn_id=turn, attempts=attempts, ask=ask)
        follow = "watch" if watch else "wait" if wait else ""
        task_id = _created(wham, created, as_json, follow)
        _follow(wham, task_id, created.turn.id, wait, watch, as_json)


def _action(ctx: typer.Context, task: str, verb: str, as_json: bool) -> None:
    task_id = task_id_from(task)
    with open_client(ctx) as wham:
        done = {"archive": wham.archive, "unarchive": wham.unarchive}[verb](task_id)
    if as_json:
        print_json({"id": task_id, "action": verb, "success": done})
    else:
        out.print(f"{task_id}: {verb}d", markup=False)


@app.command("cancel")
@handles_errors
def cancel(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task id or URL"),
    as_json: bool = JsonOption,
) -> None:
    """Stop the task's queued and running attempts; exit 1 when none was left to cancel."""
    from openwham.client import readiness
    from openwham.client.attempts import TERMINAL

    from . import render

    task_id = task_id_from(task)
    with open_client(ctx) as wham:
        before = wham.attempts(task_id)
        ids = wham.cancel(task_id).cancelled_turn_ids
        if ids is None:  # a server that does not say (chatgpt.com): those that were running
            ids = [t.id for t in before if t.id and t.turn_status not in TERMINAL]
        current = wham.get_task(task_id).current_assistant_turn
    status = current.turn_status if current else "pending"
    cancelled = render.cancelled_rows(ids, before)
    if as_json:
        print_json(
            {
                "id": task_id,
                "action": "cancel",
                "success": bool(ids),
                "cancelled": cancelled,
                "status": readiness(status),
                "turn_status": status,
            }
        )
    elif ids:
        out.print(f"{task_id}: cancelled {render.attempts_text(cancelled)}", markup=False)
    if not ids:
        if not as_json and status in TERMINAL:
            state = "ready" if status == "completed" else status
            die(f"nothing to cancel: task {task_id} is already {state}", FAILED)
        if not as_json:  # a race: another attempt started after the cancel
            die(f"nothing was cancelled: task {task_id} is {status}", FAILED)
        raise typer.Exit(FAILED)


@app.command("archive")
@handles_errors
def archive(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task id or URL"),
    as_json: bool = JsonOption,
) -> None:
    """Move a task to the archived list."""
    _action(ctx, task, "archive", as_json)


@app.command("unarchive")
@handles_errors
def unarchive(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task id or URL"),
    as_json: bool = JsonOption,
) -> None:
    """Bring an archived task back."""
    _action(ctx, task, "unarchive", as_json)


@app.command("pr")
@handles_errors
def pr(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task id or URL"),
    attempt: int = AttemptOption,
    draft: bool = typer.Option(False, "--draft", help="Open the pull request as a draft"),
    bot: bool = typer.Option(False, "--bot", help="Open it with the connection's bot token"),
    as_json: bool = JsonOption,
) -> None:
    """Push an attempt's change to a branch of the environment's remote, and open the pull
    request when a forge is connected for it (`wham forge add`)."""
    task_id = task_id_from(task)
    with open_client(ctx) as wham:
        result = wham.create_pr(
            task_id, attempt=attempt, draft=draft, authorship="bot" if bot else None
        )
    if as_json:
        print_json(result.model_dump(mode="json"))
        return
    pull = result.pull_request
    if pull.number:
        kind = "draft pull request" if pull.draft else "pull request"
        out.print(f"{task_id}: {kind} #{pull.number} ({pull.state}) {pull.url}", markup=False)
    else:
        out.print(f"{task_id}: pushed branch {pull.head or '?'} ({pull.url})", markup=False)
