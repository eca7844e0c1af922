"""The attempt's result as a git diff against its base commit, computed inside a sandbox.

The workspace's ``.git`` is agent-controlled after the run (hooks, ``core.fsmonitor``, filters,
external diff drivers, ``.gitattributes``), so host-side git never touches it: git runs in a
fresh sandbox without network, with those features switched off on the command line, and writes
the diff to a directory bound only for this run. The same script runs in the agent's own
sandbox once Codex has exited (``codex.launcher(after=…)``), which saves starting a second one.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import shlex
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from openwham.sandbox.bwrap import SANDBOX_WORKSPACE, Limits, SandboxSpec
from openwham.sandbox.disk import DiskBudget
from openwham.sandbox.provider import BUBBLEWRAP, SandboxProvider

from .files import read_capped

MAX_DIFF_BYTES = 20 << 20
OUT_DIR = "/openwham-out"
_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
_NAME = re.compile(r"(\.[0-9]{1,2})?")
# The agent controlled .git/config: filters ("clean" commands run by `git add`), fsmonitor,
# hooks paths, worktree and attributes settings; and $HOME (~/.gitconfig). Replace the
# repository's config with a plain one first and read no other; the workspace is thrown
# away afterwards. Drivers named in .gitattributes are then undefined. The environment's
# variables are none of git's business either (GIT_DIR, GIT_WORK_TREE, LD_PRELOAD, ... from
# an environment stored before such names were refused): the launcher starts the script with
# an empty environment and the script unsets whatever else it got. The script reports
# through files in OUT_DIR: `diff` (at most MAX_DIFF_BYTES + 1 bytes), `status`, `error`.
_SCRIPT = """\
set -u
for v in $(compgen -e); do unset "$v" 2>/dev/null; done
export PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8
out=@OUT@
rm -rf "$out/diff@NAME@" "$out/status@NAME@" "$out/error@NAME@"
(
  set -e -o pipefail
  export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null HOME=/nonexistent
  unset XDG_CONFIG_HOME
  cd @WORKSPACE@
  rm -f .git/config .git/info/attributes
  printf '@CONFIG@' > .git/config
  g() { git -c core.fsmonitor= -c core.hooksPath=/dev/null -c core.quotePath=false "$@"; }
  g add -A >/dev/null
  g diff --cached --binary --find-renames --no-ext-diff --no-textconv --no-color @BASE@ \\
    | head -c @LIMIT@ > "$out/diff@NAME@"
) 2>"$out/error@NAME@"
echo $? > "$out/status@NAME@"
"""
DIFF_SECONDS = 300.0
_LIMITS = Limits(
    wall_clock_seconds=DIFF_SECONDS,
    max_processes=256,
    memory_bytes=2 << 30,
    max_file_bytes=MAX_DIFF_BYTES + (1 << 20),
)


def script(base: str, *, workspace: str = SANDBOX_WORKSPACE, name: str = "") -> str:
    """The bash script that writes the diff of ``workspace`` against ``base`` (a commit
    sha) into :data:`OUT_DIR`; run in a sandbox that binds a fresh host directory there,
    then read with :func:`read_result`. ``name``: a suffix of its files there (``.0``,
    ``.1``, … for the repositories of a multi-repository workspace, :func:`scripts`)."""
    if not _SHA.fullmatch(base):
        raise ValueError(f"not a commit sha: {base!r}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad result name {name!r}")
    # The object format follows from the base's length (a SHA-256 repository's shas have
    # 64 digits), so the agent's config is not read at all.
    config = "[core]\\n\\trepositoryformatversion = 0\\n\\tbare = false\\n"
    if len(base) == 64:
        config = (
            "[core]\\n\\trepositoryformatversion = 1\\n\\tbare = false\\n"
            "[extensions]\\n\\tobjectformat = sha256\\n"
        )
    return (
        _SCRIPT.replace("@OUT@", OUT_DIR)
        .replace("@CONFIG@", config)
        .replace("@WORKSPACE@", shlex.quote(workspace))
        .replace("@BASE@", base)
        .replace("@LIMIT@", str(MAX_DIFF_BYTES + 1))
        .replace("@NAME@", name)
    )


def scripts(repos: list[tuple[str, str]]) -> str:
    """The diff scripts of the repositories of a multi-repository workspace, one after the
    other: ``repos`` are (directory in the workspace, base commit); the i-th writes its
    files with the suffix ``.i`` (read with ``read_result(out, name=f".{i}")``)."""
    return "\n".join(
        script(base, workspace=posixpath.join(SANDBOX_WORKSPACE, directory), name=f".{i}")
        for i, (directory, base) in enumerate(repos)
    )


class DiffError(RuntimeError):
    """The diff could not be computed; the message is shown to the user."""


class DiskExceeded(DiffError):
    """The diff's sandbox found the attempt over its disk budget (the message: the reason)."""


@dataclass(frozen=True)
class Diff:
    text: str
    #: a multi-repository workspace's diffs, one per repository in order (``text``: the first)
    repos: tuple[str, ...] = ()


def workspace_diff(
    workspace: Path,
    base: str,
    *,
    scratch: Path | None = None,
    seconds: float = DIFF_SECONDS,
    disk: DiskBudget | None = None,
    sandbox: SandboxProvider = BUBBLEWRAP,
    repos: list[tuple[str, str]] | None = None,
) -> Diff:
    """The diff computed in a sandbox of its own from ``sandbox``, within ``seconds`` (the
    engine instead runs :func:`script` in the agent's sandbox after Codex exits) and
    ``disk``, the attempt's disk budget (:class:`DiskExceeded` beyond it). ``repos``: a
    multi-repository workspace's (:func:`scripts`); the answer is then the first one's, and
    ``Diff.repos`` has each one's."""
    out = Path(tempfile.mkdtemp(prefix="diff-", dir=scratch))
    limits = dataclasses.replace(_LIMITS, wall_clock_seconds=max(1.0, min(seconds, DIFF_SECONDS)))
    try:
        result = sandbox.run(
            SandboxSpec(workspace=workspace, rw_binds={out: OUT_DIR}, limits=limits, disk=disk),
            ["/bin/bash", "-c", scripts(repos) if repos else script(base)],
        )
        if result.disk_reason is not None:
            raise DiskExceeded(result.disk_reason)
        first = ".0" if repos else ""
        if not result.ok and not (out / f"status{first}").exists():
            reason = result.killed_reason or result.stderr.strip()[-1000:]
            raise DiffError(f"Computing the diff failed: {reason}")
        if repos:
            return read_results(out, len(repos), killed_reason=result.killed_reason)
        return read_result(out, killed_reason=result.killed_reason)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def read_results(out: Path, count: int, *, killed_reason: str | None = None) -> Diff:
    """What :func:`scripts` left in ``out`` for ``count`` repositories: the first one's
    diff, with every one's in ``repos`` (in order)."""
    each = [read_result(out, killed_reason=killed_reason, name=f".{i}") for i in range(count)]
    total = sum(len(d.text) for d in each)
    if total > MAX_DIFF_BYTES:
        raise DiffError(f"The change is larger than {MAX_DIFF_BYTES >> 20} MiB")
    return Diff(each[0].text, tuple(d.text for d in each))


def read_result(out: Path, *, killed_reason: str | None = None, name: str = "") -> Diff:
    """What :func:`script` left in ``out`` (the host side of :data:`OUT_DIR`). Nothing
    there is trusted: files are opened without following links and read with a size cap."""
    data = _read(out / f"diff{name}", MAX_DIFF_BYTES + 1)
    if data is not None and len(data) > MAX_DIFF_BYTES:
        raise DiffError(f"The change is larger than {MAX_DIFF_BYTES >> 20} MiB")
    status = (_read(out / f"status{name}", 16) or b"").strip()
    if status != b"0" or data is None:
        if killed_reason and "file size limit" in killed_reason:
            raise DiffError(f"The change is larger than {MAX_DIFF_BYTES >> 20} MiB")
        error = (_read(out / f"error{name}", 64 << 10) or b"").decode("utf-8", "replace").strip()
        reason = killed_reason or error[-1000:] or f"exit status {status.decode() or '?'}"
        raise DiffError(f"Computing the diff failed: {reason}")
    return Diff(data.decode("utf-8", errors="replace"))


def _read(path: Path, limit: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return read_capped(f, limit)
