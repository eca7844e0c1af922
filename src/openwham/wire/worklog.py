"""The worklog of an assistant turn, in ChatGPT conversation-message shape (wham-api.md §4.8)."""

from typing import Any, Final

from pydantic import Field

from openwham.wire.base import OmittingWireModel, WireModel
from openwham.wire.common import TurnError
from openwham.wire.content import Fragment

WORKLOG_CONTENT_TYPES: Final = ("text", "code", "terminal_output")
WORKLOG_ROLES: Final = ("user", "assistant", "tool")
WORKLOG_STATUSES: Final = ("finished_successfully", "in_progress", "failed")
WORKLOG_CHANNELS: Final = ("analysis", "commentary", "final")
REASONING_STATUSES: Final = ("is_reasoning", "not_reasoning")


class WorklogAuthor(WireModel):
    """Who wrote a message; the official client reads only ``role``."""

    role: str = "assistant"
    name: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class WorklogContent(OmittingWireModel):
    """Message body in one of two forms.

    Text form: ``{content_type: "text", parts: [...]}``. Code form (a tool call):
    ``{content_type: "code", language, response_format_name, text}``. One model with optional
    fields covers both; exclude unset or ``None`` fields when emitting one form.
    """

    content_type: str = "text"
    parts: list[Fragment] | None = None
    language: str | None = None
    response_format_name: str | None = None
    text: str | None = None
    # Each form carries only its own keys (captures: text form has no language/text keys).
    omit_when_unset = ("parts", "language", "response_format_name", "text")


class InlineReviewAnchors(WireModel):
    """``metadata.l1239dk1`` of user messages: inline review comments the prompt refers to."""

    inline_comments: list[Any] = Field(default_factory=list)


class WorklogMessageMetadata(OmittingWireModel):
    """Known message metadata keys; unknown ones are kept as extras.

    Every key is optional and emitted only when set: captured messages carry different subsets
    (the user prompt has only ``l1239dk1``, a tool call only ``first_content_token_index``).
    """

    exclude_after_next_user_message: bool | None = None
    reasoning_status: str | None = None
    first_content_token_index: int | None = None
    message_content_token_count: int | None = None
    is_initial_reasoning_message: bool | None = None
    error: TurnError | None = None
    l1239dk1: InlineReviewAnchors | None = None
    omit_when_unset = (
        "exclude_after_next_user_message",
        "reasoning_status",
        "first_content_token_index",
        "message_content_token_count",
        "is_initial_reasoning_message",
        "error",
        "l1239dk1",
    )


class WorklogMessage(WireModel):
    """One step of the agent's work: prompt, reasoning, tool call or tool output."""

    id: str
    author: WorklogAuthor = Field(default_factory=WorklogAuthor)
    create_time: float | None = None
    update_time: float | None = None
    content: WorklogContent = Field(default_factory=WorklogContent)
    status: str = "finished_successfully"
    end_turn: bool | None = None
    weight: float = 1.0
    metadata: WorklogMessageMetadata = Field(default_factory=WorklogMessageMetadata)
    recipient: str = "all"
    channel: str | None = None


class Worklog(WireModel):
    """``{"messages": [...]}`` attached to each assistant turn."""

    messages: list[WorklogMessage] = Field(default_factory=list)
