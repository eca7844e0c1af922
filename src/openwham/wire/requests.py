"""``POST /tasks``: request and response (wham-api.md §3.3).

Request models stay lenient (unknown fields kept): the server checks the semantics itself and
answers with the production server's messages ("Missing input_items", "Must specify one of:
follow_up, new_task, review_fix", "new_task should be object/dict").
"""

from typing import Any

from pydantic import AliasChoices, Field

from openwham.wire.base import WireModel
from openwham.wire.items import InputItem
from openwham.wire.tasks import Task
from openwham.wire.turns import AssistantTurn, UserTurn
from openwham.wire.usage import TaskRateLimit


class NewTask(WireModel):
    """Start a task on an environment (by id, never ``owner/repo``).

    ``run_environment_in_qa_mode: true`` is Ask mode (answer only, no diff). ``model`` and
    ``reasoning_effort`` are openwham extensions; chatgpt.com's handling is unknown.
    """

    environment_id: str
    branch: str | None = None
    run_environment_in_qa_mode: bool = False
    model: str | None = None
    reasoning_effort: str | None = None


class FollowUp(WireModel):
    """Continue a task from one of its assistant turns (openwham-defined; WHAM's is not public).

    ``{"task_id": ..., "turn_id": ...}``; ``previous_turn_id`` is accepted for ``turn_id``.
    Serialised as ``turn_id``.
    """

    task_id: str
    turn_id: str = Field(validation_alias=AliasChoices("turn_id", "previous_turn_id"))


class TaskMetadata(WireModel):
    """Task options; ``best_of_n`` (1 to 4) is the number of parallel attempts."""

    best_of_n: int | None = None


class CreateTaskRequest(WireModel):
    """Body of ``POST /tasks``: ``input_items`` plus exactly one of the three mode keys.

    ``input_items`` defaults to ``[]``; check ``model_fields_set`` to detect it missing.
    ``review_fix`` has no public shape and is kept as a plain object.
    """

    new_task: NewTask | None = None
    follow_up: FollowUp | None = None
    review_fix: dict[str, Any] | None = None
    input_items: list[InputItem] = Field(default_factory=list)
    metadata: TaskMetadata | None = None


class CreateTaskResponse(WireModel):
    """``POST /tasks`` response; ``rate_limit`` is dumped without ``windows`` here."""

    task: Task
    user_turn: UserTurn
    turn: AssistantTurn
    rate_limit: TaskRateLimit = Field(default_factory=TaskRateLimit)
