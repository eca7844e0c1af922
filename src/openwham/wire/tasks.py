"""Tasks, task lists, task details and the task feed (wham-api.md §3, §9)."""

from typing import Any, Final

from pydantic import Field

from openwham.wire.base import OmittingWireModel, WireModel
from openwham.wire.common import DiffStats
from openwham.wire.turns import AssistantTurn, UserTurn

TASK_FILTERS: Final = ("current", "all", "archived")
LEGACY_TASK_STATES: Final = ("pending", "ready", "applied", "error")
DEFAULT_TASK_TITLE: Final = "New task"


class GitPullRequestUser(WireModel):
    """GitHub user who opened a pull request."""

    login: str | None = None
    name: str | None = None
    email: str | None = None
    avatar_url: str | None = None
    id: int | None = None


class GitPullRequest(WireModel):
    """A pull request created from a task; the official client requires the first five fields."""

    number: int
    url: str
    state: str = "open"
    merged: bool = False
    mergeable: bool = False
    draft: bool | None = None
    title: str | None = None
    body: str | None = None
    base: str | None = None
    head: str | None = None
    base_sha: str | None = None
    head_sha: str | None = None
    merge_commit_sha: str | None = None
    comments: Any = None
    diff: str | None = None
    user: GitPullRequestUser | None = None


class ExternalPullRequest(WireModel):
    """Link from a task to a pull request made from one of its assistant turns."""

    id: str
    assistant_turn_id: str
    pull_request: GitPullRequest
    codex_updated_sha: str | None = None


class DenormalizedMetadata(WireModel):
    """Summary fields copied onto the task so lists need not load turns."""

    num_follow_ups: int = 0
    repo_name_map: dict[str, Any] = Field(default_factory=dict)
    last_user_turn_created_at: float | None = None
    last_turn_status: str | None = None
    diff_stats: DiffStats = Field(default_factory=DiffStats)
    last_pushed_turn_id: str | None = None
    start_branch_name: str | None = None
    pushed_branch_name: str | None = None
    cached_pull_request_data: Any = None


class LatestTurnStatusDisplay(OmittingWireModel):
    """Summary of the latest assistant turn; the CLI derives task status from ``turn_status``."""

    turn_id: str | None = None
    turn_status: str = "pending"
    diff_stats: DiffStats | None = None
    sibling_turn_ids: list[str] = Field(default_factory=list)
    image_asset_pointer_citations: list[Any] | None = None
    created_at: float | None = None
    updated_at: float | None = None
    intent: str | None = None
    issue_counts: dict[str, int] | None = None
    omit_when_unset = ("intent", "issue_counts")


class TaskStatusDisplay(OmittingWireModel):
    """Status summary of a task (free-form map in the OpenAPI model; known keys here).

    ``state`` is a legacy key the CLI reads only when ``latest_turn_status_display`` is absent.
    """

    environment_label: str | None = None
    branch_name: str | None = None
    latest_turn_status_display: LatestTurnStatusDisplay | None = None
    fix_task_id: str | None = None
    initial_intent: str | None = None
    omit_when_unset = ("fix_task_id", "initial_intent", "state")
    state: str | None = None


class Task(WireModel):
    """A task: the conversation of user turns and assistant attempts on one environment."""

    id: str
    title: str = DEFAULT_TASK_TITLE
    created_at: float | None = None
    updated_at: float | None = None
    has_generated_title: bool = False
    current_turn_id: str | None = None
    has_unread_turn: bool = False
    archived: bool = False
    external_pull_requests: list[ExternalPullRequest] = Field(default_factory=list)
    denormalized_metadata: DenormalizedMetadata = Field(default_factory=DenormalizedMetadata)
    environment_id: str | None = None
    is_review: bool = False
    task_status_display: TaskStatusDisplay | None = None


class TaskListItem(WireModel):
    """Entry of ``GET /tasks/list``; ``archived`` and ``has_unread_turn`` must be present."""

    id: str
    title: str = DEFAULT_TASK_TITLE
    has_generated_title: bool = False
    created_at: float | None = None
    updated_at: float | None = None
    task_status_display: TaskStatusDisplay | None = None
    archived: bool = False
    has_unread_turn: bool = False
    pull_requests: list[ExternalPullRequest] = Field(default_factory=list)


class TaskListPage(WireModel):
    """``GET /tasks/list``: a page of tasks and the opaque cursor of the next one."""

    items: list[TaskListItem] = Field(default_factory=list)
    cursor: str | None = None


class TaskDetails(WireModel):
    """``GET /tasks/{task_id}`` (``CodeTaskDetailsResponse``).

    ``current_diff_task_turn`` is the turn whose ``pr``/``output_diff`` item ``codex apply``
    uses. Captures omit the top-level ``task_status_display``; the CLI prefers it when present.
    """

    task: Task
    task_status_display: TaskStatusDisplay | None = None
    current_user_turn: UserTurn | None = None
    current_assistant_turn: AssistantTurn | None = None
    current_diff_task_turn: AssistantTurn | None = None


class TaskFeedItem(WireModel):
    """Entry of ``GET /tasks``: a task with its current assistant turn."""

    task: Task
    turn: AssistantTurn | None = None


class TaskFeedPage(WireModel):
    """``GET /tasks``: ``{items, cursor}``."""

    items: list[TaskFeedItem] = Field(default_factory=list)
    cursor: str | None = None
