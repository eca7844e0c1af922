"""The attempt's result as a git diff against its base commit, computed inside a sandbox.

The workspace's ``.git`` is agent-controlled after the run (hooks, ``core.fsmonitor``, filters,
external diff drivers, ``.gitattributes``), so host-side git never touches it: git runs in a
fresh sandbox without network, with those features switched off on the command line, and writes
the diff to a directory bound only for this run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from openwham.sandbox import bwrap
from openwham.sandbox.bwrap import Limits, SandboxSpec

MAX_DIFF_BYTES = 20 << 20
# The agent controlled .git/config: filters ("clean" commands run by `git add`), fsmonitor,
# hooks paths, worktree and attributes settings. Replace it with a plain one first; the
# workspace is thrown away afterwards. Drivers named in .gitattributes are then undefined.
_SCRIPT = (
    "set -e\n"
    "fmt=$(git config --file .git/config extensions.objectformat || true)\n"
    "rm -f .git/config .git/info/attributes\n"
    "printf '[core]\\n\\trepositoryformatversion = 0\\n\\tbare = false\\n' > .git/config\n"
    'if [ -n "$fmt" ]; then git config --file .git/config core.repositoryformatversion 1;'
    ' git config --file .git/config extensions.objectformat "$fmt"; fi\n'
    'g() { git -c core.fsmonitor= -c core.hooksPath=/dev/null -c core.quotePath=false "$@"; }\n'
    "g add -A >/dev/null\n"
    "g diff --cached --binary --find-renames --no-ext-diff --no-textconv --no-color"
    ' "$1" > /openwham-out/diff'
)
DIFF_SECONDS = 300.0
_LIMITS = Limits(
    wall_clock_seconds=DIFF_SECONDS,
    max_processes=256,
    memory_bytes=2 << 30,
    max_file_bytes=MAX_DIFF_BYTES + (1 << 20),
)


class DiffError(RuntimeError):
    """The diff could not be computed; the message is shown to the user."""


@dataclass(frozen=True)
class Diff:
    text: str


def workspace_diff(
    workspace: Path, base: str, *, scratch: Path | None = None, seconds: float = DIFF_SECONDS
) -> Diff:
    """``git add -A && git diff --cached --binary <base>`` in a sandbox, within ``seconds``."""
    out = Path(tempfile.mkdtemp(prefix="diff-", dir=scratch))
    limits = dataclasses.replace(_LIMITS, wall_clock_seconds=max(1.0, min(seconds, DIFF_SECONDS)))
    try:
        result = bwrap.run(
            SandboxSpec(workspace=workspace, rw_binds={out: "/openwham-out"}, limits=limits),
            ["/bin/bash", "-c", _SCRIPT, "diff", base],
        )
        if not result.ok:
            reason = result.killed_reason or result.stderr.strip()[-1000:]
            if "file size limit" in (result.killed_reason or ""):
                raise DiffError(f"The change is larger than {MAX_DIFF_BYTES >> 20} MiB")
            raise DiffError(f"Computing the diff failed: {reason}")
        fd = os.open(out / "diff", os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_DIFF_BYTES + 1)
        if len(data) > MAX_DIFF_BYTES:
            raise DiffError(f"The change is larger than {MAX_DIFF_BYTES >> 20} MiB")
        return Diff(data.decode("utf-8", errors="replace"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
