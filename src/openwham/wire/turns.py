"""User and assistant turns, the turn tree and turn logs (wham-api.md §4)."""

from typing import Annotated, Any, Final

from pydantic import BeforeValidator, Discriminator, Field, Tag

from openwham.wire.base import WireModel, tag_value
from openwham.wire.common import TurnError as TurnError  # re-exported: documented here
from openwham.wire.environments import Environment
from openwham.wire.items import InputItem, OutputDiff, OutputItem
from openwham.wire.worklog import Worklog

TURN_STATUSES: Final = ("pending", "in_progress", "completed", "failed", "cancelled")
TERMINAL_TURN_STATUSES: Final = ("completed", "failed", "cancelled")
PULL_REQUEST_STATUSES: Final = ("not_created",)
LATEST_EVENT_TEXTS: Final = ("Thinking", "Waiting", "Working", "Completing the task", "Completed")
SETUP_LOG_TYPES: Final = ("UserSetupScript",)


def _null_as_empty(value: Any) -> Any:
    return [] if value is None else value


class LatestEvent(WireModel):
    """The live status line of a running turn (``text`` such as ``"Working"``)."""

    created: float | None = None
    text: str = ""
    event_type: str = "info"


class SetupLogKey(WireModel):
    """Identifies one setup log; ``created_at`` is a naive ISO 8601 string, not epoch seconds."""

    type: str = "UserSetupScript"
    name: str = ""
    created_at: str | None = None


class SetupLogRef(WireModel):
    """A setup log of a turn; ``value`` is the id of the stored log blob."""

    key: SetupLogKey = Field(default_factory=SetupLogKey)
    value: str = ""


class TurnLogs(WireModel):
    """``logs`` of an assistant turn: ``{"logs": [...]}``."""

    logs: list[SetupLogRef] = Field(default_factory=list)


class ProxyEvent(WireModel):
    """One audited network request of the agent (``timestamp`` is naive ISO 8601)."""

    timestamp: str | None = None
    decision: str | None = None
    reason: str | None = None
    method: str | None = None
    domain: str | None = None
    protocol: str | None = None
    size: int | None = None
    path: str | None = None


class SetupCache(WireModel):
    """openwham: how the post-setup cache served an attempt of an environment with a setup
    script and the cache on (docs/api.md): ``used``, it resumed a snapshot taken ``created``
    at ``commit`` (``checked_out``: the attempt's commit, checked out on top) and ran the
    maintenance script if ``maintenance``; else the setup script ran and ``saved`` says
    whether its result was kept (``size`` bytes) for later attempts."""

    used: bool = False
    created: str | None = None
    commit: str | None = None
    checked_out: str | None = None
    maintenance: bool | None = None
    saved: bool | None = None
    size: int | None = None

    def summary(self) -> str:
        """One line for people (the web task page, ``wham task show``)."""
        if not self.used:
            if not self.saved:
                return "Ran setup script; container not cached"
            size = f" ({self.size / 1e6:.1f} MB)" if self.size is not None else ""
            return f"Ran setup script; container cached for later attempts{size}"
        when = f" from {self.created[:19].replace('T', ' ')} UTC" if self.created else ""
        moved = ""
        if self.commit and self.checked_out and self.commit != self.checked_out:
            moved = f"commit {self.commit[:7]}→{self.checked_out[:7]}, "
        after = "ran maintenance script" if self.maintenance else "no maintenance script"
        return f"Resumed cached container{when} ({moved}setup script not run); {after}"


class UserTurn(WireModel):
    """A user's prompt. ``id`` is optional only because client fixtures omit it."""

    type: str = "user"
    id: str | None = None
    role: str = "user"
    input_items: list[InputItem] = Field(default_factory=list)
    user_model_slug: str | None = None
    previous_turn_id: str | None = None
    created_at: float | None = None


def _absent(value: object) -> bool:
    """An openwham-only key left out of the answer when it has nothing to say."""
    return value is None


class AssistantTurn(WireModel):
    """One attempt of the agent at a user turn (best-of-N gives N sibling attempts).

    ``id`` is optional only because the official client's fixtures omit it; openwham always
    sets it. ``sibling_turn_ids: null`` is read as ``[]``, as the official client does.
    """

    type: str = "assistant"
    id: str | None = None
    role: str = "assistant"
    attempt_placement: int = 0
    sibling_turn_ids: Annotated[list[str], BeforeValidator(_null_as_empty)] = Field(
        default_factory=list
    )
    turn_status: str = "pending"
    input_items: list[InputItem] = Field(default_factory=list)
    output_items: list[OutputItem] = Field(default_factory=list)
    worklog: Worklog = Field(default_factory=Worklog)
    error: TurnError | None = None
    latest_event: LatestEvent | None = None
    child_turns: list[str] = Field(default_factory=list)
    conversation_id: str | None = None
    pull_request_status: str = "not_created"
    pull_request_data: Any = None
    created_at: float | None = None
    internal_only_rollouts: list[str] | None = None
    environment_id: str | None = None
    environment: Environment | None = None
    branch: str | None = None
    base_commit_sha: str | None = None
    previous_turn_id: str | None = None
    logs: TurnLogs | None = None
    proxy_events: list[ProxyEvent] | None = None
    # openwham: the post-setup cache's part in this attempt; absent when it had none
    setup_cache: SetupCache | None = Field(default=None, exclude_if=_absent)
    # openwham: a multi-repository environment's diffs, keyed by the repository's key in
    # ``repos``/``repo_map``, for each repository the attempt changed (the first one's is also
    # the ``pr`` item, which ``codex apply`` reads); absent with a single repository.
    # ``exclude_if``, not ``omit_when_unset``: that needs a Python serializer on the whole
    # model, which made every task's serialisation several times slower (test_overload)
    repo_diffs: dict[str, OutputDiff] | None = Field(default=None, exclude_if=_absent)
    debug_metadata: Any = None
    discarded: bool = False


_ASSISTANT_ONLY_KEYS: Final = ("output_items", "turn_status", "attempt_placement", "worklog")


def _turn_tag(value: Any) -> str:
    """``type`` decides; without it ``role``, then the presence of assistant-only fields."""
    for key in ("type", "role"):
        kind = tag_value(value, key)
        if kind in ("user", "assistant"):
            return str(kind)
    if isinstance(value, dict) and not any(k in value for k in _ASSISTANT_ONLY_KEYS):
        return "user" if "input_items" in value else "assistant"
    return "assistant"


Turn = Annotated[
    Annotated[UserTurn, Tag("user")] | Annotated[AssistantTurn, Tag("assistant")],
    Discriminator(_turn_tag),
]
"""A user or assistant turn, chosen by ``type``."""


class TurnResponse(WireModel):
    """``GET /tasks/{task_id}/turns/{turn_id}``."""

    turn: Turn


class TurnMappingEntry(WireModel):
    """A node of the turn tree: the turn, its parent turn id and its child turn ids."""

    id: str
    turn: Turn
    parent: str | None = None
    children: list[str] = Field(default_factory=list)


class TurnMapping(WireModel):
    """``GET /tasks/{task_id}/turns``: every turn of the task keyed by turn id."""

    turn_mapping: dict[str, TurnMappingEntry] = Field(default_factory=dict)
    current_turn_id: str | None = None


class SiblingTurnsResponse(WireModel):
    """``GET …/turns/{turn_id}/sibling_turns``: the other attempts of the same user turn."""

    sibling_turns: list[AssistantTurn] = Field(default_factory=list)


class TurnLogLine(WireModel):
    """One line of setup log text."""

    key: SetupLogKey = Field(default_factory=SetupLogKey)
    line: str = ""


class TurnLogsResponse(WireModel):
    """``GET …/turns/{turn_id}/logs``: setup log text line by line."""

    logs: list[TurnLogLine] = Field(default_factory=list)


class TaskLogEntry(WireModel):
    """One entry of ``GET tasks/{task_id}/logs`` (``timestamp`` is naive ISO 8601)."""

    timestamp: str | None = None
    level: str = "info"
    message: str = ""
    source: str = ""


class TaskLogsResponse(WireModel):
    """``GET tasks/{task_id}/logs``: the setup logs and server notes of a task's attempts."""

    logs: list[TaskLogEntry] = Field(default_factory=list)
