"""Secret redaction: every text an attempt records passes through its ``Redactor``.

An environment's secrets reach only the setup script, but what the script prints, and
whatever it leaves on disk for the agent to read, could carry them into the setup log, the
work log, the agent's messages, the diff and so the event stream. The recorder therefore
replaces every secret value with :data:`MARK` in everything it stores. Multi-line values are
also matched line by line (a log line or a diff line holds one line of it), and longer values
go first, so a secret that contains another is replaced whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MARK = "[redacted]"
_MIN_LINE = 4  # lines of a multi-line secret shorter than this are not matched on their own


class Redactor:
    """Replaces secret values in strings and in JSON-like data (dicts, lists, strings)."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        needles: set[str] = set()
        for value in values:
            if not value:
                continue
            needles.add(value)
            if "\n" in value:
                needles.update(x for x in value.splitlines() if len(x.strip()) >= _MIN_LINE)
        ordered = sorted(needles, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, value: str) -> str:
        if self._pattern is None:
            return value
        return self._pattern.sub(MARK, value)

    def data(self, value: Any) -> Any:
        """A copy of ``value`` with every string (keys too) redacted."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.data(k): self.data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(v) for v in value]
        return value
