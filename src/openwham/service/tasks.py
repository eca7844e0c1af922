"""Tasks and turns: creation (new task, follow-up), listing, details, actions and rendering."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import time
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import (
    Connection,
    Float,
    Text,
    and_,
    bindparam,
    cast,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session, defer

from openwham import ids
from openwham.config import Settings
from openwham.store import events, turnstate
from openwham.store import models as m
from openwham.store.status import ACTIVE, TurnStatus
from openwham.wire import (
    AssistantTurn,
    CreateTaskRequest,
    DenormalizedMetadata,
    DiffStats,
    Environment,
    LatestEvent,
    LatestTurnStatusDisplay,
    MessageInputItem,
    OutputDiffItem,
    PreApplyPatchInputItem,
    PrOutputItem,
    SiblingTurnsResponse,
    Task,
    TaskDetails,
    TaskFeedItem,
    TaskFeedPage,
    TaskListItem,
    TaskListPage,
    TaskRateLimit,
    TaskStatusDisplay,
    TextFragment,
    TurnMapping,
    TurnMappingEntry,
    UserTurn,
    Worklog,
)

from . import accounts, environments, usage
from .accounts import Principal
from .diffs import (
    diff_stats,
    inline_input_items,
    inline_output_items,
    inline_repo_diffs,
    looks_like_unified_diff,
    output_diff,
    starting_patch,
)
from .errors import BadRequest, Conflict, NotFound, PayloadTooLarge
from .rendercache import RenderCache, digest
from .repos import validate_branch_name
from .text import shorten

MAX_PROMPT_CHARS = 200_000
MAX_PATCH_BYTES = 5 * 1024 * 1024
MAX_INPUT_ITEMS = 50
MAX_BEST_OF_N = 4
MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20
TASK_FILTERS = ("current", "all", "archived")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
MODES = ("follow_up", "new_task", "review_fix")
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")


# --------------------------------------------------------------------------- validation


@dataclass
class ParsedInput:
    """The validated input items of a create request, in their stored form."""

    prompt: str
    items: list[dict[str, Any]] = field(default_factory=list)


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def parse_create_request(raw: Any) -> CreateTaskRequest:
    """Check the body in the production server's order and words, then parse it."""
    if isinstance(raw, bytes | str):
        raise BadRequest("Request body must be JSON (Content-Type: application/json)")
    if not isinstance(raw, dict):
        raise BadRequest("Request body must be a JSON object")
    if raw.get("input_items") is None:
        raise BadRequest("Missing input_items")
    present = [k for k in MODES if raw.get(k) is not None]
    if not present:
        raise BadRequest("Must specify one of: follow_up, new_task, review_fix")
    for key in present:
        if not isinstance(raw[key], dict):
            raise BadRequest(f"{key} should be object/dict")
    if len(present) > 1:
        raise BadRequest("Specify only one of: follow_up, new_task, review_fix")
    if "review_fix" in present:
        raise BadRequest("review_fix is not supported by this server")
    if not isinstance(raw["input_items"], list):
        raise BadRequest("input_items should be a list")
    try:
        return CreateTaskRequest.model_validate(raw)
    except ValidationError as exc:
        raise BadRequest(f"Invalid request: {_pydantic_message(exc)}") from exc


def _fragment_text(fragment: Any) -> str | None:
    if isinstance(fragment, str):
        return fragment
    if isinstance(fragment, TextFragment):
        return fragment.text
    return None


def parse_input_items(raw_items: list[Any], req_items: list[Any]) -> ParsedInput:
    """Prompt text and stored input items; rejects what the agent could not use."""
    if not raw_items:
        raise BadRequest("input_items must contain a message")
    if len(raw_items) > MAX_INPUT_ITEMS:
        raise BadRequest(f"At most {MAX_INPUT_ITEMS} input items are allowed")
    texts: list[str] = []
    stored: list[dict[str, Any]] = []
    patches = 0
    for raw, item in zip(raw_items, req_items, strict=True):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if isinstance(item, MessageInputItem):
            if item.role not in (None, "user"):
                raise BadRequest("Input messages must have role 'user'")
            for frag in item.content:
                text = _fragment_text(frag)
                if text is not None:
                    texts.append(text)
            stored.append(
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        f if isinstance(f, str) else f.model_dump(mode="json") for f in item.content
                    ],
                }
            )
        elif isinstance(item, PreApplyPatchInputItem):
            patches += 1
            if patches > 1:
                raise BadRequest("At most one pre_apply_patch input item is allowed")
            diff = item.output_diff.diff
            if not isinstance(diff, str) or not diff.strip():
                raise BadRequest("pre_apply_patch needs output_diff.diff with a unified diff")
            if len(diff.encode()) > MAX_PATCH_BYTES:
                raise PayloadTooLarge(
                    f"pre_apply_patch diff is larger than {MAX_PATCH_BYTES} bytes"
                )
            if not looks_like_unified_diff(diff):
                raise BadRequest("pre_apply_patch output_diff.diff is not a unified git diff")
            stats = diff_stats(diff)
            stored.append(
                {
                    "type": "pre_apply_patch",
                    "output_diff": {
                        "type": "output_diff",
                        "repo_id": None,
                        "base_commit_sha": None,
                        "preapply_patch_base_commit_sha": None,
                        "diff": diff,
                        "external_storage_diff": None,
                        "files_modified": stats.files_modified,
                        "lines_added": stats.lines_added,
                        "lines_removed": stats.lines_removed,
                        "commit_message": None,
                    },
                }
            )
        else:
            raise BadRequest(f"Unsupported input item type: {kind!r}")
    prompt = "\n\n".join(t for t in texts if t)
    if not prompt.strip():
        raise BadRequest("The prompt is empty: add a message input item with text")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PayloadTooLarge(f"The prompt is longer than {MAX_PROMPT_CHARS} characters")
    return ParsedInput(prompt=prompt, items=stored)


def _best_of_n(raw: dict[str, Any]) -> int:
    meta = raw.get("metadata")
    if meta is None:
        return 1
    if not isinstance(meta, dict):
        raise BadRequest("metadata should be object/dict")
    n = meta.get("best_of_n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BEST_OF_N:
        raise BadRequest(f"metadata.best_of_n must be an integer from 1 to {MAX_BEST_OF_N}")
    return n


def _title(prompt: str) -> str:
    """The title until the engine writes the generated one: the prompt's first line."""
    line = next((x.strip() for x in prompt.splitlines() if x.strip()), "New task")
    return shorten(line, 80)


# --------------------------------------------------------------------------- creation


@dataclass
class RunOptions:
    """Per-attempt choices the engine reads from the assistant turn's private part."""

    qa_mode: bool
    model: str
    reasoning_effort: str | None


def _run_options(settings: Settings, spec: dict[str, Any]) -> RunOptions:
    model = spec.get("model")
    if model is not None and (not isinstance(model, str) or not _MODEL_RE.match(model)):
        raise BadRequest("model must be a model slug such as 'gpt-5.1-codex'")
    effort = spec.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise BadRequest(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}")
    qa = spec.get("run_environment_in_qa_mode", False)
    if qa is None:
        qa = False
    if not isinstance(qa, bool):
        raise BadRequest("run_environment_in_qa_mode must be a boolean")
    return RunOptions(qa_mode=qa, model=model or settings.model, reasoning_effort=effort)


def _snapshot(db: Session, env: m.Environment, *, new_tasks: int) -> Environment:
    """The environment as an attempt records it (its task count with ``new_tasks`` more)."""
    count = environments.task_counts(db, [env.id]).get(env.id, 0)
    return environments.render(env, count + new_tasks)


def _new_turns(
    s: Session,
    task: m.Task,
    env_id: str,
    parsed: ParsedInput,
    options: RunOptions,
    previous_turn_id: str | None,
    n: int,
    snapshot: Environment,
    now: float,
) -> tuple[m.Turn, list[m.Turn]]:
    """The user turn and ``n`` attempts, added to ``s`` (the task's current turns set, the
    environment's last use written); ``snapshot``: the environment as the attempts record
    it (read and rendered before the write)."""
    user = m.Turn(
        id=ids.new_user_turn_id(task.id),
        task_id=task.id,
        role="user",
        parent_id=previous_turn_id,
        attempt_placement=None,
        discarded=False,
        viewed=True,
        body={"input_items": parsed.items, "user_model_slug": options.model},
        created_at=now,
        updated_at=now,
    )
    s.add(user)
    environment = snapshot.model_dump(mode="json")
    attempts = []
    for placement in range(n):
        turn = turnstate.new_attempt(
            id=ids.new_assistant_turn_id(task.id),
            task_id=task.id,
            parent_id=user.id,
            attempt_placement=placement,
            discarded=False,
            viewed=False,
            body={
                "output_items": [],
                "worklog": {"messages": []},
                "error": None,
                "latest_event": None,
                "conversation_id": None,
                "pull_request_status": "not_created",
                "pull_request_data": None,
                "internal_only_rollouts": None,
                "environment_id": env_id,
                "environment": environment,
                "branch": task.branch,
                "base_commit_sha": None,
                "logs": None,
                "proxy_events": None,
                "debug_metadata": None,
                "run": {
                    "qa_mode": options.qa_mode,
                    "model": options.model,
                    "reasoning_effort": options.reasoning_effort,
                },
            },
            created_at=now,
            updated_at=now,
        )
        s.add(turn)
        attempts.append(turn)
    task.current_user_turn_id = user.id
    task.current_turn_id = attempts[0].id
    task.updated_at = now
    s.execute(
        update(m.Environment)
        .where(m.Environment.id == env_id)
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    return user, attempts


class BranchLookup(Protocol):
    """Whether a branch exists in a repository (``engine.branches.branch_exists``: git is the
    engine's). Raises a ``ServiceError`` (400) when the repository cannot be reached."""

    def __call__(self, repo_key: str, url: str, branch: str) -> bool: ...


def _check_branch(lookup: BranchLookup | None, env_body: dict[str, Any], branch: str) -> None:
    """Refuse a branch none of the environment's repositories has, naming it and them. One
    that some have is fine: the others start from their default branch (engine.claim), which
    is how an environment of several repositories works on a branch of one of them."""
    repos = [str(key) for key in env_body.get("repos") or []]
    if lookup is None:
        return
    names = []
    for key in repos:
        url = environments.repo_url(env_body, key)
        if not url or lookup(key, url, branch):
            return  # (a repository without a URL cannot be asked: not refused, as before)
        names.append(str(environments.repo_info(env_body, key).get("repository_full_name") or url))
    if len(names) == 1:
        raise BadRequest(f"Branch {branch!r} not found in {names[0]}")
    if names:
        raise BadRequest(f"Branch {branch!r} not found in any of {', '.join(names)}")


@dataclass
class Written:
    """The rows a create wrote (loaded; after the commit detached, or in the caller's
    session)."""

    task: m.Task
    user: m.Turn
    attempts: list[m.Turn]

    @property
    def attempt_ids(self) -> list[str]:
        return [t.id for t in self.attempts]


@dataclass
class Creation:
    """``POST tasks`` read and checked, nothing written yet (:func:`prepare`): ``write`` then
    writes the task (or the follow-up), its turns and usage in one transaction. On SQLite
    that is a job of the database's one writer thread (``store.groupcommit``), sharing its
    transaction with other writes: the write lock is held for the rate limit's check and
    the inserts only, never through a request thread's reads, git or rendering."""

    settings: Settings
    principal: Principal
    parsed: ParsedInput
    options: RunOptions
    n: int
    env_id: str
    env_label: str
    snapshot: Environment
    #: a new task on this branch, else a follow-up of ``task_id`` after ``previous_id``
    branch: str | None = None
    task_id: str | None = None
    previous_id: str | None = None

    def write(self, s: Session) -> Written:
        """The writes, in ``s``'s transaction (flushed, not committed): 429 when the rate
        limit would be exceeded (the account locked first: concurrent creators of one
        account count in turn), 404/409 when a follow-up's task went meanwhile."""
        usage.check(s, self.settings, self.principal, self.n)
        now = time.time()
        if self.task_id is None:
            task = m.Task(
                id=ids.new_task_id(),
                account_id=self.principal.account_id,
                user_id=self.principal.user_id,
                environment_id=self.env_id,
                title=_title(self.parsed.prompt),
                has_generated_title=False,
                archived=False,
                has_unread_turn=False,
                branch=self.branch,
                num_follow_ups=0,
                body={"environment_label": self.env_label, "external_pull_requests": []},
                created_at=now,
                updated_at=now,
            )
            s.add(task)
        else:
            task = get_task_row(s, self.principal, self.task_id)
            if task.environment_id != self.env_id:
                raise Conflict("The environment of this task was deleted")
            task.num_follow_ups += 1
        user, attempts = _new_turns(
            s,
            task,
            self.env_id,
            self.parsed,
            self.options,
            self.previous_id,
            self.n,
            self.snapshot,
            now,
        )
        usage.record(s, self.principal, task.id, [t.id for t in attempts])
        s.flush()
        return Written(task, user, attempts)


@dataclass
class Created:
    """The task ``POST tasks`` created (or continued), the attempts it queued, and its
    response, rendered on first use: after the commit, so that the write transaction (on
    SQLite the database's one write lock, which 32 tasks posted at once held in turn for
    ~190 ms each) does not last through the rate limit's read and the rendering."""

    task_id: str
    attempt_ids: list[str]
    render: Callable[[], dict[str, Any]]
    _response: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def response(self) -> dict[str, Any]:
        if self._response is None:
            self._response = self.render()
        return self._response


def prepare(
    db: Session,
    settings: Settings,
    principal: Principal,
    raw: Any,
    *,
    branch_lookup: BranchLookup | None = None,
) -> Creation:
    """``POST tasks`` before its write: validate everything (4xx), with ``branch_lookup``
    that the branch exists (git on the mirror, else the remote), and read what the attempts
    record; nothing is written (``Creation.write`` does, then :func:`created`)."""
    req = parse_create_request(raw)
    parsed = parse_input_items(raw["input_items"], req.input_items)
    n = _best_of_n(raw)
    if req.new_task is not None:
        spec = raw["new_task"]
        env_id = spec.get("environment_id")
        if not isinstance(env_id, str) or not env_id:
            raise BadRequest("new_task.environment_id is required")
        env = environments.get_row(db, principal, env_id)
        environments.check_repo_paths(db, env, settings)  # it may have changed since
        branch = spec.get("branch")
        if branch is not None and not isinstance(branch, str):
            raise BadRequest("new_task.branch must be a string")
        if not branch:
            first = (env.body.get("repos") or [None])[0]
            info = (env.body.get("repo_map") or {}).get(first) or {}
            branch = info.get("default_branch") or "main"
        validate_branch_name(branch)
        options = _run_options(settings, spec)
        _check_branch(branch_lookup, env.body, branch)
        snapshot = _snapshot(db, env, new_tasks=1)  # with this new task counted
        return Creation(
            settings, principal, parsed, options, n, env.id, env.label, snapshot, branch=branch
        )
    spec = raw["follow_up"]
    task, previous = _follow_up_target(db, principal, spec)
    if task.environment_id is None:
        raise Conflict("The environment of this task was deleted")
    env = environments.get_row(db, principal, task.environment_id)
    environments.check_repo_paths(db, env, settings)
    options = _run_options(settings, spec)
    if task.branch:  # a follow-up's clone starts from the task's branch
        _check_branch(branch_lookup, env.body, task.branch)
    snapshot = _snapshot(db, env, new_tasks=0)
    return Creation(
        settings,
        principal,
        parsed,
        options,
        n,
        env.id,
        env.label,
        snapshot,
        task_id=task.id,
        previous_id=previous.id,
    )


def created(db: Session, creation: Creation, written: Written) -> Created:
    """The answer to a committed create; its rate limit read in ``db`` when it is rendered,
    the rows rendered as written."""
    turns = {t.id: t for t in (written.user, *written.attempts)}
    ctx = _Context.of(turns, {creation.env_id: creation.env_label})
    task, user, first = written.task, written.user, written.attempts[0]

    def render() -> dict[str, Any]:
        rate = usage.task_rate_limit(db, creation.settings, creation.principal)
        return {
            "task": render_task(task, ctx).model_dump(mode="json"),
            "user_turn": render_user_turn(user).model_dump(mode="json"),
            "turn": render_assistant_turn(first, ctx).model_dump(mode="json"),
            "rate_limit": _embedded_rate_limit(rate),
        }

    return Created(task.id, written.attempt_ids, render)


def _embedded_rate_limit(rate: TaskRateLimit) -> dict[str, Any]:
    """The ``rate_limit`` of a create response is ``tasks/rate_limit`` without ``windows``."""
    data = rate.model_dump(mode="json")
    data.pop("windows", None)
    return data


def _follow_up_target(
    db: Session, principal: Principal, spec: dict[str, Any]
) -> tuple[m.Task, m.Turn]:
    task_id = spec.get("task_id")
    turn_id = spec.get("turn_id", spec.get("previous_turn_id"))
    if not isinstance(task_id, str) or not task_id:
        raise BadRequest("follow_up.task_id is required")
    if not isinstance(turn_id, str) or not turn_id:
        raise BadRequest("follow_up.turn_id (or previous_turn_id) is required")
    task = get_task_row(db, principal, task_id)
    turn = db.get(m.Turn, turn_id) if len(turn_id) <= 200 else None
    if turn is None or turn.task_id != task.id:
        raise NotFound("Turn not found in this task")
    if turn.role != "assistant":
        raise BadRequest("follow_up.turn_id must name an assistant turn")
    if turn.turn_status in ACTIVE:
        raise Conflict(
            f"Turn is still {turn.turn_status}; wait until it finishes or cancel it first"
        )
    if turn.turn_status != TurnStatus.COMPLETED:
        raise Conflict(
            f"Turn {turn.turn_status}: it left no result to continue from; follow up on a "
            "completed attempt"
        )
    return task, turn


# --------------------------------------------------------------------------- loading


def get_task_row(db: Session, principal: Principal, task_id: str) -> m.Task:
    task = db.get(m.Task, task_id) if len(task_id) <= 200 else None
    if task is None or task.account_id != principal.account_id:
        raise NotFound("Task not found")
    return task


def get_turn_row(db: Session, task: m.Task, turn_id: str) -> m.Turn:
    turn = db.get(m.Turn, turn_id) if len(turn_id) <= 200 else None
    if turn is None or turn.task_id != task.id:
        raise NotFound("Turn not found")
    return turn


@dataclass
class _Context:
    """Turns and labels needed to render a set of tasks without N+1 queries."""

    turns: dict[str, m.Turn]
    labels: dict[str, str]
    by_parent: dict[str | None, list[m.Turn]]

    @classmethod
    def load(
        cls, db: Session, tasks: list[m.Task], *, all_turns: bool = False, bodies: bool = True
    ) -> _Context:
        """``bodies=False`` (lists) leaves the turns' JSON bodies in the database: a body can
        hold a diff of many MB, and a list needs only columns (reading one raises)."""
        turns: dict[str, m.Turn] = {}
        if tasks:
            if all_turns:
                q = select(m.Turn).where(m.Turn.task_id.in_([t.id for t in tasks]))
            else:
                current = [t.current_turn_id for t in tasks if t.current_turn_id]
                users = [t.current_user_turn_id for t in tasks if t.current_user_turn_id]
                parents = select(m.Turn.parent_id).where(m.Turn.id.in_(current))
                q = select(m.Turn).where(
                    or_(
                        m.Turn.id.in_(current + users),
                        m.Turn.parent_id.in_(parents),
                    )
                )
            if not bodies:
                q = q.options(defer(m.Turn.body, raiseload=True))
            turns = {t.id: t for t in db.scalars(q)}
        env_ids = {t.environment_id for t in tasks if t.environment_id}
        labels: dict[str, str] = {}
        if env_ids:
            rows = db.execute(
                select(m.Environment.id, m.Environment.label).where(m.Environment.id.in_(env_ids))
            )
            labels = {str(i): str(label) for i, label in rows}
        return cls.of(turns, labels)

    @classmethod
    def of(cls, turns: dict[str, m.Turn], labels: dict[str, str]) -> _Context:
        by_parent: dict[str | None, list[m.Turn]] = {}
        for t in sorted(turns.values(), key=lambda t: (t.created_at, t.attempt_placement or 0)):
            by_parent.setdefault(t.parent_id, []).append(t)
        return cls(turns=turns, labels=labels, by_parent=by_parent)

    def siblings(self, turn: m.Turn) -> list[m.Turn]:
        return [
            t
            for t in self.by_parent.get(turn.parent_id, [])
            if t.role == "assistant" and t.id != turn.id
        ]

    def children(self, turn: m.Turn) -> list[m.Turn]:
        return self.by_parent.get(turn.id, [])


# --------------------------------------------------------------------------- rendering


def _turn_diff(turn: m.Turn | None) -> dict[str, Any] | None:
    return None if turn is None else output_diff(turn.body.get("output_items"))


def _stats_of(turn: m.Turn | None) -> DiffStats | None:
    """The diff's stats from the turn's columns (lists never load the body with the diff)."""
    if turn is None or not turn.has_diff:
        return None
    return DiffStats(
        files_modified=turn.diff_files_modified,
        lines_added=turn.diff_lines_added,
        lines_removed=turn.diff_lines_removed,
    )


def render_user_turn(turn: m.Turn, inline_diff: int | None = None) -> UserTurn:
    """A prompt as the API answers it; a starting patch (``pre_apply_patch``) is cut to
    ``inline_diff`` bytes like an attempt's diff (``render_assistant_turn``)."""
    return UserTurn.model_validate(
        {
            "type": "user",
            "id": turn.id,
            "role": "user",
            "input_items": inline_input_items(turn.body.get("input_items") or [], inline_diff),
            "user_model_slug": turn.body.get("user_model_slug"),
            "previous_turn_id": turn.parent_id,
            "created_at": turn.created_at,
        }
    )


_ASSISTANT_BODY_FIELDS = (
    "output_items",
    "worklog",
    "error",
    "latest_event",
    "conversation_id",
    "pull_request_status",
    "pull_request_data",
    "internal_only_rollouts",
    "environment_id",
    "environment",
    "branch",
    "base_commit_sha",
    "logs",
    "proxy_events",
    "setup_cache",
    "repo_diffs",
    "debug_metadata",
)


def render_assistant_turn(
    turn: m.Turn, ctx: _Context, inline_diff: int | None = None
) -> AssistantTurn:
    """An attempt as the API answers it; its diff cut to ``inline_diff`` bytes (``None``:
    whole, ``0``: none) with ``truncated: true`` when cut (``service.diffs.truncate_diff``)."""
    data: dict[str, Any] = {k: turn.body.get(k) for k in _ASSISTANT_BODY_FIELDS}
    data["output_items"] = inline_output_items(data["output_items"] or [], inline_diff)
    if isinstance(data["repo_diffs"], dict):  # a multi-repository attempt's
        data["repo_diffs"] = inline_repo_diffs(data["repo_diffs"], inline_diff)
    else:
        del data["repo_diffs"]  # absent, not null: single-repository turns keep their shape
    data["worklog"] = data["worklog"] or {"messages": []}
    data["pull_request_status"] = data["pull_request_status"] or "not_created"
    data.update(
        {
            "type": "assistant",
            "id": turn.id,
            "role": "assistant",
            "attempt_placement": turn.attempt_placement or 0,
            "sibling_turn_ids": [t.id for t in ctx.siblings(turn)],
            "child_turns": [t.id for t in ctx.children(turn)],
            "turn_status": turn.turn_status,
            "created_at": turn.created_at,
            "previous_turn_id": turn.parent_id,
            "discarded": turn.discarded,
        }
    )
    return AssistantTurn.model_validate(data)


def _status_display(task: m.Task, ctx: _Context) -> TaskStatusDisplay:
    turn = ctx.turns.get(task.current_turn_id or "")
    latest = None
    if turn is not None:
        latest = LatestTurnStatusDisplay(
            turn_id=turn.id,
            turn_status=turn.turn_status or "pending",
            diff_stats=_stats_of(turn),
            sibling_turn_ids=[t.id for t in ctx.siblings(turn)],
            image_asset_pointer_citations=None,
            created_at=turn.created_at,
            updated_at=turn.updated_at,
        )
    return TaskStatusDisplay(
        environment_label=ctx.labels.get(task.environment_id or "")
        or task.body.get("environment_label"),
        branch_name=task.branch,
        latest_turn_status_display=latest,
    )


def _metadata(task: m.Task, ctx: _Context) -> DenormalizedMetadata:
    turn = ctx.turns.get(task.current_turn_id or "")
    user = ctx.turns.get(task.current_user_turn_id or "")
    env = (turn.body.get("environment") if turn else None) or {}
    repo_map = env.get("repo_map") or {}
    stats = _stats_of(turn) or DiffStats(files_modified=None, lines_added=None, lines_removed=None)
    return DenormalizedMetadata(
        num_follow_ups=task.num_follow_ups,
        repo_name_map={k: v.get("repository_full_name") for k, v in repo_map.items()},
        last_user_turn_created_at=user.created_at if user else None,
        last_turn_status=turn.turn_status if turn else None,
        diff_stats=stats,
        last_pushed_turn_id=task.body.get("last_pushed_turn_id"),
        start_branch_name=task.branch,
        pushed_branch_name=task.body.get("pushed_branch_name"),
        cached_pull_request_data=None,
    )


def render_task(task: m.Task, ctx: _Context) -> Task:
    return Task(
        id=task.id,
        title=task.title,
        created_at=task.created_at,
        updated_at=task.updated_at,
        has_generated_title=task.has_generated_title,
        current_turn_id=task.current_turn_id,
        has_unread_turn=task.has_unread_turn,
        denormalized_metadata=_metadata(task, ctx),
        archived=task.archived,
        external_pull_requests=task.body.get("external_pull_requests") or [],
        environment_id=task.environment_id,
        is_review=False,
        task_status_display=_status_display(task, ctx),
    )


def render_list_item(task: m.Task, ctx: _Context) -> TaskListItem:
    return TaskListItem(
        id=task.id,
        title=task.title,
        has_generated_title=task.has_generated_title,
        updated_at=task.updated_at,
        created_at=task.created_at,
        task_status_display=_status_display(task, ctx),
        archived=task.archived,
        has_unread_turn=task.has_unread_turn,
        pull_requests=[
            pr for pr in task.body.get("external_pull_requests") or [] if not _branch_only(pr)
        ],
    )


def _branch_only(entry: Any) -> bool:
    """A pushed branch with no pull request opened on a hosting service (``state``
    ``"pushed"``, ``number`` 0). The task keeps it in ``external_pull_requests``; lists leave it
    out of ``pull_requests``, because Codex's ``codex cloud`` TUI takes a task with any list
    ``pull_requests`` for a code-review task and hides it."""
    pr = entry.get("pull_request") if isinstance(entry, dict) else None
    return isinstance(pr, dict) and pr.get("state") == "pushed"


# --------------------------------------------------------------------------- queries


_TASK_COLUMNS = [c for c in m.Task.__table__.c if c.key != "body"]
_TURN_COLUMNS = [c for c in m.Turn.__table__.c if c.key != "body"]
_TASK_KEYS = (*(c.key for c in _TASK_COLUMNS), "env_label", "body")
_TURN_KEYS = (*(c.key for c in _TURN_COLUMNS), "body")


def _json_text(column: Any) -> Any:
    """A JSON column as the text the database holds (parsed only on a cache miss)."""
    return cast(column, Text).label("body")


def _encode_cursor(task: Any) -> str:
    """From a task's ``created_at`` and ``id`` (an ORM object or a Core row)."""
    raw = json.dumps([task.created_at, task.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, task_id = json.loads(raw)
        if isinstance(created, bool) or not isinstance(created, int | float):
            raise ValueError
        if not math.isfinite(created):
            raise ValueError
        # Ids are ASCII: anything else (NUL, surrogates) could not even be sent to the database.
        if not isinstance(task_id, str) or not task_id.isascii() or "\x00" in task_id:
            raise ValueError
        if len(task_id) > 200:
            raise ValueError
        return float(created), task_id
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadRequest("Invalid cursor: pass back the cursor of a previous page") from exc


@dataclass
class _Page:
    rows: list[m.Task]
    cursor: str | None
    ctx: _Context


def _page(
    db: Session,
    principal: Principal,
    *,
    limit: int | None,
    task_filter: str | None,
    environment_id: str | None,
    cursor: str | None,
    bodies: bool,
) -> _Page:
    """Newest first, keyset-paginated on (created_at, id) so pages never skip or repeat."""
    size, shape, params = _page_where(
        principal.account_id, limit, task_filter, environment_id, cursor
    )
    q = select(m.Task).where(*_page_conditions(shape))
    q = q.order_by(m.Task.created_at.desc(), m.Task.id.desc()).limit(bindparam("size"))
    rows = list(db.scalars(q, params))
    more = len(rows) > size
    rows = rows[:size]
    cursor_out = _encode_cursor(rows[-1]) if more and rows else None
    return _Page(rows, cursor_out, _Context.load(db, rows, bodies=bodies))


def _page_where(
    account_id: str | None,
    limit: int | None,
    task_filter: str | None,
    environment_id: str | None,
    cursor: str | None,
) -> tuple[int, tuple[str, bool, bool], dict[str, Any]]:
    """The page size, the shape of a page's conditions (``_page_conditions``) and their
    parameters, for a page of the account's tasks (None: the statement names it)."""
    size = DEFAULT_LIST_LIMIT if limit is None else limit
    if not 1 <= size <= MAX_LIST_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}")
    filt = task_filter or "current"
    if filt not in TASK_FILTERS:
        raise BadRequest(f"task_filter must be one of: {', '.join(TASK_FILTERS)}")
    params: dict[str, Any] = {"size": size + 1}
    if account_id is not None:
        params["account_id"] = account_id
    if environment_id:
        params["environment_id"] = environment_id
    if cursor:
        params["created"], params["after_id"] = _decode_cursor(cursor)
    return size, (filt, bool(environment_id), bool(cursor)), params


def _page_conditions(shape: tuple[str, bool, bool], account: Any = None) -> list[Any]:
    """``account``: the account's id as an expression (default: the ``account_id``
    parameter)."""
    filt, by_environment, after_cursor = shape
    where: list[Any] = [
        m.Task.account_id == (bindparam("account_id") if account is None else account)
    ]
    if filt == "current":
        where.append(m.Task.archived.is_(False))
    elif filt == "archived":
        where.append(m.Task.archived.is_(True))
    if by_environment:
        where.append(m.Task.environment_id == bindparam("environment_id"))
    if after_cursor:
        created = bindparam("created", type_=Float)
        where.append(
            or_(
                m.Task.created_at < created,
                and_(m.Task.created_at == created, m.Task.id < bindparam("after_id")),
            )
        )
    return where


@functools.lru_cache(maxsize=16)
def _list_statement(shape: tuple[str, bool, bool], account: Any = None) -> Any:
    """A list page's statement, built once per shape (building one cost as much as running
    it); ``account`` as in ``_page_conditions``."""
    return (
        select(*_TASK_COLUMNS, m.Environment.label.label("env_label"), _json_text(m.Task.body))
        .outerjoin(m.Environment, m.Environment.id == m.Task.environment_id)
        .where(*_page_conditions(shape, account))
        .order_by(m.Task.created_at.desc(), m.Task.id.desc())
        .limit(bindparam("size"))
    )


@functools.lru_cache(maxsize=32)
def _authed_list(shape: tuple[str, bool, bool], for_account: bool) -> Any:
    """A list page in one statement: the caller's token row, user and account
    (``principal_cte``), the page of that account's tasks, and for each task its current
    attempt with that attempt's siblings (one row per turn). Instead of three statements
    (the token, the page, the turns by an expanding ``IN`` of 200 ids, whose rendering alone
    cost a tenth of a list)."""
    principal = accounts.principal_cte(for_account)
    account = select(principal.c.account__id).scalar_subquery()
    page = _list_statement(shape, account).subquery("page")
    cur = m.Turn.__table__.alias("cur")
    sib = m.Turn.__table__.alias("sib")
    related = or_(sib.c.id == cur.c.id, sib.c.parent_id == cur.c.parent_id)
    return (
        select(principal, page, *(sib.c[c.key] for c in _TURN_COLUMNS))
        .select_from(principal)
        .outerjoin(page, true())
        .outerjoin(cur, cur.c.id == page.c.current_turn_id)
        .outerjoin(sib, and_(sib.c.task_id == page.c.id, related))
        .order_by(page.c.created_at.desc(), page.c.id.desc())
    )


_TaskRow = namedtuple("_TaskRow", _TASK_KEYS)  # type: ignore[misc]
_TurnRow = namedtuple("_TurnRow", [c.key for c in _TURN_COLUMNS])  # type: ignore[misc]


def list_tasks(
    db: Session,
    principal: Principal,
    *,
    limit: int | None,
    task_filter: str | None,
    environment_id: str | None,
    cursor: str | None,
) -> TaskListPage:
    """``tasks/list``: each task's latest attempt with its diff stats, never its diff (read
    from columns; no turn body is loaded, so the cost does not grow with the diffs)."""
    page = _page(
        db,
        principal,
        limit=limit,
        task_filter=task_filter,
        environment_id=environment_id,
        cursor=cursor,
        bodies=False,
    )
    return TaskListPage(
        items=[render_list_item(t, page.ctx) for t in page.rows], cursor=page.cursor
    )


_LIST_TURNS = select(*_TURN_COLUMNS).where(
    or_(
        m.Turn.id.in_(bindparam("current", expanding=True)),
        m.Turn.parent_id.in_(
            select(m.Turn.parent_id).where(m.Turn.id.in_(bindparam("parents", expanding=True)))
        ),
    )
)


def list_json(
    db: Session,
    principal: Principal,
    cache: RenderCache,
    *,
    limit: int | None,
    task_filter: str | None,
    environment_id: str | None,
    cursor: str | None,
) -> bytes:
    """``tasks/list`` as JSON bytes, the same as ``list_tasks`` serialised: Core rows (no ORM
    objects), and each item rendered only when no rendering of exactly its rows (the task
    with its environment's label, its current attempt, that attempt's siblings) is kept."""
    size, shape, params = _page_where(
        principal.account_id, limit, task_filter, environment_id, cursor
    )
    conn = db.connection()
    rows: list[Any] = [_TaskRow._make(r) for r in conn.execute(_list_statement(shape), params)]
    more = len(rows) > size
    rows = rows[:size]
    current = [str(r.current_turn_id) for r in rows if r.current_turn_id]
    turns: dict[str, Any] = {}
    if current:
        ids = {"current": current, "parents": current}
        turns = {str(t.id): _TurnRow._make(t) for t in conn.execute(_LIST_TURNS, ids)}
    by_parent: dict[str | None, list[Any]] = {}
    for t in sorted(turns.values(), key=_turn_order):
        by_parent.setdefault(t.parent_id, []).append(t)
    attempts = {}
    for row in rows:
        turn = turns.get(row.current_turn_id or "")
        siblings = _siblings(turn, by_parent.get(turn.parent_id, [])) if turn else []
        attempts[row.id] = (turn, siblings)
    return _list_answer(rows, attempts, more, cache)


def list_json_authed(
    conn: Connection,
    claims: accounts.Claims,
    cache: RenderCache,
    *,
    limit: int | None,
    task_filter: str | None,
    environment_id: str | None,
    cursor: str | None,
) -> bytes:
    """``list_json`` in one statement (``_authed_list``) with the token's row read in it
    (``accounts.Recheck`` when the token does not let it through as it is)."""
    try:
        size, shape, params = _page_where(None, limit, task_filter, environment_id, cursor)
    except BadRequest as exc:  # the full path checks the token first, as it always did
        raise accounts.Recheck from exc
    statement = _authed_list(shape, claims.account_header is not None)
    rows = conn.execute(statement, {**params, **claims.params}).all()
    if not rows:
        raise accounts.Recheck
    accounts.account_of(conn, rows[0], claims)
    task_at = accounts.PRINCIPAL_WIDTH
    turn_at = task_at + len(_TASK_KEYS)
    tasks_: list[Any] = []
    related: dict[Any, list[Any]] = {}
    for r in rows:
        task_id = r[task_at]
        if task_id is None:  # no task (the account has none)
            continue
        group = related.get(task_id)
        if group is None:
            tasks_.append(_TaskRow._make(r[task_at:turn_at]))
            group = related[task_id] = []
        if r[turn_at] is not None:
            group.append(_TurnRow._make(r[turn_at:]))
    more = len(tasks_) > size
    tasks_ = tasks_[:size]
    attempts = {}
    for row in tasks_:
        turns = related[row.id]
        if len(turns) > 1:
            turns.sort(key=_turn_order)
        turn = None
        for t in turns:
            if t.id == row.current_turn_id:
                turn = t
                break
        siblings = _siblings(turn, turns) if turn is not None and len(turns) > 1 else []
        attempts[row.id] = (turn, siblings)
    return _list_answer(tasks_, attempts, more, cache)


def _turn_order(turn: Any) -> tuple[Any, int]:
    return (turn.created_at, turn.attempt_placement or 0)


def _siblings(turn: Any, same_parent: list[Any]) -> list[Any]:
    """The other attempts of ``turn``'s prompt, from the turns under its parent (in order)."""
    return [
        t
        for t in same_parent
        if t.role == "assistant" and t is not turn and t.parent_id == turn.parent_id
    ]


def _list_answer(
    rows: list[Any], attempts: dict[Any, tuple[Any, list[Any]]], more: bool, cache: RenderCache
) -> bytes:
    """The page's JSON from its task rows (``_TaskRow``) and each task's current attempt
    and siblings (``_TurnRow``): each item kept, or rendered and kept."""
    keys = []
    for row in rows:
        turn, siblings = attempts[row.id]
        keys.append((str(row.id), (row, turn, tuple(siblings))))
    kept = cache.get_many("list", keys)
    items: list[bytes] = []
    for (ident, key), row, item in zip(keys, rows, kept, strict=True):
        if item is None:
            turn, siblings = attempts[row.id]
            task = m.Task(**_orm_values(row._asdict(), _TASK_COLUMNS))
            ctx_turns = {
                str(t.id): m.Turn(**t._asdict())
                for t in ([turn, *siblings] if turn is not None else [])
            }
            labels = {str(row.environment_id): str(row.env_label)} if row.env_label else {}
            model = render_list_item(task, _Context.of(ctx_turns, labels))
            item = model.__pydantic_serializer__.to_json(model, by_alias=True)
            cache.put("list", ident, key, item)
        items.append(item)
    cursor_out = _encode_cursor(rows[-1]) if more and rows else None
    return (
        b'{"items":[' + b",".join(items) + b'],"cursor":' + json.dumps(cursor_out).encode() + b"}"
    )


def feed(
    db: Session,
    principal: Principal,
    *,
    limit: int | None,
    task_filter: str | None,
    environment_id: str | None,
    cursor: str | None,
) -> TaskFeedPage:
    """The ``tasks`` feed: each task with its current attempt, from the same page query. It
    is a list: the attempts' diffs are left out (``diff: ""``, ``truncated: true``, stats
    kept); ``GET tasks/{id}`` or the turn's ``diff`` endpoint has them."""
    page = _page(
        db,
        principal,
        limit=limit,
        task_filter=task_filter,
        environment_id=environment_id,
        cursor=cursor,
        bodies=True,
    )
    items = []
    for task in page.rows:
        turn = page.ctx.turns.get(task.current_turn_id or "")
        items.append(
            TaskFeedItem(
                task=render_task(task, page.ctx),
                turn=render_assistant_turn(turn, page.ctx, inline_diff=0) if turn else None,
            )
        )
    return TaskFeedPage(items=items, cursor=page.cursor)


def _diff_turn(task: m.Task, ctx: _Context) -> m.Turn | None:
    """The newest attempt on the current chain that holds a diff (what `apply` applies)."""
    turn = ctx.turns.get(task.current_turn_id or "")
    seen: set[str] = set()
    while turn is not None and turn.id not in seen:
        seen.add(turn.id)
        if turn.role == "assistant" and _turn_diff(turn) is not None:
            return turn
        turn = ctx.turns.get(turn.parent_id or "")
    return None


def details(
    db: Session, principal: Principal, task_id: str, *, inline_diff: int | None = None
) -> TaskDetails:
    """``GET tasks/{id}``; diffs cut to ``inline_diff`` bytes (``render_assistant_turn``)."""
    task = get_task_row(db, principal, task_id)
    return _render_details(task, _Context.load(db, [task], all_turns=True), inline_diff)


def _render_details(task: m.Task, ctx: _Context, inline_diff: int | None) -> TaskDetails:
    user = ctx.turns.get(task.current_user_turn_id or "")
    current = ctx.turns.get(task.current_turn_id or "")
    diff_turn = _diff_turn(task, ctx)
    rendered = render_task(task, ctx)
    assistant = render_assistant_turn(current, ctx, inline_diff) if current else None
    diff_rendered = None
    if diff_turn is not None:
        # usually the same attempt: render (validate) its body once
        same = assistant is not None and current is not None and diff_turn.id == current.id
        diff_rendered = _diff_items_only(
            assistant if same and assistant else render_assistant_turn(diff_turn, ctx, inline_diff)
        )
    return TaskDetails(
        task=rendered,
        task_status_display=rendered.task_status_display,
        current_user_turn=render_user_turn(user, inline_diff) if user else None,
        current_assistant_turn=assistant,
        current_diff_task_turn=diff_rendered,
    )


# Built once (a statement built per request costs about as much as running it): the task with
# its environment's label and each of its turns, one row per turn (one row with no turn), in
# ONE statement, so the task and its turns are one state of both (a statement sees one
# snapshot, on SQLite and on PostgreSQL) and a read is one round trip.
_DETAILS_COLUMNS = (
    *_TASK_COLUMNS,
    m.Environment.label.label("env_label"),
    _json_text(m.Task.body),
    *(c.label(f"turn__{c.key}") for c in _TURN_COLUMNS),
    cast(m.Turn.body, Text).label("turn__body"),
)
_DETAILS = (
    select(*_DETAILS_COLUMNS)
    .select_from(m.Task)
    .outerjoin(m.Environment, m.Environment.id == m.Task.environment_id)
    .outerjoin(m.Turn, m.Turn.task_id == m.Task.id)
    .where(m.Task.id == bindparam("task_id"))
)
_TASK_WIDTH = len(_TASK_KEYS)
_ACCOUNT_AT = _TASK_KEYS.index("account_id")
assert _TURN_KEYS[0] == "id"  # _details_rows: a row without a turn has None there


def details_json(
    db: Session,
    principal: Principal,
    task_id: str,
    cache: RenderCache,
    *,
    inline_diff: int | None = None,
) -> bytes:
    """``GET tasks/{id}`` as JSON bytes, the same as ``details`` serialised: the task's rows
    are read with one Core statement (no ORM objects) and the answer rendered only when no
    rendering of exactly these rows is kept (``service.rendercache``)."""
    if len(task_id) > 200:
        raise NotFound("Task not found")
    conn = db.connection()  # Core rows: no ORM objects, no ORM statement handling
    rows = [tuple(r) for r in conn.execute(_DETAILS, {"task_id": task_id})]
    return _details_answer(principal.account_id, task_id, rows, cache, inline_diff)


@functools.lru_cache(maxsize=2)
def _authed_details(for_account: bool) -> Any:
    """``_DETAILS`` joined to the caller's token row and account (``principal_cte``): one
    statement, one round trip, one snapshot. One flat join (a subquery of the task's rows
    was copied into a temporary table by SQLite, turn bodies and all)."""
    principal = accounts.principal_cte(for_account)
    return (
        select(principal, *_DETAILS_COLUMNS)
        .select_from(principal)
        .outerjoin(m.Task, m.Task.id == bindparam("task_id"))
        .outerjoin(m.Environment, m.Environment.id == m.Task.environment_id)
        .outerjoin(m.Turn, m.Turn.task_id == m.Task.id)
    )


def details_json_authed(
    conn: Connection,
    claims: accounts.Claims,
    task_id: str,
    cache: RenderCache,
    *,
    inline_diff: int | None = None,
) -> bytes:
    """``details_json`` with the token's row read in the same statement as the task's
    (``accounts.Recheck`` when the token does not let it through as it is)."""
    if len(task_id) > 200:
        raise accounts.Recheck  # 404, after the full path's token check
    params = {**claims.params, "task_id": task_id}
    rows = conn.execute(_authed_details(claims.account_header is not None), params).all()
    if not rows:
        raise accounts.Recheck
    width = accounts.PRINCIPAL_WIDTH
    account_id = accounts.account_of(conn, rows[0], claims)
    data = [tuple(r)[width:] for r in rows] if rows[0][width] is not None else []
    return _details_answer(account_id, task_id, data, cache, inline_diff)


def _details_answer(
    account_id: str,
    task_id: str,
    rows: list[tuple[Any, ...]],
    cache: RenderCache,
    inline_diff: int | None,
) -> bytes:
    """The answer from ``_DETAILS``'s rows: kept, or rendered and kept."""
    row, turn_rows = _details_rows(rows, account_id)
    key = digest([row, *turn_rows], inline_diff)
    ident = f"{task_id}:{inline_diff}"
    cached = cache.get("details", ident, key)
    if cached is not None:
        return cached
    task_values = dict(zip(_TASK_KEYS, row, strict=True))
    task = m.Task(**_orm_values(task_values, _TASK_COLUMNS))
    turns = {}
    for turn_row in turn_rows:
        values = dict(zip(_TURN_KEYS, turn_row, strict=True))
        turns[str(values["id"])] = m.Turn(**_orm_values(values, _TURN_COLUMNS))
    label = task_values["env_label"]
    labels = {str(task_values["environment_id"]): str(label)} if label is not None else {}
    model = _render_details(task, _Context.of(turns, labels), inline_diff)
    body = model.__pydantic_serializer__.to_json(model, by_alias=True)
    cache.put("details", ident, key, body)
    return body


def _details_rows(
    rows: list[tuple[Any, ...]], account_id: str
) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """The task's values (``_TASK_KEYS``) and its turns' (``_TURN_KEYS``, by id) from the one
    statement's rows; 404 unless the task is the caller's account's."""
    if not rows or rows[0][_ACCOUNT_AT] != account_id:
        raise NotFound("Task not found")
    turns = [r[_TASK_WIDTH:] for r in rows if r[_TASK_WIDTH] is not None]  # a turn's id
    return rows[0][:_TASK_WIDTH], sorted(turns, key=lambda t: str(t[0]))


def _orm_values(row: Any, columns: list[Any]) -> dict[str, Any]:
    """A transient ORM object's values from a Core row (its JSON body parsed)."""
    values = {c.key: row[c.key] for c in columns}
    text = row["body"]
    values["body"] = json.loads(text) if text is not None else None
    return values


def render_diff_turn(turn: m.Turn, ctx: _Context, inline_diff: int | None = None) -> AssistantTurn:
    """``current_diff_task_turn``: the attempt that holds the diff, with its diff items only
    (no ``message`` items, an empty work log), as in Codex's own fixtures. The official client
    collects the answers of this turn *and* of ``current_assistant_turn``, which usually is
    the same attempt: with its messages here too, every answer would show twice."""
    return _diff_items_only(render_assistant_turn(turn, ctx, inline_diff))


def _diff_items_only(rendered: AssistantTurn) -> AssistantTurn:
    items = [i for i in rendered.output_items if isinstance(i, PrOutputItem | OutputDiffItem)]
    return rendered.model_copy(update={"output_items": items, "worklog": Worklog()})


def render_turn(
    turn: m.Turn, ctx: _Context, inline_diff: int | None = None
) -> UserTurn | AssistantTurn:
    if turn.role == "user":
        return render_user_turn(turn, inline_diff)
    return render_assistant_turn(turn, ctx, inline_diff)


def turn_mapping(
    db: Session, principal: Principal, task_id: str, *, inline_diff: int | None = None
) -> TurnMapping:
    task = get_task_row(db, principal, task_id)
    ctx = _Context.load(db, [task], all_turns=True)
    mapping = {
        t.id: TurnMappingEntry(
            id=t.id,
            turn=render_turn(t, ctx, inline_diff),
            parent=t.parent_id,
            children=[c.id for c in ctx.children(t)],
        )
        for t in sorted(ctx.turns.values(), key=lambda t: (t.created_at, t.attempt_placement or 0))
    }
    return TurnMapping(turn_mapping=mapping, current_turn_id=task.current_turn_id)


def get_turn(
    db: Session,
    principal: Principal,
    task_id: str,
    turn_id: str,
    *,
    inline_diff: int | None = None,
) -> UserTurn | AssistantTurn:
    task = get_task_row(db, principal, task_id)
    turn = get_turn_row(db, task, turn_id)
    ctx = _Context.load(db, [task], all_turns=True)
    return render_turn(turn, ctx, inline_diff)


def whole_diff(
    db: Session, principal: Principal, task_id: str, turn_id: str, *, repo_id: str | None = None
) -> str:
    """The whole diff of an attempt, or a prompt's starting patch (``GET
    tasks/{id}/turns/{turn_id}/diff``), never cut; ``repo_id``: one repository's of a
    multi-repository attempt (``repo_diffs``)."""
    task = get_task_row(db, principal, task_id)
    turn = get_turn_row(db, task, turn_id)
    if repo_id is not None:
        found = (
            (turn.body.get("repo_diffs") or {}).get(repo_id) if turn.role == "assistant" else None
        )
        if not isinstance(found, dict) or not isinstance(found.get("diff"), str):
            raise NotFound(f"This attempt has no diff for repository {repo_id!r}")
        return str(found["diff"])
    if turn.role != "assistant":
        patch = starting_patch(turn.body.get("input_items"))
        if patch is None:
            raise NotFound("This prompt has no starting patch")
        return patch
    diff = _turn_diff(turn)
    if diff is None:
        why = "it is still running" if turn.turn_status in ACTIVE else "it made no change"
        raise NotFound(f"This attempt has no diff: {why}")
    return str(diff["diff"])


def sibling_turns(
    db: Session,
    principal: Principal,
    task_id: str,
    turn_id: str,
    *,
    inline_diff: int | None = None,
) -> SiblingTurnsResponse:
    task = get_task_row(db, principal, task_id)
    turn = get_turn_row(db, task, turn_id)
    if turn.role != "assistant":
        raise BadRequest("sibling_turns needs an assistant turn id")
    ctx = _Context.load(db, [task], all_turns=True)
    sibs = sorted(ctx.siblings(turn), key=lambda t: (t.attempt_placement or 0, t.created_at))
    return SiblingTurnsResponse(
        sibling_turns=[render_assistant_turn(t, ctx, inline_diff) for t in sibs]
    )


# --------------------------------------------------------------------------- actions


def set_archived(db: Session, principal: Principal, task_id: str, archived: bool) -> None:
    task = get_task_row(db, principal, task_id)
    task.archived = archived
    db.flush()


def mark_read(db: Session, principal: Principal, task_id: str) -> None:
    task = get_task_row(db, principal, task_id)
    task.has_unread_turn = False
    db.flush()


def mark_viewed(db: Session, principal: Principal, task_id: str, turn_id: str) -> None:
    task = get_task_row(db, principal, task_id)
    turn = get_turn_row(db, task, turn_id)
    turn.viewed = True
    if turn.id == task.current_turn_id:
        task.has_unread_turn = False
    db.flush()


def discard(db: Session, principal: Principal, task_id: str, turn_id: str) -> None:
    """Set an attempt aside (``discarded``; a client hides it among its siblings). If it was
    the task's current attempt, the first sibling still kept becomes current."""
    task = get_task_row(db, principal, task_id)
    turn = get_turn_row(db, task, turn_id)
    if turn.role != "assistant":
        raise BadRequest("Only an attempt (an assistant turn) can be discarded")
    if turn.turn_status in ACTIVE:
        raise Conflict(f"Turn is still {turn.turn_status}; cancel it before discarding it")
    turn.discarded = True
    if task.current_turn_id == turn.id:
        kept = db.scalars(
            select(m.Turn)
            .where(
                m.Turn.parent_id == turn.parent_id,
                m.Turn.role == "assistant",
                m.Turn.discarded.is_(False),
                m.Turn.id != turn.id,
            )
            .order_by(m.Turn.attempt_placement)
        ).first()
        if kept is not None:
            task.current_turn_id = kept.id
    db.flush()


def undo_discards(db: Session, principal: Principal, task_id: str, turn_id: str) -> None:
    """Bring back every discarded attempt among ``turn_id`` and its siblings (the task's
    current attempt stays as it is)."""
    task = get_task_row(db, principal, task_id)
    turn = get_turn_row(db, task, turn_id)
    if turn.role != "assistant":
        raise BadRequest("undo_all_discards_for_siblings takes an attempt (an assistant turn)")
    db.execute(
        update(m.Turn)
        .where(
            m.Turn.task_id == task.id,
            m.Turn.parent_id == turn.parent_id,
            m.Turn.role == "assistant",
        )
        .values(discarded=False)
    )
    db.flush()


def _cancel_turns(db: Session, task: m.Task, turns: list[m.Turn]) -> list[str]:
    """Mark attempts ``cancelled``. A pending attempt ends here (its terminal event is
    written now); a running one is stopped by its executor, which then writes the final work
    log and the terminal event."""
    now = time.time()
    cancelled = []
    error = {"code": "cancelled", "message": "The attempt was cancelled"}
    for turn in turns:
        was = turnstate.cancel(db, turn.id, now=now)
        if was is None:
            continue
        db.refresh(turn)
        body = dict(turn.body)
        body["latest_event"] = LatestEvent(
            created=now, text="Cancelled", event_type="info"
        ).model_dump(mode="json")
        body["error"] = error
        turn.body = body
        if was is TurnStatus.PENDING:
            events.append(
                db,
                task.id,
                turn.id,
                events.TASK_TURN_EVENT,
                events.status_payload("Cancelled", TurnStatus.CANCELLED, error=error),
            )
        cancelled.append(turn.id)
    if cancelled:
        task.updated_at = now
    db.flush()
    return cancelled


def cancel(db: Session, principal: Principal, task_id: str) -> list[str]:
    """Cancel every attempt of the task that has not finished; returns their ids."""
    task = get_task_row(db, principal, task_id)
    turns = db.scalars(
        select(m.Turn).where(
            m.Turn.task_id == task.id,
            m.Turn.role == "assistant",
            m.Turn.turn_status.in_(sorted(ACTIVE)),
        )
    ).all()
    return _cancel_turns(db, task, list(turns))


def cancel_turn(db: Session, principal: Principal, task_id: str, turn_id: str) -> list[str]:
    """Cancel one attempt; cancelling a finished one is a no-op (idempotent)."""
    task = get_task_row(db, principal, task_id)
    turn = get_turn_row(db, task, turn_id)
    if turn.role != "assistant":
        raise BadRequest("Only an assistant turn (an attempt) can be cancelled")
    return _cancel_turns(db, task, [turn])


def delete(db: Session, principal: Principal, task_id: str) -> list[str]:
    """Delete the task with its turns and events; returns the turn ids (their files go too)."""
    task = get_task_row(db, principal, task_id)
    turn_ids = list(db.scalars(select(m.Turn.id).where(m.Turn.task_id == task.id)))
    db.delete(task)
    db.flush()
    return turn_ids
