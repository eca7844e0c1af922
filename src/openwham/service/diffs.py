"""Small facts about unified diffs: whether text is one, and its file/line counts."""

from __future__ import annotations

from typing import Any

from openwham.wire import DiffStats


def output_diff(output_items: Any) -> dict[str, Any] | None:
    """The ``output_diff`` of an attempt's output items (inside its ``pr`` item, or on its
    own), when it holds a non-empty diff."""
    for item in output_items or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "pr" and (item.get("output_diff") or {}).get("diff"):
            return dict(item["output_diff"])
        if item.get("type") == "output_diff" and item.get("diff"):
            return dict(item)
    return None


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
