"""An attempt's files outside the database: ``DATA_DIR/attempts/<turn id>``.

While an attempt runs the directory holds its workspace, home, Codex home and result files;
afterwards only the Codex home stays (a follow-up resumes from it). Deleting a task removes
its attempts' directories; a fork copies the Codex homes of the attempts it copies; at start
the engine removes directories whose turn no longer exists (a delete that crashed half-way,
or one served by an API-only server on another host).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select

from openwham.store import models as m
from openwham.store.db import Database

log = logging.getLogger(__name__)

CODEX_HOME = "codex-home"
CLOSED_MARKER = "closed"  # in an attempt's directory once its sandbox is gone


def _dir(root: Path, turn_id: str) -> Path | None:
    if not turn_id or "/" in turn_id or turn_id.startswith(".") or "\0" in turn_id:
        return None
    return root / turn_id


def remove(root: Path, turn_ids: Iterable[str]) -> None:
    """Remove the attempts' directories (whatever is left of them)."""
    for turn_id in turn_ids:
        path = _dir(root, turn_id)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def _special(directory: str, names: list[str]) -> set[str]:
    return {
        n
        for n in names
        if not (
            stat.S_ISREG(mode := os.lstat(os.path.join(directory, n)).st_mode)
            or stat.S_ISDIR(mode)
            or stat.S_ISLNK(mode)
        )
    }


def copy_codex_home(source: Path, dest: Path) -> None:
    """Copy a Codex home the agent wrote to: links are copied as links, anything but files
    and directories is left out (a FIFO would block the copy)."""
    shutil.copytree(source, dest, symlinks=True, ignore=_special)
    os.chmod(dest, 0o700)


def copy_sessions(root: Path, mapping: dict[str, str]) -> None:
    """Copy each old attempt's Codex home to the new attempt's directory (a fork)."""
    for old, new in mapping.items():
        source, dest = _dir(root, old), _dir(root, new)
        if source is None or dest is None or not (source / CODEX_HOME).is_dir():
            continue
        dest.mkdir(parents=True, mode=0o700, exist_ok=True)
        copy_codex_home(source / CODEX_HOME, dest / CODEX_HOME)
        (dest / CLOSED_MARKER).touch()


def sweep(root: Path, db: Database) -> None:
    """Remove the directories of turns that are gone from the database."""
    names = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for start in range(0, len(names), 500):
        chunk = names[start : start + 500]
        with db.sessions() as s:
            known = set(s.scalars(select(m.Turn.id).where(m.Turn.id.in_(chunk))))
        gone = [n for n in chunk if n not in known]
        if gone:
            log.info("removing the files of %d deleted attempt(s)", len(gone))
            remove(root, gone)
