"""Reading results out of turns, by the rules the Codex CLI uses (codex-cli.md §4.4, §4.5).

Pure functions on wire models, shared by both clients and the CLI.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from openwham.client.errors import WhamError
from openwham.wire import (
    AssistantTurn,
    Fragment,
    MessageInputItem,
    MessageOutputItem,
    OutputDiff,
    OutputDiffItem,
    PrOutputItem,
    TaskDetails,
    TaskListItem,
    TextFragment,
    TurnMapping,
    UserTurn,
)

TERMINAL = frozenset({"completed", "failed", "cancelled"})
Readiness = Literal["pending", "ready", "error"]


def readiness(turn_status: str | None) -> Readiness:
    """The Codex CLI's task status: ``completed`` → ready, failed/cancelled → error."""
    if turn_status == "completed":
        return "ready"
    if turn_status in ("failed", "cancelled"):
        return "error"
    return "pending"


def list_status(item: TaskListItem) -> str | None:
    """The latest attempt's ``turn_status`` of a list entry (``None`` when not shown)."""
    display = item.task_status_display
    latest = display.latest_turn_status_display if display else None
    return latest.turn_status if latest else None


def sort_attempts(turns: Iterable[AssistantTurn]) -> list[AssistantTurn]:
    """All attempts of a user turn in the CLI's order: placement, then creation, then id.
    Duplicates (the current attempt is also among the siblings) are dropped."""
    seen: dict[tuple[str, int], AssistantTurn] = {}
    for turn in turns:
        seen.setdefault((turn.id or f"#{len(seen)}", turn.attempt_placement), turn)
    return sorted(
        seen.values(), key=lambda t: (t.attempt_placement, t.created_at or 0.0, t.id or "")
    )


def turn_diff(turn: AssistantTurn | None) -> str | None:
    """The first non-empty ``output_diff`` or ``pr`` diff of a turn. A diff openwham cut
    (``truncated: true``) raises :class:`WhamError` instead of passing for the whole change:
    ``client.diff`` / ``client.turn_diff`` fetch it whole."""
    item = turn_diff_item(turn)
    if item is None:
        return None
    if item.truncated:
        raise WhamError(
            f"attempt {turn.id if turn else '?'}: the server cut its diff ({item.diff_bytes} "
            "bytes in all); get it whole with client.diff(task_id) or "
            "client.turn_diff(task_id, turn_id)"
        )
    return item.diff


def turn_diff_item(turn: AssistantTurn | None) -> OutputDiff | None:
    """The diff item :func:`turn_diff` reads, also when openwham cut its text
    (``truncated: true``; then the text may even be empty)."""
    if turn is None:
        return None
    for item in turn.output_items:
        if isinstance(item, PrOutputItem) and (item.output_diff.diff or item.output_diff.truncated):
            return item.output_diff
        if isinstance(item, OutputDiffItem) and (item.diff or item.truncated):
            return item
    return None


def details_diff(details: TaskDetails) -> str | None:
    """``current_diff_task_turn`` first, then ``current_assistant_turn`` (as the CLI reads)."""
    return turn_diff(details.current_diff_task_turn) or turn_diff(details.current_assistant_turn)


def _fragments_text(content: Iterable[Fragment]) -> str:
    parts = [
        f if isinstance(f, str) else f.text for f in content if isinstance(f, str | TextFragment)
    ]
    return "".join(parts).strip()


def turn_messages(turn: AssistantTurn | None) -> list[str]:
    """The assistant's message texts of a turn (final answers, not the work log)."""
    if turn is None:
        return []
    texts = [
        _fragments_text(i.content) for i in turn.output_items if isinstance(i, MessageOutputItem)
    ]
    return [t for t in texts if t]


def turn_prompt(turn: UserTurn | None) -> str:
    """The text the user typed for a user turn (its ``message`` input items)."""
    if turn is None:
        return ""
    texts = [
        _fragments_text(i.content) for i in turn.input_items if isinstance(i, MessageInputItem)
    ]
    return "\n\n".join(t for t in texts if t)


@dataclass(frozen=True)
class Exchange:
    """One step of a task's conversation: a prompt and the attempt that answered it."""

    user_turn: UserTurn | None
    attempt: AssistantTurn
    attempt_total: int  # attempts the prompt got (best-of-N)

    @property
    def prompt(self) -> str:
        return turn_prompt(self.user_turn)

    @property
    def answer(self) -> list[str]:
        return turn_messages(self.attempt)


def conversation(mapping: TurnMapping, attempt_id: str) -> list[Exchange]:
    """The prompts and answers leading to attempt ``attempt_id``, oldest first.

    A task's history is a tree (a follow-up continues one attempt); this is the path to the
    given attempt: each prompt with the attempt that was followed up (or the given one).
    """
    turns = mapping.turn_mapping
    out: list[Exchange] = []
    seen: set[str] = set()
    current: str | None = attempt_id
    while current and current in turns and current not in seen:
        seen.add(current)
        entry = turns[current]
        if not isinstance(entry.turn, AssistantTurn):
            break
        parent = turns.get(entry.parent or "")
        user = parent.turn if parent and isinstance(parent.turn, UserTurn) else None
        out.append(Exchange(user, entry.turn, 1 + len(entry.turn.sibling_turn_ids)))
        current = parent.parent if parent else None
    out.reverse()
    return out


def looks_unified(diff: str) -> bool:
    """The CLI's check that a diff is a unified git diff."""
    return diff.startswith("diff --git ") or (
        "\n--- " in diff and "\n+++ " in diff and "@@ " in diff
    )
