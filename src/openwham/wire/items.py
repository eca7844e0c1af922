"""Input and output items of turns (wham-api.md §4.5, §4.6).

Both lists are polymorphic on ``type``. Known types parse into the models below; any other
type parses into :class:`~openwham.wire.base.UnknownObject` so new item kinds from chatgpt.com
are carried through instead of rejected.
"""

from typing import Annotated, Any, Final

from pydantic import Discriminator, Field, Tag

from openwham.wire.base import OmittingWireModel, UnknownObject, WireModel, tag_value
from openwham.wire.content import Fragment

INPUT_ITEM_TYPES: Final = ("message", "pre_apply_patch")
OUTPUT_ITEM_TYPES: Final = ("message", "pr", "output_diff", "partial_repo_snapshot")


class ExternalStorageDiff(WireModel):
    """Pointer to a diff kept in blob storage instead of inline."""

    file_id: str | None = None
    ttl: float | None = None


class OutputDiff(OmittingWireModel):
    """A unified git diff plus its context; ``diff`` is what ``codex apply`` applies.

    The request form of ``pre_apply_patch`` carries only ``diff``; the stored form has all fields.
    """

    type: str | None = "output_diff"
    repo_id: str | None = None
    base_commit_sha: str | None = None
    preapply_patch_base_commit_sha: str | None = None
    diff: str = ""
    external_storage_diff: ExternalStorageDiff | None = None
    files_modified: int | None = None
    lines_added: int | None = None
    lines_removed: int | None = None
    commit_message: str | None = None
    # openwham: ``diff`` is only the start of the change (lists: empty; details: capped at
    # ``WHAM_INLINE_DIFF_MAX_BYTES``); the whole one is ``GET tasks/{id}/turns/{turn}/diff``.
    # ``diff_bytes`` is the whole diff's size in UTF-8 bytes. Both appear only when truncated.
    truncated: bool | None = None
    diff_bytes: int | None = None
    omit_when_unset = ("truncated", "diff_bytes")


class MessageInputItem(WireModel):
    """The user's prompt: ``content_type: "text"`` fragments."""

    type: str = "message"
    role: str = "user"
    content: list[Fragment] = Field(default_factory=list)


class PreApplyPatchInputItem(WireModel):
    """Local changes to apply to the checkout before the agent starts."""

    type: str = "pre_apply_patch"
    output_diff: OutputDiff = Field(default_factory=OutputDiff)


def _input_item_tag(value: Any) -> str:
    kind = tag_value(value, "type")
    return kind if kind in INPUT_ITEM_TYPES else "unknown"


InputItem = Annotated[
    Annotated[MessageInputItem, Tag("message")]
    | Annotated[PreApplyPatchInputItem, Tag("pre_apply_patch")]
    | Annotated[UnknownObject, Tag("unknown")],
    Discriminator(_input_item_tag),
]
"""One entry of a turn's ``input_items``."""


class MessageOutputItem(WireModel):
    """The assistant's answer text."""

    type: str = "message"
    role: str = "assistant"
    content: list[Fragment] = Field(default_factory=list)


class PrOutputItem(WireModel):
    """A proposed change: PR title and body plus the diff (what top-level ``codex apply`` reads)."""

    type: str = "pr"
    pr_title: str | None = None
    pr_message: str | None = None
    output_diff: OutputDiff = Field(default_factory=OutputDiff)


class OutputDiffItem(OutputDiff):
    """A bare diff item ``{type: "output_diff", diff, …}``, accepted by ``codex cloud diff``."""


class LineRangeContent(WireModel):
    """Lines ``line_range_start..line_range_end`` of a file the agent read."""

    line_range_start: int | None = None
    line_range_end: int | None = None
    content: list[str] = Field(default_factory=list)
    contains_end_of_file: bool = False


class PartialRepoSnapshotFile(WireModel):
    """One file of a ``partial_repo_snapshot``: whole ``contents`` or some line ranges."""

    path: str = ""
    contents: str | None = None
    line_range_contents: list[LineRangeContent] = Field(default_factory=list)
    missing_reason: str | None = None


class PartialRepoSnapshotItem(WireModel):
    """The parts of the repository the agent looked at (for citations in the web UI)."""

    type: str = "partial_repo_snapshot"
    files: list[PartialRepoSnapshotFile] = Field(default_factory=list)


def _output_item_tag(value: Any) -> str:
    kind = tag_value(value, "type")
    return kind if kind in OUTPUT_ITEM_TYPES else "unknown"


OutputItem = Annotated[
    Annotated[MessageOutputItem, Tag("message")]
    | Annotated[PrOutputItem, Tag("pr")]
    | Annotated[OutputDiffItem, Tag("output_diff")]
    | Annotated[PartialRepoSnapshotItem, Tag("partial_repo_snapshot")]
    | Annotated[UnknownObject, Tag("unknown")],
    Discriminator(_output_item_tag),
]
"""One entry of an assistant turn's ``output_items``."""
