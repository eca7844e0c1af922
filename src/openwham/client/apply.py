"""Applying an attempt's diff to a local checkout, the way ``codex cloud apply`` does.

``git apply --3way`` at the repository's top level, hooks and fsmonitor off, after a
``--check`` preflight. A patch that cannot apply at all changes nothing (git applies a patch
all or nothing); one that applies with conflicts leaves ``<<<<<<<`` markers and is
``partial``. Changes are staged (``--3way`` works through the index), as with ``codex apply``.
The paths come from ``git apply -v``'s per-file lines.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from openwham.client.attempts import looks_unified
from openwham.client.errors import WhamError

ApplyStatus = Literal["success", "partial", "error"]

_APPLIED = re.compile(r"^Applied patch (?:to )?'?(?P<path>.+?)'? cleanly\.$")
_CONFLICT = re.compile(r"^Applied patch to '(?P<path>.+)' with conflicts\.$")
_FAILED = (
    re.compile(r"^error: patch failed: (?P<path>.+):\d+$"),
    re.compile(
        r"^error: (?P<path>.+): (?:patch does not apply|does not exist in index|"
        r"already exists in (?:working directory|index)|does not match index|"
        r"No such file or directory)$"
    ),
)
_GIT_SAFETY = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")


class PatchDoesNotApply(WhamError):
    """The preflight found paths the patch cannot be applied to; nothing was changed."""

    def __init__(self, result: ApplyResult) -> None:
        self.result = result
        super().__init__(
            f"the patch does not apply: {', '.join(result.skipped) or 'see git output'}",
            hint="check out the branch the task started from (and commit or stash local "
            "changes to those files), then apply again",
        )


@dataclass
class ApplyResult:
    """What happened (or, with ``check``, would happen) to each path."""

    status: ApplyStatus
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    checked_only: bool = False
    output: str = ""

    @property
    def message(self) -> str:
        verb = "would apply" if self.checked_only else "applied"
        if self.status == "success":
            return f"{verb} cleanly ({len(self.applied)} file(s))"
        return (
            f"{'check: ' if self.checked_only else ''}{self.status}: "
            f"applied={len(self.applied)}, skipped={len(self.skipped)}, "
            f"conflicts={len(self.conflicts)}"
        )


def _parse(output: str) -> tuple[list[str], list[str], list[str]]:
    applied: list[str] = []
    conflicts: list[str] = []
    failed: list[str] = []
    for line in output.splitlines():
        line = line.strip()
        if m := _CONFLICT.match(line):
            _add(conflicts, m["path"])
        elif m := _APPLIED.match(line):
            _add(applied, m["path"])
        else:
            for pattern in _FAILED:
                if m := pattern.match(line):
                    _add(failed, m["path"])
                    break
    applied = [p for p in applied if p not in conflicts and p not in failed]
    return applied, failed, conflicts


def _add(paths: list[str], path: str) -> None:
    if path not in paths:
        paths.append(path)


def repo_root(path: Path) -> Path:
    """The top level of the git checkout containing ``path``."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as e:
        raise WhamError("git is not installed", hint="install git") from e
    if out.returncode != 0:
        raise WhamError(f"{path} is not inside a git repository")
    return Path(out.stdout.strip())


def _git_apply(
    root: Path, patch: Path, extra: Sequence[str], config: Sequence[str]
) -> tuple[int, str]:
    pairs = [arg for kv in config for arg in ("-c", kv)]
    cmd = ["git", *_GIT_SAFETY, *pairs, "apply", "--3way", "-v", *extra, str(patch)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def apply_diff(
    diff: str, repo: Path, *, check: bool = False, git_config: Sequence[str] = ()
) -> ApplyResult:
    """Preflight and (unless ``check``) apply ``diff``; raises :class:`PatchDoesNotApply` when
    the preflight fails (the checkout is untouched then)."""
    if not looks_unified(diff):
        raise WhamError("the task's diff is not a unified git diff")
    root = repo_root(repo.expanduser())
    with tempfile.TemporaryDirectory(prefix="wham-apply-") as tmp:
        patch = Path(tmp) / "task.diff"
        patch.write_text(diff if diff.endswith("\n") else diff + "\n")
        rc, output = _git_apply(root, patch, ["--check"], git_config)
        applied, failed, conflicts = _parse(output)
        if rc != 0:
            raise PatchDoesNotApply(
                ApplyResult("error", [], failed or applied, [], checked_only=True, output=output)
            )
        if check:
            status: ApplyStatus = "partial" if conflicts else "success"
            return ApplyResult(status, applied, [], conflicts, checked_only=True, output=output)
        rc, output = _git_apply(root, patch, [], git_config)
    applied, failed, conflicts = _parse(output)
    if rc == 0 and not conflicts:
        return ApplyResult("success", applied, failed, [], output=output)
    status = "partial" if applied or conflicts else "error"
    return ApplyResult(status, applied, failed, conflicts, output=output)
