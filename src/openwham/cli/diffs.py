"""A unified diff on a terminal, as git shows it: coloured lines and ``--stat``.

Lines are classified by walking the hunks with their ``@@ -a,b +c,d @@`` line counts, so a
removed line that reads ``-- x`` (``--- x`` in the diff) is a removal, not a file header.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

Kind = Literal["meta", "hunk", "add", "del", "context", "other"]

# git's default colours: meta bold, fragment cyan, new green, old red.
RESET = "\x1b[m"
STYLE: dict[Kind, str] = {
    "meta": "\x1b[1m",
    "hunk": "\x1b[36m",
    "add": "\x1b[32m",
    "del": "\x1b[31m",
}
_HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")
_META = (
    "diff --git ",
    "index ",
    "--- ",
    "+++ ",
    "new file mode ",
    "deleted file mode ",
    "old mode ",
    "new mode ",
    "similarity index ",
    "dissimilarity index ",
    "rename from ",
    "rename to ",
    "copy from ",
    "copy to ",
    "Binary files ",
    "GIT binary patch",
)
STAT_WIDTH = 80  # git's --stat width when stdout is not a terminal


def classify(text: str) -> Iterator[tuple[Kind, str]]:
    """Each line of a unified diff (without its newline) with what it is."""
    old = new = 0  # lines left in the current hunk
    for line in text.splitlines():
        if old > 0 or new > 0:
            if line.startswith("+"):
                new -= 1
                yield "add", line
                continue
            if line.startswith("-"):
                old -= 1
                yield "del", line
                continue
            if line.startswith(" ") or line == "":
                old, new = old - 1, new - 1
                yield "context", line
                continue
            if line.startswith("\\"):
                yield "context", line
                continue
            old = new = 0  # a malformed hunk: read on as headers
        match = _HUNK.match(line)
        if match:
            old = int(match.group(1) or "1")
            new = int(match.group(2) or "1")
            yield "hunk", line
        elif line.startswith("\\"):  # "\ No newline at end of file" after the last hunk line
            yield "context", line
        elif line.startswith(_META):
            yield "meta", line
        else:
            yield "other", line


def colored(text: str) -> str:
    """The diff with git's colours (ANSI); a hunk header's trailing context stays plain."""
    out = []
    for kind, line in classify(text):
        style = STYLE.get(kind)
        if kind == "hunk":
            end = line.index("@@", 2) + 2
            out.append(f"{style}{line[:end]}{RESET}{line[end:]}")
        elif style:
            out.append(f"{style}{line}{RESET}")
        else:
            out.append(line)
    return "".join(f"{line}\n" for line in out)


@dataclass
class FileStat:
    path: str
    added: int = 0
    removed: int = 0
    binary: bool = False


def _path(line: str, prefix: str) -> str | None:
    """The file name of a ``---`` / ``+++`` header without ``a/`` or ``b/``; a name git
    quoted (special characters) stays quoted, as ``git diff --stat`` shows it."""
    name = line[len(prefix) :].split("\t", 1)[0]
    if name == "/dev/null":
        return None
    if len(name) >= 4 and name[0] == name[-1] == '"' and name[1:3] in ("a/", "b/"):
        return f'"{name[3:]}'
    return name[2:] if name[:2] in ("a/", "b/") else name


def stats(text: str) -> list[FileStat]:
    """Lines added and removed per file, in the diff's order."""
    files: list[FileStat] = []
    current: FileStat | None = None
    old_path: str | None = None
    renamed: tuple[str, str] | None = None
    for kind, line in classify(text):
        if kind == "meta":
            if line.startswith("diff --git ") or (
                line.startswith("--- ") and (current is None or current.added or current.removed)
            ):
                current, old_path, renamed = FileStat(""), None, None
                files.append(current)
                if line.startswith("diff --git "):
                    # "diff --git a/x b/x": the name until headers say more (mode-only changes)
                    current.path = line.rsplit(" b/", 1)[-1]
            if current is None:
                continue
            if line.startswith("--- "):
                old_path = _path(line, "--- ")
                current.path = old_path or current.path
            elif line.startswith("+++ "):
                current.path = _path(line, "+++ ") or old_path or current.path
            elif line.startswith("rename from "):
                renamed = (line[len("rename from ") :], "")
            elif line.startswith("rename to ") and renamed:
                current.path = rename_text(renamed[0], line[len("rename to ") :])
            elif line.startswith(("Binary files ", "GIT binary patch")):
                current.binary = True
        elif current is not None and kind == "add":
            current.added += 1
        elif current is not None and kind == "del":
            current.removed += 1
    return files


def rename_text(a: str, b: str) -> str:
    """A renamed file as git's --stat names it: ``dir/{old.py => new.py}``."""
    if a.startswith('"') or b.startswith('"'):
        return f"{a} => {b}"
    prefix = 0  # common leading directories, with their "/"
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            break
        if x == "/":
            prefix = i + 1
    suffix = 0  # common trailing part from a "/"
    i, j = len(a) - 1, len(b) - 1
    stop = prefix - 1 if prefix else 0
    while i >= stop and j >= stop and a[i] == b[j]:
        if a[i] == "/":
            suffix = len(a) - i
        i, j = i - 1, j - 1
    a_mid = a[prefix : max(prefix, len(a) - suffix)]
    b_mid = b[prefix : max(prefix, len(b) - suffix)]
    if not prefix and not suffix:
        return f"{a} => {b}"
    return f"{a[:prefix]}{{{a_mid} => {b_mid}}}{a[len(a) - suffix :]}"


def _scale(it: int, width: int, max_change: int) -> int:
    """git's scale_linear: a non-zero count keeps at least one mark."""
    return 0 if it == 0 else 1 + (it * (width - 1) // max_change)


def _shorten(name: str, width: int) -> str:
    """A name too long for ``width`` as git shortens it: ``...`` and its tail, from a ``/``."""
    if len(name) <= width:
        return name
    tail = name[len(name) - max(0, width - 3) :] if width > 3 else ""
    slash = tail.find("/")
    return "..." + (tail[slash:] if slash >= 0 else tail)


def stat_text(files: list[FileStat], *, color: bool = False, width: int = STAT_WIDTH) -> str:
    """``git diff --stat`` (git 2.39's layout for ``width`` columns): `` path | N ++-`` per
    file, then the summary line. A binary file reads ``Bin`` (the diff has no sizes)."""
    number_width = 3 if any(f.binary for f in files) else 0
    max_change = max((f.added + f.removed for f in files if not f.binary), default=0)
    number_width = max(number_width, len(str(max_change)))
    width = max(width, 16 + 6 + number_width)
    graph_width = max_change
    name_width = max((len(f.path) for f in files), default=0)
    if name_width + number_width + 6 + graph_width > width:
        if graph_width > width * 3 // 8 - number_width - 6:
            graph_width = max(6, width * 3 // 8 - number_width - 6)
        if name_width > width - number_width - 6 - graph_width:
            name_width = width - number_width - 6 - graph_width
        else:
            graph_width = width - number_width - 6 - name_width
    green, red, reset = (STYLE["add"], STYLE["del"], RESET) if color else ("", "", "")
    lines = []
    for f in files:
        name = _shorten(f.path, name_width).ljust(name_width)
        if f.binary:
            lines.append(f" {name} | {'Bin'.rjust(number_width)}")
            continue
        add, rem = f.added, f.removed
        if graph_width <= max_change:
            total = _scale(add + rem, graph_width, max_change)
            if total < 2 and add and rem:
                total = 2
            if add < rem:
                add = _scale(add, graph_width, max_change)
                rem = total - add
            else:
                rem = _scale(rem, graph_width, max_change)
                add = total - rem
        count = f.added + f.removed
        graph = (f"{green}{'+' * add}{reset}" if add else "") + (
            f"{red}{'-' * rem}{reset}" if rem else ""
        )
        lines.append(f" {name} | {str(count).rjust(number_width)}{' ' if count else ''}{graph}")
    lines.append(summary_line(files))
    return "".join(f"{line}\n" for line in lines)


def summary_line(files: list[FileStat]) -> str:
    """`` 2 files changed, 3 insertions(+), 1 deletion(-)`` as git words it."""
    if not files:
        return " 0 files changed"
    added = sum(f.added for f in files)
    removed = sum(f.removed for f in files)
    parts = [f" {len(files)} file{'s' if len(files) != 1 else ''} changed"]
    if added or not removed:
        parts.append(f"{added} insertion{'s' if added != 1 else ''}(+)")
    if removed or not added:
        parts.append(f"{removed} deletion{'s' if removed != 1 else ''}(-)")
    return ", ".join(parts)
