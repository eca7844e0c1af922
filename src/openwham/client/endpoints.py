"""Every WHAM operation the SDK offers, as data (:class:`~openwham.client.core.Call`) or as a
multi-step :data:`~openwham.client.core.Op`. Both clients execute these; nothing here does I/O.

Paths are relative to the API root (``…/wham`` or ``…/api/codex``, see :mod:`urls`).
"""

from __future__ import annotations

import time
from typing import Any, Literal
from urllib.parse import quote

from pydantic import TypeAdapter

from openwham.client.attempts import TERMINAL, sort_attempts, turn_diff_item
from openwham.client.core import Call, Op, Sleep
from openwham.client.errors import Conflict, WhamError
from openwham.wire import (
    AssistantTurn,
    CancelResponse,
    CreateTaskResponse,
    Environment,
    ExternalPullRequest,
    Machine,
    RateLimitStatusPayload,
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
    UserSettings,
)
from openwham.wire.forges import ForgeConnectionInfo, ForgeConnectionList
from openwham.wire.gitcreds import GitCredentialInfo, GitCredentialList
from openwham.wire.tokens import ApiTokenCreate, ApiTokenCreated, ApiTokenInfo, ApiTokenList

TaskFilter = Literal["current", "all", "archived"]
_ENVIRONMENTS = TypeAdapter(list[Environment])


def _seg(value: str) -> str:
    """One path segment, escaped (ids come from users and URLs)."""
    if not value:
        raise WhamError("an id must not be empty")
    return quote(value, safe="")


def _success(data: Any) -> bool:
    return SuccessResponse.model_validate(data or {"success": True}).success


# ----------------------------------------------------------------------------- tasks


def list_tasks(
    *,
    task_filter: TaskFilter = "current",
    limit: int | None = None,
    cursor: str | None = None,
    environment_id: str | None = None,
) -> Call[TaskListPage]:
    params = {
        "limit": limit,
        "task_filter": task_filter,
        "cursor": cursor,
        "environment_id": environment_id,
    }
    return Call("GET", "tasks/list", TaskListPage.model_validate, params=params, idempotent=True)


def task_feed(*, limit: int | None = None, cursor: str | None = None) -> Call[TaskFeedPage]:
    params = {"limit": limit, "cursor": cursor}
    return Call("GET", "tasks", TaskFeedPage.model_validate, params=params, idempotent=True)


def task_rate_limit() -> Call[TaskRateLimit]:
    return Call("GET", "tasks/rate_limit", TaskRateLimit.model_validate, idempotent=True)


def get_task(task_id: str) -> Call[TaskDetails]:
    return Call("GET", f"tasks/{_seg(task_id)}", TaskDetails.model_validate, idempotent=True)


def message_items(prompt: str, starting_diff: str | None) -> list[dict[str, Any]]:
    """``input_items`` as ``codex cloud exec`` sends them (a ``pre_apply_patch`` when given)."""
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "user", "content": [{"content_type": "text", "text": prompt}]}
    ]
    if starting_diff:
        items.append({"type": "pre_apply_patch", "output_diff": {"diff": starting_diff}})
    return items


def _mode(
    ask: bool, model: str | None, reasoning_effort: str | None, **fields: Any
) -> dict[str, Any]:
    body = {**fields, "run_environment_in_qa_mode": ask}
    if model:
        body["model"] = model
    if reasoning_effort:
        body["reasoning_effort"] = reasoning_effort
    return body


def _create(mode: str, spec: dict[str, Any], items: list[dict[str, Any]], attempts: int) -> Any:
    if not 1 <= attempts <= 4:
        raise WhamError("attempts must be between 1 and 4")
    body: dict[str, Any] = {mode: spec, "input_items": items}
    if attempts > 1:
        body["metadata"] = {"best_of_n": attempts}
    return body


def create_task(
    prompt: str,
    environment_id: str,
    *,
    branch: str | None = None,
    attempts: int = 1,
    ask: bool = False,
    starting_diff: str | None = None,
    model: str | None = None,
    reasoning_effort: str | None = None,
) -> Call[CreateTaskResponse]:
    """``POST tasks`` with a ``new_task``; not retried (it is not idempotent)."""
    spec = _mode(ask, model, reasoning_effort, environment_id=environment_id)
    if branch:
        spec["branch"] = branch
    body = _create("new_task", spec, message_items(prompt, starting_diff), attempts)
    return Call("POST", "tasks", CreateTaskResponse.model_validate, json=body)


def follow_up(
    task_id: str,
    turn_id: str,
    prompt: str,
    *,
    attempts: int = 1,
    ask: bool = False,
    model: str | None = None,
    reasoning_effort: str | None = None,
) -> Call[CreateTaskResponse]:
    """``POST tasks`` with a ``follow_up`` on one assistant turn (openwham's shape)."""
    spec = _mode(ask, model, reasoning_effort, task_id=task_id, turn_id=turn_id)
    body = _create("follow_up", spec, message_items(prompt, None), attempts)
    return Call("POST", "tasks", CreateTaskResponse.model_validate, json=body)


def turns(task_id: str) -> Call[TurnMapping]:
    return Call("GET", f"tasks/{_seg(task_id)}/turns", TurnMapping.model_validate, idempotent=True)


def get_turn(task_id: str, turn_id: str) -> Call[TurnResponse]:
    path = f"tasks/{_seg(task_id)}/turns/{_seg(turn_id)}"
    return Call("GET", path, TurnResponse.model_validate, idempotent=True)


def sibling_turns(task_id: str, turn_id: str) -> Call[SiblingTurnsResponse]:
    path = f"tasks/{_seg(task_id)}/turns/{_seg(turn_id)}/sibling_turns"
    return Call("GET", path, SiblingTurnsResponse.model_validate, idempotent=True)


def turn_diff(task_id: str, turn_id: str, repo_id: str | None = None) -> Call[str]:
    """An attempt's whole diff (openwham only: details cut big ones, ``truncated: true``);
    ``repo_id``: one repository's of a multi-repository attempt (its ``repo_diffs``)."""
    path = f"tasks/{_seg(task_id)}/turns/{_seg(turn_id)}/diff"
    params = {"repo_id": repo_id} if repo_id is not None else None
    return Call("GET", path, str, params=params, idempotent=True, text=True)


def turn_logs(task_id: str, turn_id: str) -> Call[TurnLogsResponse]:
    path = f"tasks/{_seg(task_id)}/turns/{_seg(turn_id)}/logs"
    return Call("GET", path, TurnLogsResponse.model_validate, idempotent=True)


def task_logs(task_id: str) -> Call[TaskLogsResponse]:
    path = f"tasks/{_seg(task_id)}/logs"
    return Call("GET", path, TaskLogsResponse.model_validate, idempotent=True)


TaskAction = Literal["archive", "unarchive", "mark_read", "cancel", "recover"]


def task_action(task_id: str, action: TaskAction) -> Call[bool]:
    """A state change that is safe to repeat (so it is retried like a read)."""
    return Call("POST", f"tasks/{_seg(task_id)}/{action}", _success, idempotent=True)


def _cancelled(data: Any) -> CancelResponse:
    return CancelResponse.model_validate(data or {"success": True})


def cancel(task_id: str) -> Call[CancelResponse]:
    """Cancel the task's queued and running attempts (``cancelled_turn_ids``: which)."""
    return Call("POST", f"tasks/{_seg(task_id)}/cancel", _cancelled, idempotent=True)


def cancel_turn(task_id: str, turn_id: str) -> Call[CancelResponse]:
    path = f"tasks/{_seg(task_id)}/turns/{_seg(turn_id)}/cancel"
    return Call("POST", path, _cancelled, idempotent=True)


def delete_task(task_id: str) -> Call[bool]:
    return Call("DELETE", f"tasks/{_seg(task_id)}", _success, idempotent=True)


def create_pr(
    task_id: str, turn_id: str, *, draft: bool = False, authorship: str | None = None
) -> Call[ExternalPullRequest]:
    """Push the attempt's change; with a forge connection (openwham) the pull request is
    opened there too (``draft``, ``authorship``: ``user`` or ``bot``)."""
    path = f"tasks/{_seg(task_id)}/turns/{_seg(turn_id)}/pr"
    body: dict[str, Any] = {"draft": True} if draft else {}
    if authorship is not None:
        body["pr_authorship_mode"] = authorship
    return Call("POST", path, ExternalPullRequest.model_validate, json=body or None)


def fork(task_id: str, turn_id: str | None = None) -> Call[TaskDetails]:
    body = {"turn_id": turn_id} if turn_id else {}
    return Call("POST", f"tasks/{_seg(task_id)}/fork", TaskDetails.model_validate, json=body)


def stream_path(task_id: str, turn_id: str) -> str:
    return f"tasks/{_seg(task_id)}/turns/{_seg(turn_id)}/stream"


# ----------------------------------------------------------------------------- environments


def list_environments() -> Call[list[Environment]]:
    return Call("GET", "environments", _ENVIRONMENTS.validate_python, idempotent=True)


def recent_environments() -> Call[list[Environment]]:
    return Call("GET", "environments/recent", _ENVIRONMENTS.validate_python, idempotent=True)


def machines() -> Call[list[Machine]]:
    return Call("GET", "machines", TypeAdapter(list[Machine]).validate_python, idempotent=True)


def environments_by_repo(provider: str, owner: str, repo: str) -> Call[list[Environment]]:
    path = f"environments/by-repo/{_seg(provider)}/{_seg(owner)}/{_seg(repo)}"
    return Call("GET", path, _ENVIRONMENTS.validate_python, idempotent=True)


def get_environment(env_id: str) -> Call[Environment]:
    return Call("GET", f"environments/{_seg(env_id)}", Environment.model_validate, idempotent=True)


def create_environment(body: dict[str, Any]) -> Call[Environment]:
    return Call("POST", "environments", Environment.model_validate, json=body)


def update_environment(env_id: str, body: dict[str, Any]) -> Call[Environment]:
    path = f"environments/{_seg(env_id)}"
    return Call("PATCH", path, Environment.model_validate, json=body, idempotent=True)


def delete_environment(env_id: str) -> Call[bool]:
    path = f"environments/{_seg(env_id)}"
    return Call("DELETE", path, lambda _: True, idempotent=True, expect_body=False)


# ----------------------------------------------------------------------------- account


def usage() -> Call[RateLimitStatusPayload]:
    return Call("GET", "usage", RateLimitStatusPayload.model_validate, idempotent=True)


def get_settings() -> Call[UserSettings]:
    return Call("GET", "settings/user", UserSettings.model_validate, idempotent=True)


def update_settings(changes: dict[str, Any]) -> Call[UserSettings]:
    return Call("PATCH", "settings/user", UserSettings.model_validate, json=changes)


def list_tokens() -> Call[ApiTokenList]:
    """The caller's API tokens (openwham only)."""
    return Call("GET", "tokens", ApiTokenList.model_validate, idempotent=True)


def create_token(
    *, name: str | None = None, expires_in_days: float | None = None
) -> Call[ApiTokenCreated]:
    """A new API token for the caller; not retried (each call makes one)."""
    body = ApiTokenCreate(name=name, expires_in_days=expires_in_days)
    return Call(
        "POST", "tokens", ApiTokenCreated.model_validate, json=body.model_dump(exclude_none=True)
    )


def list_forge_connections() -> Call[ForgeConnectionList]:
    """The account's forge connections (openwham only; never a token)."""
    return Call("GET", "forge_connections", ForgeConnectionList.model_validate, idempotent=True)


def create_forge_connection(body: dict[str, Any]) -> Call[ForgeConnectionInfo]:
    """Connect a forge (``kind``, ``token``, optional ``api_base_url``, ``repo_url_prefix``,
    ``bot_token``, ``pr_authorship_mode``)."""
    return Call("POST", "forge_connections", ForgeConnectionInfo.model_validate, json=body)


def delete_forge_connection(connection_id: str) -> Call[bool]:
    path = f"forge_connections/{_seg(connection_id)}"
    return Call("DELETE", path, lambda _: True, idempotent=True, expect_body=False)


def list_git_credentials() -> Call[GitCredentialList]:
    """The account's git credentials (openwham only; never a secret or key)."""
    return Call("GET", "git_credentials", GitCredentialList.model_validate, idempotent=True)


def create_git_credential(body: dict[str, Any]) -> Call[GitCredentialInfo]:
    """Add a git credential: ``url_prefix`` with ``username`` + ``secret`` (HTTPS) or
    ``ssh_private_key`` + ``known_hosts`` (SSH)."""
    return Call("POST", "git_credentials", GitCredentialInfo.model_validate, json=body)


def delete_git_credential(credential_id: str) -> Call[bool]:
    path = f"git_credentials/{_seg(credential_id)}"
    return Call("DELETE", path, lambda _: True, idempotent=True, expect_body=False)


def revoke_token(token_id: str) -> Call[ApiTokenInfo]:
    """Revoke one of the caller's tokens (the one in use too); every node refuses it at once."""
    return Call("DELETE", f"tokens/{_seg(token_id)}", ApiTokenInfo.model_validate)


def get(path: str, model: Any) -> Call[Any]:
    """Any other read, parsed into ``model`` (a wire model class or a ``TypeAdapter``)."""
    parse = model.validate_python if isinstance(model, TypeAdapter) else model.model_validate
    return Call("GET", path.lstrip("/"), parse, idempotent=True)


# ----------------------------------------------------------------------------- operations


def attempts_op(task_id: str) -> Op[tuple[TaskDetails, list[AssistantTurn]]]:
    """The task and every attempt of its current user turn, in the CLI's order."""
    details: TaskDetails = yield get_task(task_id)
    current = details.current_assistant_turn
    if current is None:
        return details, []
    found = [current]
    if current.id and current.sibling_turn_ids:
        siblings: SiblingTurnsResponse = yield sibling_turns(task_id, current.id)
        found += [t for t in siblings.sibling_turns if t.id]
    return details, sort_attempts(found)


def pick_attempt(task_id: str, attempts: list[AssistantTurn], attempt: int) -> AssistantTurn:
    """Attempt ``attempt`` (1-based, in the CLI's order)."""
    if not attempts:
        raise WhamError(f"task {task_id} has no attempts yet")
    if not 1 <= attempt <= len(attempts):
        raise WhamError(f"task {task_id} has {len(attempts)} attempt(s); --attempt {attempt}")
    return attempts[attempt - 1]


def repository_key(turn: AssistantTurn, repository: str) -> str:
    """The key (in ``repos``) of the attempt's repository named ``repository``: its key, its
    name or its full name (``owner/name``), compared without case for names."""
    env = turn.environment
    repo_map = env.repo_map if env is not None else {}
    for key, info in repo_map.items():
        names = {key}
        if info is not None:
            names |= {str(info.name or "").lower(), str(info.repository_full_name or "").lower()}
        if repository in names or repository.lower() in names:
            return str(key)
    known = ", ".join(sorted(str(i.name) for i in repo_map.values() if i is not None and i.name))
    raise WhamError(f"the attempt has no repository {repository!r} (its repositories: {known})")


def _repository_diff(task_id: str, turn: AssistantTurn, attempt: int, repository: str) -> Op[str]:
    """One repository's diff of a multi-repository attempt (``repo_diffs``), whole."""
    key = repository_key(turn, repository)
    item = (turn.repo_diffs or {}).get(key)
    if item is not None and item.truncated and turn.id:
        whole: str = yield turn_diff(task_id, turn.id, key)
        return whole
    if item is not None and item.diff:
        return item.diff
    status = turn.turn_status
    why = "it is still running" if status not in TERMINAL else "it did not change it"
    raise Conflict(409, f"No diff of {repository} for task {task_id} attempt {attempt}: {why}")


def diff_op(task_id: str, attempt: int = 1, repository: str | None = None) -> Op[str]:
    """The whole unified diff of one attempt; :class:`Conflict` while it has none yet. A diff
    the details carry cut (``truncated``) is fetched whole from its own endpoint, so a caller
    never gets part of a patch. ``repository``: that repository's of a multi-repository
    attempt (name, ``owner/name`` or key), else the first repository's."""
    details, found = yield from attempts_op(task_id)
    turn = pick_attempt(task_id, found, attempt)
    if repository is not None:
        return (yield from _repository_diff(task_id, turn, attempt, repository))
    source, item = turn, turn_diff_item(turn)
    if item is None and turn is details.current_assistant_turn:
        # the CLI's rule: current_diff_task_turn first
        for candidate in (details.current_diff_task_turn, details.current_assistant_turn):
            item = turn_diff_item(candidate)
            if candidate is not None and item is not None:
                source = candidate
                break
    if item is not None and item.truncated:
        if not source.id:
            raise WhamError(f"task {task_id}: the server cut the diff and named no turn for it")
        whole: str = yield turn_diff(task_id, source.id)
        return whole
    if item is not None and item.diff:
        return item.diff
    status = turn.turn_status
    why = "it is still running" if status not in TERMINAL else f"it {status} without one"
    raise Conflict(409, f"No diff available for task {task_id} attempt {attempt}: {why}")


def wait_op(task_id: str, *, poll: float = 1.0, timeout: float | None = None) -> Op[TaskDetails]:
    """Poll until every attempt of the current user turn is finished; returns the details."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        details, found = yield from attempts_op(task_id)
        if found and all(t.turn_status in TERMINAL for t in found):
            return details
        if deadline is not None and time.monotonic() >= deadline:
            status = found[0].turn_status if found else "pending"
            raise WhamError(f"task {task_id} is still {status} after {timeout:g}s")
        yield Sleep(poll)


def follow_up_op(
    task_id: str,
    prompt: str,
    *,
    turn_id: str | None = None,
    attempts: int = 1,
    ask: bool = False,
    model: str | None = None,
    reasoning_effort: str | None = None,
) -> Op[CreateTaskResponse]:
    """A follow-up on ``turn_id`` (default: the task's current attempt)."""
    if turn_id is None:
        details: TaskDetails = yield get_task(task_id)
        current = details.current_assistant_turn
        if current is None or not current.id:
            raise WhamError(f"task {task_id} has no attempt to follow up yet")
        turn_id = current.id
    call = follow_up(
        task_id,
        turn_id,
        prompt,
        attempts=attempts,
        ask=ask,
        model=model,
        reasoning_effort=reasoning_effort,
    )
    created: CreateTaskResponse = yield call
    return created


def attempt_turn_op(task_id: str, attempt: int = 1) -> Op[AssistantTurn]:
    """Attempt ``attempt`` (1-based, the CLI's order) of the task's current user turn."""
    _, found = yield from attempts_op(task_id)
    return pick_attempt(task_id, found, attempt)


def pr_op(
    task_id: str, attempt: int = 1, *, draft: bool = False, authorship: str | None = None
) -> Op[ExternalPullRequest]:
    """Push attempt ``attempt``'s change to a PR branch (and open the pull request)."""
    turn = yield from attempt_turn_op(task_id, attempt)
    assert turn.id is not None  # attempts_op keeps only turns with ids
    pr: ExternalPullRequest = yield create_pr(task_id, turn.id, draft=draft, authorship=authorship)
    return pr
