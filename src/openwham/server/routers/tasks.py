"""Tasks and turns (docs/reference/wham-api.md §3, §4)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from openwham.commands import prs as pr_commands
from openwham.commands import tasks as commands
from openwham.service import logs, tasks, usage
from openwham.service.accounts import Principal
from openwham.service.errors import BadRequest
from openwham.wire import (
    CancelResponse,
    CreateTaskResponse,
    ExternalPullRequest,
    SiblingTurnsResponse,
    SuccessResponse,
    TaskDetails,
    TaskFeedPage,
    TaskListPage,
    TaskLogsResponse,
    TaskRateLimit,
    TurnLogsResponse,
    TurnMapping,
    TurnResponse,
)
from openwham.wire.forges import PullRequestOptions

from ..deps import (
    InlineDiffDep,
    PrincipalDep,
    Reader,
    ReaderDep,
    SessionDep,
    StateDep,
    inline_limit,
)
from ..errors import error_responses
from ..state import AppState

router = APIRouter(tags=["tasks"])

OK = SuccessResponse(success=True)
#: in a rendered task: a forge's pull request still open (pushed-only branches are "pushed")
OPEN_PR = b'"state":"open"'


@dataclass
class ListQuery:
    """The query of ``tasks/list`` and the ``tasks`` feed."""

    limit: Annotated[int | None, Query(description="Page size, 1..100 (default 20)")] = None
    task_filter: Annotated[str | None, Query(description="current (default), all or archived")] = (
        None
    )
    environment_id: Annotated[str | None, Query(description="Only this environment")] = None
    cursor: Annotated[str | None, Query(description="Opaque cursor of the previous page")] = None

    def page(self, db: Session, principal: Principal) -> TaskListPage:
        return tasks.list_tasks(db, principal, **vars(self))

    def feed(self, db: Session, principal: Principal) -> TaskFeedPage:
        return tasks.feed(db, principal, **vars(self))


async def list_query(**fields: Any) -> ListQuery:
    """``ListQuery`` from the query string. Async with the dataclass's signature: FastAPI runs
    a class dependency in a worker thread, one more hand-off per request for a constructor."""
    return ListQuery(**fields)


list_query.__signature__ = inspect.signature(ListQuery)  # type: ignore[attr-defined]
ListQueryDep = Annotated[ListQuery, Depends(list_query)]


@router.get("/tasks/list", response_model=TaskListPage)
async def list_tasks(reader: ReaderDep, query: ListQueryDep) -> Response:
    renders = reader.state.renders
    return await reader.rows(
        lambda conn, claims: tasks.list_json_authed(conn, claims, renders, **vars(query)),
        lambda db, p: tasks.list_json(db, p, renders, **vars(query)),
    )


async def list_page(
    state: AppState, token: str, account_header: str | None, **query: Any
) -> Response:
    """``list_tasks`` from the request's parts, for ``server.hotpath`` (which answers it
    without routing): the same reader and answer."""
    return await list_tasks(Reader(state, token, account_header), ListQuery(**query))


@router.get("/tasks", response_model=TaskFeedPage)
async def task_feed(reader: ReaderDep, query: ListQueryDep) -> Response:
    """The web feed: each task with its current assistant turn."""
    return await reader.json(query.feed)


@router.get("/tasks/rate_limit", response_model=TaskRateLimit)
def task_rate_limit(state: StateDep, principal: PrincipalDep, db: SessionDep) -> TaskRateLimit:
    return usage.task_rate_limit(db, state.settings, principal)


@router.post(
    "/tasks",
    response_model=CreateTaskResponse,
    responses=error_responses(404, 409, 429),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/CreateTaskRequest"}}
            },
        }
    },
)
def create_task(
    state: StateDep,
    principal: PrincipalDep,
    db: SessionDep,
    body: Annotated[Any, Body(include_in_schema=False)] = None,
) -> JSONResponse:
    """Create a task (``new_task``) or continue one (``follow_up``); see docs/api.md."""
    created = commands.create(db, state.commands, principal, body)
    return JSONResponse(created.response)


@router.get("/tasks/{task_id}", response_model=TaskDetails)
async def get_task(task_id: str, reader: ReaderDep, inline: InlineDiffDep) -> Response:
    """The task with its current turns; a diff over ``WHAM_INLINE_DIFF_MAX_BYTES`` is cut
    (``truncated: true``; the whole one: ``…/turns/{turn_id}/diff``)."""
    return await _details(reader, task_id, inline)


async def task_details(
    state: AppState,
    token: str,
    account_header: str | None,
    task_id: str,
    *,
    user_agent: str,
    originator: bool,
) -> Response:
    """``get_task`` from the request's parts, for ``server.hotpath`` (which answers it without
    routing): the same reader, limit and answer."""
    inline = inline_limit(state, user_agent, originator)
    return await _details(Reader(state, token, account_header), task_id, inline)


async def _details(reader: Reader, task_id: str, inline: int | None) -> Response:
    renders = reader.state.renders
    response = await reader.rows(
        lambda conn, claims: tasks.details_json_authed(
            conn, claims, task_id, renders, inline_diff=inline
        ),
        lambda db, p: tasks.details_json(db, p, task_id, renders, inline_diff=inline),
    )
    if response.status_code == 200 and OPEN_PR in response.body:  # a forge's: is it still?
        state = reader.state
        state.pr_refresher.soon(state.db, state.secret_box, [task_id])
    return response


@router.delete("/tasks/{task_id}", response_model=SuccessResponse)
def delete_task(
    task_id: str, state: StateDep, principal: PrincipalDep, db: SessionDep
) -> SuccessResponse:
    """Delete a task; its running attempts are stopped first, and its attempts' files go
    with it (workspaces, homes, Codex sessions)."""
    commands.delete(db, state.commands, principal, task_id)
    return OK


@router.post(
    "/tasks/{task_id}/recover",
    response_model=SuccessResponse,
    responses=error_responses(409, 429),
)
def recover(
    task_id: str, state: StateDep, principal: PrincipalDep, db: SessionDep
) -> SuccessResponse:
    """Run the latest turn's failed and cancelled attempts again (service/lifecycle.py)."""
    commands.recover(db, state.commands, principal, task_id)
    return OK


@router.post("/tasks/{task_id}/fork", response_model=TaskDetails, responses=error_responses(409))
def fork(
    task_id: str,
    state: StateDep,
    principal: PrincipalDep,
    db: SessionDep,
    inline: InlineDiffDep,
    body: Annotated[Any, Body()] = None,
) -> TaskDetails:
    """A new task that starts from a chosen completed attempt (service/lifecycle.py)."""
    forked = commands.fork(db, state.commands, principal, task_id, body)
    return tasks.details(db, principal, forked, inline_diff=inline)


@router.post("/tasks/{task_id}/archive", response_model=SuccessResponse)
def archive(task_id: str, principal: PrincipalDep, db: SessionDep) -> SuccessResponse:
    tasks.set_archived(db, principal, task_id, True)
    db.commit()
    return OK


@router.post("/tasks/{task_id}/unarchive", response_model=SuccessResponse)
def unarchive(task_id: str, principal: PrincipalDep, db: SessionDep) -> SuccessResponse:
    tasks.set_archived(db, principal, task_id, False)
    db.commit()
    return OK


@router.post("/tasks/{task_id}/mark_read", response_model=SuccessResponse)
def mark_read(task_id: str, principal: PrincipalDep, db: SessionDep) -> SuccessResponse:
    tasks.mark_read(db, principal, task_id)
    db.commit()
    return OK


@router.post("/tasks/{task_id}/cancel", response_model=CancelResponse)
def cancel(
    task_id: str, state: StateDep, principal: PrincipalDep, db: SessionDep
) -> CancelResponse:
    """Cancel every attempt of the task that is still queued or running. A finished task is
    not an error (cancel stays safe to retry); ``cancelled_turn_ids`` says what was stopped."""
    cancelled = commands.cancel(db, state.commands, principal, task_id)
    return CancelResponse(success=True, cancelled_turn_ids=cancelled)


@router.post("/tasks/{task_id}/turns/{turn_id}/cancel", response_model=CancelResponse)
def cancel_turn(
    task_id: str, turn_id: str, state: StateDep, principal: PrincipalDep, db: SessionDep
) -> CancelResponse:
    """Cancel one attempt (a finished one stays as it is: ``cancelled_turn_ids`` is empty)."""
    cancelled = commands.cancel_turn(db, state.commands, principal, task_id, turn_id)
    return CancelResponse(success=True, cancelled_turn_ids=cancelled)


@router.post(
    "/tasks/{task_id}/turns/{turn_id}/discard",
    response_model=SuccessResponse,
    responses=error_responses(409),
)
def discard(task_id: str, turn_id: str, principal: PrincipalDep, db: SessionDep) -> SuccessResponse:
    """Set a finished attempt aside; the task's current attempt moves to a kept sibling."""
    tasks.discard(db, principal, task_id, turn_id)
    db.commit()
    return OK


@router.post(
    "/tasks/{task_id}/turns/{turn_id}/undo_all_discards_for_siblings",
    response_model=SuccessResponse,
)
def undo_all_discards_for_siblings(
    task_id: str, turn_id: str, principal: PrincipalDep, db: SessionDep
) -> SuccessResponse:
    """Bring back the discarded attempts among this one and its siblings."""
    tasks.undo_discards(db, principal, task_id, turn_id)
    db.commit()
    return OK


@router.get("/tasks/{task_id}/turns", response_model=TurnMapping)
def turn_mapping(
    task_id: str, principal: PrincipalDep, db: SessionDep, inline: InlineDiffDep
) -> TurnMapping:
    return tasks.turn_mapping(db, principal, task_id, inline_diff=inline)


@router.get("/tasks/{task_id}/turns/{turn_id}", response_model=TurnResponse)
def get_turn(
    task_id: str, turn_id: str, principal: PrincipalDep, db: SessionDep, inline: InlineDiffDep
) -> TurnResponse:
    return TurnResponse(turn=tasks.get_turn(db, principal, task_id, turn_id, inline_diff=inline))


DIFF_MEDIA_TYPE = "text/x-diff; charset=utf-8"


@router.get(
    "/tasks/{task_id}/turns/{turn_id}/diff",
    response_class=Response,
    responses={
        200: {
            "description": "The attempt's whole unified diff, as `git diff` prints it",
            "content": {"text/x-diff": {"schema": {"type": "string"}}},
        }
    },
)
def turn_diff(
    task_id: str,
    turn_id: str,
    principal: PrincipalDep,
    db: SessionDep,
    repo_id: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """The whole diff of an attempt, never cut (details cut theirs at
    ``WHAM_INLINE_DIFF_MAX_BYTES``): ``curl … | git apply``. No diff yet or none made: 404.
    ``repo_id``: that repository's of a multi-repository attempt (its ``repo_diffs``)."""
    text = tasks.whole_diff(db, principal, task_id, turn_id, repo_id=repo_id)
    return Response(content=text.encode(), media_type=DIFF_MEDIA_TYPE)


@router.get("/tasks/{task_id}/turns/{turn_id}/sibling_turns", response_model=SiblingTurnsResponse)
def sibling_turns(
    task_id: str, turn_id: str, principal: PrincipalDep, db: SessionDep, inline: InlineDiffDep
) -> SiblingTurnsResponse:
    return tasks.sibling_turns(db, principal, task_id, turn_id, inline_diff=inline)


@router.post(
    "/tasks/{task_id}/turns/{turn_id}/pr",
    response_model=ExternalPullRequest,
    responses=error_responses(409, 429, 502),
)
def create_pr(
    task_id: str,
    turn_id: str,
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    db: SessionDep,
    body: Annotated[Any, Body()] = None,
) -> ExternalPullRequest:
    """Commit the attempt's change on the task's branch and push it (commands/prs.py): an
    earlier push a crash cut short is finished first; one push per task at a time across
    processes and nodes. With a forge connection for the repository the pull request is
    opened (or updated) on the forge. The body is optional: ``draft`` and
    ``pr_authorship_mode`` are read, other keys (official clients send their own) ignored."""
    picked = (
        {k: body[k] for k in ("draft", "pr_authorship_mode") if k in body}
        if isinstance(body, dict)
        else {}
    )
    try:
        options = PullRequestOptions.model_validate(picked)
    except ValidationError as exc:
        raise BadRequest(f"Invalid pull request options: {exc.errors()[0]['msg']}") from exc
    return pr_commands.push(
        db,
        state.commands,
        principal,
        task_id,
        turn_id,
        options=options,
        box=state.secret_box,
        link_base=str(request.base_url),
    )


@router.get("/tasks/{task_id}/turns/{turn_id}/logs", response_model=TurnLogsResponse)
def turn_logs(
    task_id: str, turn_id: str, principal: PrincipalDep, db: SessionDep
) -> TurnLogsResponse:
    return logs.turn_logs(db, principal, task_id, turn_id)


@router.get("/tasks/{task_id}/logs", response_model=TaskLogsResponse)
def task_logs(task_id: str, principal: PrincipalDep, db: SessionDep) -> TaskLogsResponse:
    return logs.task_logs(db, principal, task_id)


@router.post("/tasks/{task_id}/turns/{turn_id}/copy_git_apply", response_model=SuccessResponse)
def copy_git_apply(
    task_id: str, turn_id: str, principal: PrincipalDep, db: SessionDep
) -> SuccessResponse:
    """The web app's note that its user copied the attempt's ``git apply`` command: nothing
    to record here (the command is built by the client from the diff); 404 for an unknown
    turn like every turn action."""
    tasks.get_turn_row(db, tasks.get_task_row(db, principal, task_id), turn_id)
    return OK


@router.post("/tasks/{task_id}/turns/{turn_id}/viewed", response_model=SuccessResponse)
def viewed(task_id: str, turn_id: str, principal: PrincipalDep, db: SessionDep) -> SuccessResponse:
    tasks.mark_viewed(db, principal, task_id, turn_id)
    db.commit()
    return OK
