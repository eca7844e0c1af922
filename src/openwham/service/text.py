"""Shortening text for titles and labels: at a word boundary, never inside a word."""

from __future__ import annotations

MAX_TITLE_CHARS = 60


def shorten(text: str, limit: int = MAX_TITLE_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters: cut at the last space before the
    limit with "…" added, never inside a word. A first word longer than the limit is kept
    whole (up to twice the limit; only a longer blob is cut, and then without a word to
    keep)."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    head = line[: limit - 1]
    if line[limit - 1] != " " and " " in head:
        head = head.rsplit(" ", 1)[0]
    elif " " not in head:  # one long first word: keep it whole when it is not a blob
        word = line.split(" ", 1)[0]
        head = word if len(word) <= 2 * limit else word[: limit - 1]
        if head == line:
            return line
    return head.rstrip(" ,;:-") + "…"
