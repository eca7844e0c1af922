"""Secret redaction: every text an attempt records passes through its ``Redactor``.

An environment's secrets reach only the setup script, but what the script prints, and
whatever it leaves on disk for the agent to read, could carry them into the setup log, the
work log, the agent's messages, the diff and so the event stream. The recorder therefore
replaces every secret value with :data:`MARK` in everything it stores. Multi-line values are
also matched line by line (a log line or a diff line holds one line of it), and longer values
go first, so a secret that contains another is replaced whole.

A script that prints ``base64 <<< $TOKEN`` must not get around that, so the common encodings
of each value are matched too (:func:`encodings`): base64 and base64url at each of the three
alignments a value can have inside a longer stream (only the characters that depend on the
value alone), hex in lower and upper case, URL-encoding (``quote`` and ``quote_plus``), the
escaped form inside a JSON string, and the value reversed. Encoded forms are matched only for
values of at least :data:`MIN_ENCODED` characters, and only encoded forms at least that long:
the inner base64 of a two-character secret is two or three letters that occur everywhere, so
redacting it would blank out whole logs (the value itself is always matched, however short).
Split forms (a value printed in pieces) are not matched.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

MARK = "[redacted]"
MIN_ENCODED = 6  # shortest value (and encoded form) matched in an encoded form
_MIN_LINE = 4  # lines of a multi-line secret shorter than this are not matched on their own


def _base64_inner(data: bytes, encode: Callable[[bytes], bytes]) -> list[str]:
    """For each alignment (the value starting 0, 1 or 2 bytes into a base64 stream), the
    run of base64 characters that only the value's bytes determine."""
    out = []
    for offset in range(3):
        text = encode(b"\0" * offset + data).decode("ascii")
        start = -(-offset * 8 // 6)  # the first character past the preceding bytes' bits
        end = (offset + len(data)) * 8 // 6  # the last one before the following bytes' bits
        out.append(text[start:end])
    return out


def encodings(value: str) -> set[str]:
    """The encoded forms of ``value`` that are redacted with it (see the module's docs)."""
    if len(value) < MIN_ENCODED:
        return set()
    data = value.encode("utf-8")
    forms = {
        *_base64_inner(data, base64.b64encode),
        *_base64_inner(data, base64.urlsafe_b64encode),
        data.hex(),
        data.hex().upper(),
        quote(value, safe=""),
        quote(value),
        quote_plus(value, safe=""),
        quote_plus(value),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        value[::-1],
    }
    return {f for f in forms if len(f) >= MIN_ENCODED and f != value}


def needles(value: str) -> set[str]:
    """Every string that stands for ``value``: itself, its lines, their encodings."""
    if not value:
        return set()
    found = {value, *encodings(value)}
    if "\n" in value:
        for line in value.splitlines():
            if len(line.strip()) >= _MIN_LINE:
                found.add(line)
                found.update(encodings(line))
    return found


class Redactor:
    """Replaces secret values (and their encodings) in strings and in JSON-like data.

    ``values`` may be a mapping of names to values: :meth:`names_in` then says which secrets
    a text contains (for a refusal that names them, never their values)."""

    def __init__(self, values: Iterable[str] | Mapping[str, str] = ()) -> None:
        named = values.items() if isinstance(values, Mapping) else ((v, v) for v in values)
        self._owner: dict[str, str] = {}
        for name, value in named:
            if isinstance(value, str):
                for needle in needles(value):
                    self._owner.setdefault(needle, name)
        ordered = sorted(self._owner, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, value: str) -> str:
        if self._pattern is None:
            return value
        return self._pattern.sub(MARK, value)

    def names_in(self, value: str) -> list[str]:
        """The names of the secrets ``value`` contains in any matched form, sorted."""
        if self._pattern is None:
            return []
        return sorted({self._owner[m.group(0)] for m in self._pattern.finditer(value)})

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


_FILE = re.compile(r"^diff --git a/(.*?) b/(.*)$")


def secrets_in_diff(redactor: Redactor, diff: str) -> list[dict[str, str]]:
    """``[{"secret": name, "file": path}]`` for every secret a git diff holds in a file
    (its name, content or mode lines), the path itself redacted; ``[]`` when none. The
    recorded diff is redacted, so this is what tells a push that it is not the real change."""
    found: list[dict[str, str]] = []
    path = ""
    chunk: list[str] = []

    def flush() -> None:
        for name in redactor.names_in("\n".join(chunk)):
            entry = {"secret": name, "file": redactor.text(path) or "(unknown)"}
            if entry not in found:
                found.append(entry)

    for line in diff.splitlines():
        match = _FILE.match(line)
        if match:
            flush()
            path, chunk = match.group(2), []
        chunk.append(line)
    flush()
    return found
