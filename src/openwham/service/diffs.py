"""Small facts about unified diffs: whether text is one, and its file/line counts."""

from __future__ import annotations

import re
from typing import Any

from openwham.store.models import items_diff
from openwham.wire import DiffStats


def output_diff(output_items: Any) -> dict[str, Any] | None:
    """The ``output_diff`` of an attempt's output items (inside its ``pr`` item, or on its
    own), when it holds a non-empty diff (the rule the store's diff columns follow too)."""
    return items_diff(output_items)


def looks_like_unified_diff(text: str) -> bool:
    """The same test the Codex CLI applies before it accepts a diff."""
    if text.startswith("diff --git "):
        return True
    return "\n--- " in f"\n{text}" and "\n+++ " in text and "@@ " in text


def diff_stats(text: str) -> DiffStats:
    """Files touched and lines added/removed, counting only lines inside hunks."""
    files: set[str] = set()
    added = removed = 0
    in_hunk = False
    for line in text.splitlines():
        if line.startswith("diff --git "):
            in_hunk = False
            parts = line.split(" b/", 1)
            files.add(parts[1] if len(parts) == 2 else line)
        elif line.startswith("@@"):
            in_hunk = True
        elif not in_hunk and line.startswith("+++ "):
            name = line[4:].strip()
            if name != "/dev/null":
                files.add(name.removeprefix("b/"))
        elif not in_hunk and line.startswith("--- "):
            name = line[4:].strip()
            if name != "/dev/null" and not any(f.endswith(name.removeprefix("a/")) for f in files):
                files.add(name.removeprefix("a/"))
        elif in_hunk and line.startswith("+"):
            added += 1
        elif in_hunk and line.startswith("-"):
            removed += 1
    return DiffStats(files_modified=len(files), lines_added=added, lines_removed=removed)


_HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def _unfinished_hunk_ends(lines: list[str]) -> list[bool]:
    """For each line: whether a hunk is still unfinished after it (its header promised more
    lines than have come), counting lines as ``git apply`` does."""
    old = new = 0
    out = []
    for line in lines:
        if old > 0 or new > 0:
            if line.startswith(" ") or not line:
                old, new = old - 1, new - 1
            elif line.startswith("-"):
                old -= 1
            elif line.startswith("+"):
                new -= 1
            elif not line.startswith("\\"):
                old = new = 0  # not a hunk line: git would call the patch corrupt here
        else:
            match = _HUNK.match(line)
            if match:
                old = 1 if match.group(1) is None else int(match.group(1))
                new = 1 if match.group(2) is None else int(match.group(2))
        out.append(old > 0 or new > 0)
    return out


def truncate_diff(text: str, max_bytes: int) -> str:
    """At most ``max_bytes`` (UTF-8) of the start of a diff, as whole lines that end *inside*
    a hunk, so that ``git apply`` refuses the prefix as a corrupt patch instead of applying
    part of the change; ``""`` when no hunk starts within the limit (a prefix of headers only
    could still apply, e.g. as an empty new file)."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    cut = data.rfind(b"\n", 0, max_bytes + 1)
    if cut < 0:
        return ""
    lines = data[:cut].decode().split("\n")
    unfinished = _unfinished_hunk_ends(lines)
    for end in range(len(lines), 0, -1):
        if unfinished[end - 1]:
            return "".join(f"{line}\n" for line in lines[:end])
    return ""


def inline_output_items(items: list[Any], max_bytes: int | None) -> list[Any]:
    """Output items with each diff cut to ``max_bytes`` (``None``: whole; ``0``: none, as in
    lists); a cut diff says ``truncated: true`` and the whole one's ``diff_bytes``."""
    if max_bytes is None:
        return items
    out: list[Any] = []
    for item in items:
        if isinstance(item, dict) and item.get("type") == "pr":
            inner = item.get("output_diff")
            if isinstance(inner, dict) and isinstance(inner.get("diff"), str):
                item = {**item, "output_diff": _cap(inner, max_bytes)}
        elif (
            isinstance(item, dict)
            and item.get("type") == "output_diff"
            and isinstance(item.get("diff"), str)
        ):
            item = _cap(item, max_bytes)
        out.append(item)
    return out


def inline_repo_diffs(diffs: dict[str, Any], max_bytes: int | None) -> dict[str, Any]:
    """A turn's ``repo_diffs`` with each diff cut as :func:`inline_output_items` does."""
    if max_bytes is None:
        return diffs
    return {
        key: _cap(item, max_bytes)
        if isinstance(item, dict) and isinstance(item.get("diff"), str)
        else item
        for key, item in diffs.items()
    }


def inline_input_items(items: list[Any], max_bytes: int | None) -> list[Any]:
    """Input items with a ``pre_apply_patch``'s diff cut as :func:`inline_output_items` does."""
    if max_bytes is None:
        return items
    out: list[Any] = []
    for item in items:
        inner = item.get("output_diff") if isinstance(item, dict) else None
        if item_is_patch(item) and isinstance(inner, dict) and isinstance(inner.get("diff"), str):
            item = {**item, "output_diff": _cap(inner, max_bytes)}
        out.append(item)
    return out


def item_is_patch(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") == "pre_apply_patch"


def starting_patch(input_items: Any) -> str | None:
    """A prompt's starting patch (its ``pre_apply_patch`` item's diff), if it has one."""
    for item in input_items or []:
        inner = item.get("output_diff") if item_is_patch(item) else None
        if isinstance(inner, dict) and isinstance(inner.get("diff"), str) and inner["diff"]:
            return str(inner["diff"])
    return None


def _cap(diff_item: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    text: str = diff_item["diff"]
    if len(text) * 4 <= max_bytes:  # no UTF-8 character is longer than 4 bytes
        return diff_item
    size = len(text.encode())
    if size <= max_bytes:
        return diff_item
    return {
        **diff_item,
        "diff": truncate_diff(text, max_bytes) if max_bytes > 0 else "",
        "truncated": True,
        "diff_bytes": size,
    }
