"""An attempt's files outside the database: ``DATA_DIR/attempts/<turn id>``.

While an attempt runs the directory holds its workspace, home, Codex home and result files
(``out``). What stays afterwards depends on how it ended (:func:`tidy`): a completed attempt
keeps only its Codex home, cut down to its session rollouts and configuration
(:func:`compact_codex_home`), and the ``closed`` marker (a follow-up resumes its session from
them); a failed or cancelled one keeps nothing (follow-ups start only from completed
attempts). Deleting a task removes its attempts' directories; a fork copies the Codex homes
of the attempts it copies. At start the engine sweeps the directory (:func:`sweep`): whatever
a deleted turn, a crash (an attempt failed as ``executor_lost``) or an older version left
behind is tidied the same way (a completed attempt whose server died before it wrote the
``closed`` marker gets it: its sandbox died with that server; one with no Codex home, what a
crash leaves when it cuts short the removal of the directory, keeps nothing); attempts still
pending or running are not touched.

Other nodes cannot read this directory, so with an
:class:`~openwham.store.artifacts.ArtifactStore` (the database by default; every engine has
one) a completed attempt's compacted Codex home goes to the store at the end of its run
(:func:`tidy`), or at the start-up sweep when its server died first (:func:`store_session`),
and its directory is removed then: a node keeps only what it needs itself (workspaces of
running attempts, standbys, mirrors), and deleting a task deletes its sessions on every node
at once. Follow-ups and forks on any node unpack the stored session
(:func:`restore_codex_home`, :func:`copy_sessions`). A session too big for the store
(``WHAM_ARTIFACT_MAX_MB``) stays here, as before the store: the store records why, and only
this node can resume it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from sqlalchemy import select

from openwham.store import models as m
from openwham.store.artifacts import ArtifactError, ArtifactStore, ArtifactTooLarge
from openwham.store.db import Database
from openwham.store.status import ACTIVE, TurnStatus

from . import artifacts as packing

log = logging.getLogger(__name__)

CODEX_HOME = "codex-home"
CLOSED_MARKER = "closed"  # in an attempt's directory once its sandbox is gone
STORED = "stored\n"  # the closed marker's text once its session is in the ArtifactStore


def _dir(root: Path, turn_id: str) -> Path | None:
    if not turn_id or "/" in turn_id or turn_id.startswith(".") or "\0" in turn_id:
        return None
    return root / turn_id


def remove_tree(path: Path) -> None:
    """Remove a tree an agent wrote, whatever shape it gave it: ``shutil.rmtree`` stops at
    Python's recursion limit (a few thousand nested directories, made in a second) and,
    for a server that is not root, at directories made unreadable (``chmod 000``, its own
    files); ``rm -rf`` after ``chmod -R u+rwx`` removes what it left."""
    with contextlib.suppress(RecursionError):
        shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if os.geteuid() != 0 and not path.is_symlink():
            subprocess.run(
                ["chmod", "-R", "u+rwx", "--", str(path)], capture_output=True, timeout=600
            )
        subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True, timeout=600
        )
    if os.path.lexists(path):
        log.warning("could not remove %s", path)


def remove(root: Path, turn_ids: Iterable[str], artifacts: ArtifactStore) -> None:
    """Remove the attempts' directories (whatever is left of them) and their artifacts (a
    deleted task: its sessions go for every node)."""
    turn_ids = list(turn_ids)
    for turn_id in turn_ids:
        path = _dir(root, turn_id)
        if path is not None:
            remove_tree(path)
    try:
        artifacts.delete(turn_ids)
    except ArtifactError:  # the rows are gone already: the orphan sweep deletes them later
        log.warning("could not delete the artifacts of %d attempt(s)", len(turn_ids), exc_info=True)


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


# What Codex writes in its home that a follow-up does not need: its bundled skills (~400 KB,
# written again at every start), scratch files, and its state databases (a schema of some
# 70 tables is ~280 KB with no rows that matter; WALs reach 600 KB): resuming reads the
# session rollout under ``sessions/`` and Codex creates the databases again.
_DROPPED_DIRS = frozenset({"skills", "tmp", "shell_snapshots", "thread-writer-locks"})
_DROPPED_SUFFIXES = (".sqlite", ".sqlite-wal", ".sqlite-shm", ".sqlite-journal")


def compact_codex_home(home: Path) -> None:
    """Cut an ended attempt's Codex home down to what a follow-up or a fork resumes from
    (its session rollouts and configuration): called once its sandbox is gone, before the
    ``closed`` marker lets a follow-up copy it. The agent wrote there: entries are removed
    as links, never followed."""
    if home.is_symlink() or not home.is_dir():
        return
    with os.scandir(home) as entries:
        for entry in list(entries):
            if entry.name in _DROPPED_DIRS or entry.name.endswith(_DROPPED_SUFFIXES):
                if entry.is_dir(follow_symlinks=False):
                    remove_tree(Path(entry.path))
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


FORK_WAIT_SECONDS = 5.0  # Codex closes in well under a second once its result is in
# How long a fork or a follow-up on a node without the attempt's files waits for its stored
# session: the node that ran it stores it once Codex closed (at most ~10 s after completion).
STORED_WAIT_SECONDS = 30.0
_POLL_SECONDS = 0.05


class SessionUnavailable(ArtifactError):
    """A follow-up cannot resume the previous attempt's Codex session; the message says why."""


def copy_sessions(
    root: Path,
    mapping: dict[str, str],
    artifacts: ArtifactStore,
    ended_at: Mapping[str, float] | None = None,
) -> None:
    """Copy each old attempt's Codex session to the new attempt (a fork): its stored one,
    else (too big for the store) its files on this node. An attempt forked the moment it
    completed may still be closing down: wait a little for its stored session or its
    ``closed`` marker, but only until ``STORED_WAIT_SECONDS`` after it ended (``ended_at``,
    epoch seconds per old attempt): a session not stored by then never will be, and the fork
    is an API request that must not hang on it."""
    now = time.time()
    for old, new in mapping.items():
        source, dest = _dir(root, old), _dir(root, new)
        if source is None or dest is None:
            continue
        wait = STORED_WAIT_SECONDS
        if ended_at is not None and old in ended_at:
            wait = min(wait, max(0.0, ended_at[old] + STORED_WAIT_SECONDS - now))
        name = _wait_stored(artifacts, old, wait)
        data = artifacts.get(old, name) if name is not None else None
        if name == packing.CODEX_HOME and data is not None:
            artifacts.put(new, name, data)
            continue
        if not (source / CODEX_HOME).is_dir():
            why = "Its Codex session was not stored yet when the task was forked"
            if name == packing.CODEX_HOME_MISSING and data is not None:
                why = data.decode("utf-8", "replace")
            artifacts.put(new, packing.CODEX_HOME_MISSING, why.encode())
            continue
        _copy_local(source, dest)  # too big for the store: this node's files
        if store_session(artifacts, dest, new):
            remove_tree(dest)


def _copy_local(source: Path, dest: Path) -> None:
    """A fork's copy of this node's files of an attempt's Codex home."""
    if (source / CODEX_HOME).is_dir():
        deadline = time.monotonic() + FORK_WAIT_SECONDS
        while not (source / CLOSED_MARKER).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        dest.mkdir(parents=True, mode=0o700, exist_ok=True)
        with contextlib.suppress(shutil.Error):  # files the source's end removed meanwhile
            copy_codex_home(source / CODEX_HOME, dest / CODEX_HOME)
        compact_codex_home(dest / CODEX_HOME)
        (dest / CLOSED_MARKER).touch()


def _wait_stored(artifacts: ArtifactStore, turn_id: str, wait: float) -> str | None:
    """The name under which ``turn_id``'s session (or why there is none) is stored, waiting
    up to ``wait`` seconds for it; ``None`` when nothing came."""
    deadline = time.monotonic() + wait
    while True:
        for name in (packing.CODEX_HOME, packing.CODEX_HOME_MISSING):
            if artifacts.present([turn_id], name):
                return name
        if time.monotonic() >= deadline:
            return None
        time.sleep(_POLL_SECONDS)


def store_session(artifacts: ArtifactStore, attempt_dir: Path, turn_id: str) -> bool:
    """Store a completed attempt's (compacted) Codex home for follow-ups and forks on every
    node; whether it is stored (then the files here are not needed). One too big for the
    store (``WHAM_ARTIFACT_MAX_MB``) is not: why is, so that a follow-up elsewhere says so,
    and the files stay for follow-ups on this node."""
    if not _has_codex_home(attempt_dir):
        return False
    try:
        data = packing.pack(attempt_dir / CODEX_HOME, artifacts.max_bytes)
    except ArtifactTooLarge as exc:
        log.warning("attempt %s: %s; not stored for other nodes", turn_id, exc)
        artifacts.put(turn_id, packing.CODEX_HOME_MISSING, str(exc).encode())
        _mark_stored(attempt_dir)
        return False
    artifacts.put(turn_id, packing.CODEX_HOME, data)
    return True


def _mark_stored(attempt_dir: Path) -> None:
    """Note in the ``closed`` marker (the attempt's directory is the server's, never bound
    into a sandbox) that why its session is not stored is, so that the start-up sweep does
    not ask again."""
    with contextlib.suppress(OSError):
        (attempt_dir / CLOSED_MARKER).write_text(STORED)


def _marked_stored(attempt_dir: Path) -> bool:
    try:
        return (attempt_dir / CLOSED_MARKER).read_text() == STORED
    except (OSError, UnicodeDecodeError):
        return False


def restore_codex_home(
    root: Path,
    artifacts: ArtifactStore | None,
    previous_turn_id: str,
    dest: Path,
    *,
    wait: float,
    stored_wait: float = STORED_WAIT_SECONDS,
) -> None:
    """Make ``dest`` (a follow-up's Codex home, not there yet) a copy of the previous
    attempt's: its stored session (waiting up to ``stored_wait`` for the node that ran it
    to store it once Codex closed), else (too big for the store, or no store) this node's
    files once that attempt's sandbox is gone (``closed``, waiting up to ``wait``).
    :class:`ArtifactError` says why it cannot."""
    name = data = None
    if artifacts is not None:
        name = _wait_stored(artifacts, previous_turn_id, stored_wait)
        data = artifacts.get(previous_turn_id, name) if name is not None else None
        if name == packing.CODEX_HOME and data is not None:
            try:
                packing.unpack(data, dest, artifacts.max_bytes)
            except BaseException:
                remove_tree(dest)
                raise
            return
    source = root / previous_turn_id / CODEX_HOME
    closed = root / previous_turn_id / CLOSED_MARKER
    deadline = time.monotonic() + wait
    while not closed.exists() and source.is_dir() and time.monotonic() < deadline:
        time.sleep(0.02)
    if source.is_dir():  # the node that ran it, which could not store it
        copy_codex_home(source, dest)
        return
    if name == packing.CODEX_HOME_MISSING and data is not None:
        why = data.decode("utf-8", "replace")
        raise SessionUnavailable(
            f"The previous attempt ran on another node and its Codex session was not stored "
            f"for other nodes: {why}. Start a new task instead"
        )
    raise SessionUnavailable(
        "The previous attempt's Codex session is neither stored nor on this node (waited "
        f"{stored_wait:.0f} s; its task data was deleted, or the node that ran it stopped "
        "before storing it: it does when it starts again, then recover this attempt)"
    )


KEEP_AFTER_COMPLETION = frozenset({CODEX_HOME, CLOSED_MARKER})


def _statuses(db: Database, turn_ids: list[str]) -> dict[str, str]:
    with db.sessions() as s:
        rows = s.execute(select(m.Turn.id, m.Turn.turn_status).where(m.Turn.id.in_(turn_ids)))
        return {turn_id: status or "" for turn_id, status in rows}


def _prune(path: Path, keep: frozenset[str]) -> int:
    """Remove every entry of ``path`` but ``keep``; how many were removed."""
    removed = 0
    with os.scandir(path) as entries:
        for entry in list(entries):
            if entry.name in keep:
                continue
            removed += 1
            if entry.is_dir(follow_symlinks=False):
                remove_tree(Path(entry.path))
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    return removed


def _removes(status: str | None) -> bool:
    """Whether an attempt in ``status`` (``None``: the turn is gone) keeps nothing."""
    return status is None or (status not in ACTIVE and status is not TurnStatus.COMPLETED)


def _has_codex_home(attempt_dir: Path) -> bool:
    home = attempt_dir / CODEX_HOME
    return home.is_dir() and not home.is_symlink()


def _tidy_one(root: Path, turn_id: str, status: str | None, *, active: bool) -> bool:
    """Tidy one attempt directory by its turn's ``status`` (``None``: the turn is gone);
    ``active``: also prune an attempt still pending or running (its own executor, at the
    end of its run). Whether anything was removed."""
    path = _dir(root, turn_id)
    if path is None or not path.is_dir():
        return False
    if _removes(status):
        remove_tree(path)
        return True
    if status in ACTIVE and not active:
        return False
    if status is TurnStatus.COMPLETED and not _has_codex_home(path):
        # nothing a follow-up could resume from: what a removal cut short by a crash leaves
        # (its session stored, the server killed once the Codex home went: the ``closed``
        # marker, or an empty directory), which marking it closed would keep for good
        remove_tree(path)
        return True
    removed = _prune(path, KEEP_AFTER_COMPLETION)
    if not active and not (path / CLOSED_MARKER).exists():
        # completed, but its server died before marking the sandbox gone (it went with the
        # server): without the marker a follow-up would wait for it before copying the session
        compact_codex_home(path / CODEX_HOME)
        with contextlib.suppress(OSError):
            (path / CLOSED_MARKER).touch()
        return True
    return removed > 0


def tidy(root: Path, db: Database, turn_id: str, artifacts: ArtifactStore | None = None) -> None:
    """The end of an attempt (called by the executor that ran it): keep what a follow-up
    needs, remove the rest (workspace, home, ``out`` and anything else the run left); with
    ``artifacts``, store a completed attempt's session there and remove the directory."""
    try:
        status = _statuses(db, [turn_id]).get(turn_id)
    except Exception:  # the database is away: the next start-up sweep finishes the job
        log.warning("could not look up attempt %s; removing its workspace only", turn_id)
        for name in ("workspace", "overlay-upper", "overlay-work", "home", "out"):
            remove_tree(root / turn_id / name)
        return
    _tidy_one(root, turn_id, status, active=True)
    if artifacts is None or _dir(root, turn_id) is None:
        return
    try:
        if status is TurnStatus.COMPLETED:
            if store_session(artifacts, root / turn_id, turn_id):
                remove_tree(root / turn_id)  # every node reads it from the store now
        elif _removes(status):
            artifacts.delete([turn_id])
    except Exception:  # the store is away: the next start-up sweep stores it
        log.warning("could not store the session of attempt %s", turn_id, exc_info=True)


def sweep(root: Path, db: Database, artifacts: ArtifactStore | None = None) -> None:
    """Tidy every attempt directory by its turn (gone, failed and cancelled: removed;
    completed: its Codex home only); attempts pending or running are left alone. With
    ``artifacts``: completed attempts whose session is not stored yet (their server died
    first, or ran an older version) get it stored and their files removed, and removed
    attempts lose theirs."""
    names = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    tidied = stored = 0
    for start in range(0, len(names), 500):
        chunk = names[start : start + 500]
        statuses = _statuses(db, chunk)
        for name in chunk:
            tidied += _tidy_one(root, name, statuses.get(name), active=False)
        if artifacts is not None:
            stored += _sweep_stored(root, artifacts, chunk, statuses)
    if tidied:
        log.info("tidied the files of %d finished or deleted attempt(s)", tidied)
    if stored:
        log.info("stored the Codex sessions of %d completed attempt(s)", stored)


def _sweep_stored(
    root: Path, artifacts: ArtifactStore, names: list[str], statuses: dict[str, str]
) -> int:
    """Store the sessions of the completed attempts among ``names`` that have none stored
    and remove their files (stored already: only remove them); delete those of removed
    attempts. How many were stored."""
    gone = [n for n in names if _removes(statuses.get(n))]
    done = [
        n
        for n in names
        if statuses.get(n) is TurnStatus.COMPLETED
        and _has_codex_home(root / n)
        and not _marked_stored(root / n)
    ]
    stored = 0
    try:
        if gone:
            artifacts.delete(gone)
        if done:
            have = artifacts.present(done, packing.CODEX_HOME)
            missing = artifacts.present(done, packing.CODEX_HOME_MISSING)
            for name in done:
                if name in have:
                    remove_tree(root / name)
                elif name in missing:
                    _mark_stored(root / name)
                elif store_session(artifacts, root / name, name):
                    remove_tree(root / name)
                    stored += 1
    except Exception:
        log.warning("could not store the sessions of completed attempts", exc_info=True)
    return stored


SCRATCH_MAX_AGE = 3600.0  # a PR push's scratch repository lives seconds (git times out at 600)


def sweep_scratch(directory: Path, *, max_age: float = SCRATCH_MAX_AGE) -> None:
    """Remove PR pushes' scratch repositories (``DATA_DIR/tmp/pr-*``) a crash left behind:
    those older than ``max_age`` (a younger one may be another process's push under way)."""
    if not directory.is_dir():
        return
    cutoff = time.time() - max_age
    for path in directory.glob("pr-*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)


ORPHAN_SWEEP_SECONDS = 6 * 3600.0


def sweep_orphans(db: Database, artifacts: ArtifactStore) -> int:
    """Delete the artifacts whose turn is gone; how many turns' artifacts were deleted.

    A store outside the database (a bucket) is not deleted from in the transaction that
    deletes a task: a crash or an unreachable bucket in between leaves objects no turn
    refers to. A turn's artifacts are only ever written while its row exists, so one listed
    here whose row is missing is an orphan for good (a later write for a deleted turn, a
    superseded run's, is found by the next sweep)."""
    deleted = 0
    chunk: list[str] = []

    def flush() -> None:
        nonlocal deleted
        known = _statuses(db, chunk)
        gone = [turn_id for turn_id in chunk if turn_id not in known]
        if gone:
            artifacts.delete(gone)
            deleted += len(gone)
        chunk.clear()

    for turn_id in artifacts.turns():
        chunk.append(turn_id)
        if len(chunk) >= 500:
            flush()
    if chunk:
        flush()
    if deleted:
        log.info("deleted the stored artifacts of %d attempt(s) that no longer exist", deleted)
    return deleted


class OrphanSweeper:
    """Runs :func:`sweep_orphans` at start and every ``interval`` seconds in a thread of its
    own (listing a large bucket must not hold up a node's start); ``stop`` ends it."""

    def __init__(
        self, db: Database, artifacts: ArtifactStore, interval: float = ORPHAN_SWEEP_SECONDS
    ) -> None:
        self.db, self.artifacts, self.interval = db, artifacts, interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="artifact-orphans", daemon=True)

    def start(self) -> OrphanSweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                sweep_orphans(self.db, self.artifacts)
            except Exception:  # the store or the database is away: the next round tries
                log.warning("could not sweep orphaned artifacts", exc_info=True)
            if self._stopped.wait(self.interval):
                return
