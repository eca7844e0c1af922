"""``WhamClient``: the blocking client. Every method builds its request(s) with
:mod:`openwham.client.endpoints` and only does the I/O here (its async twin is ``aio.py``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from openwham.client import endpoints as ep
from openwham.client._base import client_options
from openwham.client.apply import ApplyResult, apply_diff
from openwham.client.core import STREAM_TIMEOUT, Call, Op, Sleep, api_error
from openwham.client.errors import TransportError
from openwham.client.resolve import resolve_op
from openwham.client.sse import StreamEvent, StreamReader
from openwham.wire import (
    AssistantTurn,
    CancelResponse,
    CreateTaskResponse,
    Environment,
    ExternalPullRequest,
    Machine,
    RateLimitStatusPayload,
    TaskDetails,
    TaskFeedPage,
    TaskListItem,
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
from openwham.wire.tokens import ApiTokenCreated, ApiTokenInfo, ApiTokenList

T = TypeVar("T")


class WhamClient:
    """A WHAM API client for openwham servers and chatgpt.com's Codex cloud.

    ``WhamClient("http://127.0.0.1:8080", token=...)`` talks to openwham (``/api/codex/…``);
    a base containing ``/backend-api`` uses ``/backend-api/wham/…``; the default base is
    chatgpt.com, with ``auth=CodexAuth(codex_home)``. Reads and repeatable actions are retried
    on 429, 5xx and network errors; creating a task is not.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        token: str | None = None,
        auth: httpx.Auth | None = None,
        account_id: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        opts = client_options(base_url, token, auth, account_id, timeout, retries)
        self.base_url = opts.base_url
        self.retry = opts.retry
        self._http = httpx.Client(
            base_url=opts.api_root,
            headers=opts.headers,
            auth=opts.auth,
            timeout=opts.timeout,
            transport=transport,
        )

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> WhamClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _call(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.send(call.request(self._http))
            except httpx.TransportError as e:
                if not self.retry.should_retry(call, attempt, None):
                    raise TransportError(f"cannot reach {self.base_url}: {e}") from e
                self._sleep(self.retry.delay(attempt, None))
                continue
            if self.retry.should_retry(call, attempt, response):
                self._sleep(self.retry.delay(attempt, response))
                continue
            return call.result(response)

    def _run(self, op: Op[T]) -> T:
        try:
            step = next(op)
            while True:
                if isinstance(step, Sleep):
                    self._sleep(step.seconds)
                    step = op.send(None)
                    continue
                try:
                    value: Any = self._call(step)
                except Exception as e:  # let the operation handle (or re-raise) it
                    step = op.throw(e)
                    continue
                step = op.send(value)
        except StopIteration as stop:
            result: T = stop.value
            return result

    # ------------------------------------------------------------------ tasks

    def create_task(
        self,
        prompt: str,
        environment_id: str,
        *,
        branch: str | None = None,
        attempts: int = 1,
        ask: bool = False,
        starting_diff: str | None = None,
        model: str | None = None,
        reasoning_effort: str | None = None,
    ) -> CreateTaskResponse:
        """Start a task (``attempts`` 1-4 for best-of-N; ``ask`` for Ask mode)."""
        return self._call(
            ep.create_task(
                prompt,
                environment_id,
                branch=branch,
                attempts=attempts,
                ask=ask,
                starting_diff=starting_diff,
                model=model,
                reasoning_effort=reasoning_effort,
            )
        )

    def follow_up(
        self,
        task_id: str,
        prompt: str,
        *,
        turn_id: str | None = None,
        attempts: int = 1,
        ask: bool = False,
        model: str | None = None,
        reasoning_effort: str | None = None,
    ) -> CreateTaskResponse:
        """Continue the task from ``turn_id`` (default: its current attempt)."""
        return self._run(
            ep.follow_up_op(
                task_id,
                prompt,
                turn_id=turn_id,
                attempts=attempts,
                ask=ask,
                model=model,
                reasoning_effort=reasoning_effort,
            )
        )

    def list_tasks(
        self,
        *,
        task_filter: ep.TaskFilter = "current",
        limit: int | None = None,
        cursor: str | None = None,
        environment_id: str | None = None,
    ) -> TaskListPage:
        """One page of tasks; ``cursor`` of the answer fetches the next."""
        return self._call(
            ep.list_tasks(
                task_filter=task_filter, limit=limit, cursor=cursor, environment_id=environment_id
            )
        )

    def iter_tasks(
        self,
        *,
        task_filter: ep.TaskFilter = "current",
        environment_id: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[TaskListItem]:
        """Every task, following cursors page by page."""
        cursor: str | None = None
        while True:
            page = self.list_tasks(
                task_filter=task_filter,
                limit=page_size,
                cursor=cursor,
                environment_id=environment_id,
            )
            yield from page.items
            if not page.cursor or not page.items:
                return
            cursor = page.cursor

    def task_feed(self, *, limit: int | None = None, cursor: str | None = None) -> TaskFeedPage:
        """``GET tasks``: tasks with their current attempt."""
        return self._call(ep.task_feed(limit=limit, cursor=cursor))

    def task_rate_limit(self) -> TaskRateLimit:
        return self._call(ep.task_rate_limit())

    def get_task(self, task_id: str) -> TaskDetails:
        return self._call(ep.get_task(task_id))

    def turns(self, task_id: str) -> TurnMapping:
        return self._call(ep.turns(task_id))

    def get_turn(self, task_id: str, turn_id: str) -> TurnResponse:
        return self._call(ep.get_turn(task_id, turn_id))

    def attempts(self, task_id: str) -> list[AssistantTurn]:
        """Every attempt of the current user turn, in the Codex CLI's order."""
        return self._run(ep.attempts_op(task_id))[1]

    def turn_diff(self, task_id: str, turn_id: str, repo_id: str | None = None) -> str:
        """An attempt's whole diff by turn id (openwham: details cut big diffs); ``repo_id``:
        one repository's of a multi-repository attempt."""
        return self._call(ep.turn_diff(task_id, turn_id, repo_id))

    def turn_logs(self, task_id: str, turn_id: str) -> TurnLogsResponse:
        return self._call(ep.turn_logs(task_id, turn_id))

    def task_logs(self, task_id: str) -> TaskLogsResponse:
        return self._call(ep.task_logs(task_id))

    def wait(self, task_id: str, *, poll: float = 1.0, timeout: float | None = None) -> TaskDetails:
        """Block until every attempt of the current user turn has finished."""
        return self._run(ep.wait_op(task_id, poll=poll, timeout=timeout))

    def stream(
        self, task_id: str, turn_id: str | None = None, *, last_event_id: str | None = None
    ) -> Iterator[StreamEvent]:
        """The attempt's live events (default: the current attempt) until it finishes,
        reconnecting with ``Last-Event-ID`` when the connection breaks."""
        if turn_id is None:
            turn_id = self._run(ep.attempt_turn_op(task_id, 1)).id
            assert turn_id is not None
        reader = StreamReader(last_event_id=last_event_id)
        path = ep.stream_path(task_id, turn_id)
        while True:
            try:
                with self._http.stream(
                    "GET", path, headers=reader.headers(), timeout=STREAM_TIMEOUT
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise api_error(response)
                    for line in response.iter_lines():
                        if (event := reader.feed(line)) is not None:
                            yield event
                    if (event := reader.end_of_body()) is not None:
                        yield event
            except httpx.TransportError as e:
                if not reader.should_reconnect():
                    raise TransportError(f"the event stream of {turn_id} broke: {e}") from e
                self._sleep(reader.backoff())
                continue
            if not reader.should_reconnect():
                return
            self._sleep(reader.backoff())

    def diff(self, task_id: str, *, attempt: int = 1, repository: str | None = None) -> str:
        """The whole unified diff of attempt ``attempt`` (1-based), fetched from the diff
        endpoint when the details carry it cut (``truncated``); ``repository``: that one's
        of a multi-repository attempt (name, ``owner/name`` or key), else the first's."""
        return self._run(ep.diff_op(task_id, attempt, repository))

    def apply(
        self,
        task_id: str,
        repo: str | Path = ".",
        *,
        attempt: int = 1,
        check: bool = False,
        git_config: tuple[str, ...] = (),
        repository: str | None = None,
    ) -> ApplyResult:
        """Apply an attempt's diff to the git checkout at ``repo`` (``git apply --3way``,
        after a preflight); ``check`` only runs the preflight. ``repository``: that one's
        diff of a multi-repository attempt (:meth:`diff`)."""
        diff = self.diff(task_id, attempt=attempt, repository=repository)
        return apply_diff(diff, Path(repo), check=check, git_config=git_config)

    def cancel(self, task_id: str, turn_id: str | None = None) -> CancelResponse:
        """Cancel the task's queued and running attempts (or one attempt). A finished task is
        no error: ``cancelled_turn_ids`` is then empty (``None`` from chatgpt.com)."""
        if turn_id is not None:
            return self._call(ep.cancel_turn(task_id, turn_id))
        return self._call(ep.cancel(task_id))

    def archive(self, task_id: str) -> bool:
        return self._call(ep.task_action(task_id, "archive"))

    def unarchive(self, task_id: str) -> bool:
        return self._call(ep.task_action(task_id, "unarchive"))

    def mark_read(self, task_id: str) -> bool:
        return self._call(ep.task_action(task_id, "mark_read"))

    def recover(self, task_id: str) -> bool:
        """Run the failed or cancelled attempts of the latest turn again (openwham)."""
        return self._call(ep.task_action(task_id, "recover"))

    def delete_task(self, task_id: str) -> bool:
        return self._call(ep.delete_task(task_id))

    def fork(self, task_id: str, turn_id: str | None = None) -> TaskDetails:
        """A new task continuing from a completed attempt (openwham)."""
        return self._call(ep.fork(task_id, turn_id))

    def create_pr(
        self,
        task_id: str,
        *,
        attempt: int = 1,
        draft: bool = False,
        authorship: str | None = None,
    ) -> ExternalPullRequest:
        """Push attempt ``attempt``'s change to a branch of the environment's remote; with a
        forge connection for it (openwham) the pull request is opened there too."""
        return self._run(ep.pr_op(task_id, attempt, draft=draft, authorship=authorship))

    # ------------------------------------------------------------------ environments

    def list_environments(self) -> list[Environment]:
        return self._call(ep.list_environments())

    def recent_environments(self) -> list[Environment]:
        return self._call(ep.recent_environments())

    def machines(self) -> list[Machine]:
        return self._call(ep.machines())

    def get_environment(self, env_id: str) -> Environment:
        return self._call(ep.get_environment(env_id))

    def resolve_environment(
        self, label: str | None = None, *, repo: str | Path | None = "."
    ) -> Environment:
        """An environment by id or label, else the one the checkout at ``repo`` belongs to."""
        return self._run(resolve_op(Path(repo) if repo is not None else None, label))

    def create_environment(self, body: dict[str, Any]) -> Environment:
        """Create an environment (openwham's ``EnvironmentCreate`` body)."""
        return self._call(ep.create_environment(body))

    def update_environment(self, env_id: str, changes: dict[str, Any]) -> Environment:
        """Change only the given fields (``secrets`` merge; a ``None`` secret is removed)."""
        return self._call(ep.update_environment(env_id, changes))

    def delete_environment(self, env_id: str) -> bool:
        return self._call(ep.delete_environment(env_id))

    # ------------------------------------------------------------------ account

    def usage(self) -> RateLimitStatusPayload:
        return self._call(ep.usage())

    def settings(self) -> UserSettings:
        return self._call(ep.get_settings())

    def update_settings(self, changes: dict[str, Any]) -> UserSettings:
        return self._call(ep.update_settings(changes))

    def list_forge_connections(self) -> ForgeConnectionList:
        """The account's forge connections (openwham only; tokens are never shown)."""
        return self._call(ep.list_forge_connections())

    def create_forge_connection(self, body: dict[str, Any]) -> ForgeConnectionInfo:
        """Connect GitHub, GitLab or Gitea for pull requests (openwham only)."""
        return self._call(ep.create_forge_connection(body))

    def delete_forge_connection(self, connection_id: str) -> bool:
        return self._call(ep.delete_forge_connection(connection_id))

    def list_git_credentials(self) -> GitCredentialList:
        """The account's git credentials for private remotes (openwham only; never a
        secret or key)."""
        return self._call(ep.list_git_credentials())

    def create_git_credential(self, body: dict[str, Any]) -> GitCredentialInfo:
        """Add a credential host git uses for repository URLs under ``url_prefix``."""
        return self._call(ep.create_git_credential(body))

    def delete_git_credential(self, credential_id: str) -> bool:
        return self._call(ep.delete_git_credential(credential_id))

    def list_tokens(self) -> ApiTokenList:
        """The caller's API tokens that are not revoked, newest first (openwham only)."""
        return self._call(ep.list_tokens())

    def create_token(
        self, *, name: str | None = None, expires_in_days: float | None = None
    ) -> ApiTokenCreated:
        """A new API token (``.token`` is the secret, shown this once)."""
        return self._call(ep.create_token(name=name, expires_in_days=expires_in_days))

    def revoke_token(self, token_id: str) -> ApiTokenInfo:
        """Revoke one of the caller's tokens; every server node refuses it from now on."""
        return self._call(ep.revoke_token(token_id))

    def get(self, path: str, model: Any) -> Any:
        """Any other read (e.g. ``"github/installations"``), parsed into ``model``."""
        return self._call(ep.get(path, model))
