"""Content fragments: the entries of ``message.content`` (wham-api.md §4.7).

A fragment is a bare string or an object tagged by ``content_type``. The official client
matches ``"text"`` case-insensitively, so the discriminator does too. Unknown kinds parse into
:class:`~openwham.wire.base.UnknownObject` and are re-emitted unchanged.
"""

from typing import Annotated, Any, Final

from pydantic import Discriminator, Tag

from openwham.wire.base import UnknownObject, WireModel, tag_value

CONTENT_TYPES: Final = ("text", "terminal_chunk_citation", "repo_file_citation")


class TextFragment(WireModel):
    """Plain text; what the official client shows as the assistant's answer."""

    content_type: str = "text"
    text: str = ""


class TerminalChunkCitation(WireModel):
    """Citation of lines of a terminal output chunk the agent produced."""

    content_type: str = "terminal_chunk_citation"
    terminal_chunk_id: str | None = None
    line_range_start: int | None = None
    line_range_end: int | None = None


class RepoFileCitation(WireModel):
    """Citation of lines of a repository file."""

    content_type: str = "repo_file_citation"
    path: str | None = None
    line_range_start: int | None = None
    line_range_end: int | None = None


def _fragment_tag(value: Any) -> str:
    if isinstance(value, str):
        return "str"
    kind = tag_value(value, "content_type")
    if isinstance(kind, str):
        kind = kind.lower()
        if kind in CONTENT_TYPES:
            return kind
    return "unknown"


Fragment = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[TextFragment, Tag("text")]
    | Annotated[TerminalChunkCitation, Tag("terminal_chunk_citation")]
    | Annotated[RepoFileCitation, Tag("repo_file_citation")]
    | Annotated[UnknownObject, Tag("unknown")],
    Discriminator(_fragment_tag),
]
"""One entry of ``message.content``: a string, a known fragment or an unknown one."""
