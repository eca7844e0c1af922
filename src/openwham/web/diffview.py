"""A unified diff parsed for display: files, hunks, numbered lines, split rows, highlighting.

Parsing happens on the server so the page needs no diff library in the browser; every piece
of text stays a plain string that the templates escape. Highlighting (Pygments, chosen by
file name) is by hunk side, so a string or comment spanning lines keeps its colour. Big
diffs are shown without highlighting, and huge ones only as escaped text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from pygments.lexer import Lexer
from pygments.lexers import get_lexer_for_filename
from pygments.token import STANDARD_TYPES, _TokenType
from pygments.util import ClassNotFound

# Above these sizes the viewer stops highlighting / stops parsing (raw text only).
HIGHLIGHT_MAX_LINES = 6000
PARSE_MAX_CHARS = 3 * 1024 * 1024

Kind = Literal["context", "add", "del", "note"]
Token = tuple[str, str]  # (css class or "", text)

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)$")


@dataclass
class Line:
    kind: Kind
    text: str
    old: int | None = None
    new: int | None = None
    tokens: list[Token] = field(default_factory=list)


@dataclass
class SplitRow:
    left: Line | None
    right: Line | None


@dataclass
class Hunk:
    header: str
    lines: list[Line] = field(default_factory=list)

    def split_rows(self) -> list[SplitRow]:
        """Side-by-side rows: removed lines face the added lines that follow them."""
        rows: list[SplitRow] = []
        dels: list[Line] = []
        adds: list[Line] = []

        def flush() -> None:
            for i in range(max(len(dels), len(adds))):
                rows.append(
                    SplitRow(dels[i] if i < len(dels) else None, adds[i] if i < len(adds) else None)
                )
            dels.clear()
            adds.clear()

        for line in self.lines:
            if line.kind == "del":
                if adds:
                    flush()
                dels.append(line)
            elif line.kind == "add":
                adds.append(line)
            else:
                flush()
                rows.append(SplitRow(line, line))
        flush()
        return rows


@dataclass
class FileDiff:
    old_path: str | None
    new_path: str | None
    status: Literal["modified", "added", "deleted", "renamed"] = "modified"
    binary: bool = False
    hunks: list[Hunk] = field(default_factory=list)
    added: int = 0
    removed: int = 0

    @property
    def path(self) -> str:
        return self.new_path or self.old_path or "(unknown file)"

    @property
    def label(self) -> str:
        if self.status == "renamed" and self.old_path and self.new_path:
            return f"{self.old_path} → {self.new_path}"
        return self.path


@dataclass
class DiffView:
    files: list[FileDiff]
    raw: str
    parsed: bool = True

    @property
    def added(self) -> int:
        return sum(f.added for f in self.files)

    @property
    def removed(self) -> int:
        return sum(f.removed for f in self.files)


def _unquote(path: str) -> str:
    """Git quotes unusual paths as C strings (``"a/t\\303\\251st"``)."""
    if len(path) >= 2 and path[0] == '"' and path[-1] == '"':
        body = path[1:-1]
        try:
            raw = body.encode("latin-1", "backslashreplace").decode("unicode_escape")
            return raw.encode("latin-1").decode("utf-8", "replace")
        except (UnicodeDecodeError, UnicodeEncodeError):
            return body
    return path


def _strip_prefix(path: str) -> str | None:
    path = _unquote(path.strip())
    if path == "/dev/null":
        return None
    if path[:2] in ("a/", "b/"):
        return path[2:]
    return path


def _git_header_paths(rest: str) -> tuple[str | None, str | None]:
    """``a/x b/x`` from a ``diff --git`` line (only a guess when names hold spaces)."""
    if rest.startswith('"'):
        end = rest.find('" ', 1)
        if end > 0:
            return _strip_prefix(rest[: end + 1]), _strip_prefix(rest[end + 2 :])
    half = len(rest) // 2
    if rest[:half].removeprefix("a/") == rest[half + 1 :].removeprefix("b/"):
        return _strip_prefix(rest[:half]), _strip_prefix(rest[half + 1 :])
    parts = rest.split(" b/", 1)
    if len(parts) == 2:
        return _strip_prefix(parts[0]), _strip_prefix("b/" + parts[1])
    return _strip_prefix(rest), _strip_prefix(rest)


def parse(text: str) -> DiffView:
    """Parse ``git diff`` output; anything unexpected is kept out, never raised.

    A hunk ends when its header's line counts are used up, so a removed line that reads
    ``-- x`` is never taken for the next file's ``--- x`` header.
    """
    if len(text) > PARSE_MAX_CHARS:
        return DiffView(files=[], raw=text, parsed=False)
    files: list[FileDiff] = []
    current: FileDiff | None = None
    hunk: Hunk | None = None
    old_no = new_no = old_left = new_left = 0
    for raw_line in text.split("\n"):
        in_hunk = hunk is not None and (old_left > 0 or new_left > 0)
        if not in_hunk:
            if raw_line.startswith("diff --git "):
                old, new = _git_header_paths(raw_line[len("diff --git ") :])
                current = FileDiff(old_path=old, new_path=new)
                files.append(current)
                hunk = None
                continue
            if raw_line.startswith("--- ") and (current is None or current.hunks):
                current = FileDiff(old_path=_strip_prefix(raw_line[4:]), new_path=None)
                files.append(current)
                hunk = None
                continue
            if current is None:
                continue
            match = _HUNK.match(raw_line)
            if match:
                old_no, new_no = int(match.group(1)), int(match.group(3))
                old_left = int(match.group(2)) if match.group(2) is not None else 1
                new_left = int(match.group(4)) if match.group(4) is not None else 1
                hunk = Hunk(header=raw_line)
                current.hunks.append(hunk)
                continue
            if hunk is not None and raw_line.startswith("\\"):
                hunk.lines.append(Line("note", raw_line))
                continue
            _file_header(current, raw_line)
            continue
        assert hunk is not None and current is not None
        tag, body = raw_line[:1], raw_line[1:]
        if tag == "+":
            hunk.lines.append(Line("add", body, new=new_no))
            new_no, new_left = new_no + 1, new_left - 1
            current.added += 1
        elif tag == "-":
            hunk.lines.append(Line("del", body, old=old_no))
            old_no, old_left = old_no + 1, old_left - 1
            current.removed += 1
        elif tag == "\\":
            hunk.lines.append(Line("note", raw_line))
        else:  # context (" ", or an empty line some tools strip to "")
            hunk.lines.append(Line("context", body, old=old_no, new=new_no))
            old_no, new_no = old_no + 1, new_no + 1
            old_left, new_left = old_left - 1, new_left - 1
    view = DiffView(files=files, raw=text)
    if sum(len(h.lines) for f in files for h in f.hunks) <= HIGHLIGHT_MAX_LINES:
        for f in files:
            _highlight(f)
    return view


def _file_header(current: FileDiff, line: str) -> None:
    """Apply one extended header line (mode, rename, ``---``/``+++``, binary) to ``current``."""
    if line.startswith("new file mode"):
        current.status = "added"
        current.old_path = None
    elif line.startswith("deleted file mode"):
        current.status = "deleted"
        current.new_path = None
    elif line.startswith("rename from "):
        current.status = "renamed"
        current.old_path = _unquote(line[len("rename from ") :])
    elif line.startswith("rename to "):
        current.status = "renamed"
        current.new_path = _unquote(line[len("rename to ") :])
    elif line.startswith("--- "):
        if current.status != "added":
            current.old_path = _strip_prefix(line[4:]) or current.old_path
    elif line.startswith("+++ "):
        if current.status != "deleted":
            current.new_path = _strip_prefix(line[4:]) or current.new_path
    elif line.startswith(("Binary files ", "GIT binary patch")):
        current.binary = True


def _css_class(ttype: _TokenType) -> str:
    while ttype not in STANDARD_TYPES:
        ttype = ttype.parent
    return str(STANDARD_TYPES.get(ttype, ""))


def _lexer(path: str) -> Lexer | None:
    try:
        return get_lexer_for_filename(path, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


def _tokenize(lexer: Lexer, lines: list[Line]) -> None:
    """Lex the lines as one text and hand each line its tokens."""
    text = "\n".join(line.text for line in lines)
    per_line: list[list[Token]] = [[]]
    for ttype, value in lexer.get_tokens(text):
        css = _css_class(ttype)
        pieces = value.split("\n")
        for i, piece in enumerate(pieces):
            if i:
                per_line.append([])
            if piece:
                per_line[-1].append((css, piece))
    for line, tokens in zip(lines, per_line, strict=False):
        line.tokens = tokens


def _highlight(f: FileDiff) -> None:
    if f.binary:
        return
    lexer = _lexer(f.path)
    if lexer is None:
        return
    for hunk in f.hunks:
        # Each side is lexed as one text with its context, so tokens see what surrounds them.
        _tokenize(lexer, [ln for ln in hunk.lines if ln.kind in ("context", "del")])
        _tokenize(lexer, [ln for ln in hunk.lines if ln.kind in ("context", "add")])
