"""Small facts about unified diffs: whether text is one, and its file/line counts."""

from __future__ import annotations

from openwham.wire import DiffStats


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
