"""Post-setup snapshots: what a successful setup script left, reused by later attempts.

A snapshot is taken from an overlay workspace (``sandbox.overlay``) right after its setup
script succeeded and before the agent starts: the attempt's upper directory (every file the
script wrote or deleted in ``/workspace``, ignored ones such as ``node_modules/`` included)
is *renamed* into the cache, a fresh empty upper directory takes its place and the snapshot
is stacked read-only between it and the checkout, so taking it costs a rename for the
workspace. The home directory is copied (``cp -a --reflink=auto``: a reflink where the file
system allows). A later attempt with the same key stacks the same directory under its own
empty upper directory and gets a copy of the home: the kernel copies a snapshot file up into
the attempt's upper directory before changing it, so no attempt can change the snapshot or
another attempt's files, and the snapshot is never bound into a sandbox.

``root/<environment hash>/<key>.<random>/`` holds ``upper``, ``home``, ``lease`` (sandboxes
using it hold a shared ``flock``) and ``ready`` (written last: JSON with the creation time
and size; its mtime is the last use). Snapshots expire ``max_age`` seconds after they were
taken; a different key for the same environment (changed setup script, variables, secrets,
cache invalidation key or commit) makes the older ones stale; beyond ``max_bytes`` the least
recently used go. Only what no sandbox holds is removed. The directory is the server's
(mode 0700): a snapshot holds whatever the setup script wrote, secrets included.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import overlay

READY = "ready"


def cache_key(parts: Mapping[str, object]) -> str:
    """The hash of what a snapshot depends on (secrets enter only through it)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _env_dir(env: str) -> str:
    return hashlib.sha256(env.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Snapshot:
    """One snapshot in the cache."""

    path: Path
    created: float
    size: int

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    @property
    def home(self) -> Path:
        return self.path / "home"


def _read(ready: Path) -> Snapshot | None:
    try:
        meta = json.loads(ready.read_text())
        return Snapshot(ready.parent, float(meta["created"]), int(meta["size"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _du(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def copy_tree(src: Path, dest: Path) -> None:
    """``src``'s contents into the existing directory ``dest`` with owners, modes, links,
    device nodes (overlay whiteouts) and extended attributes; reflinks where possible."""
    proc = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--", f"{src}/.", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise OSError(f"copying {src} failed: {proc.stderr.strip()[-500:]}")


class Snapshots:
    """The post-setup snapshot cache in ``root`` (see the module docstring)."""

    def __init__(
        self, root: Path, *, max_age: float, max_bytes: int, idle_seconds: float = 600.0
    ) -> None:
        self.root = root
        self.max_age = max_age
        self.max_bytes = max_bytes
        #: a snapshot used this recently stays (an attempt on it may be between sandboxes)
        self.idle_seconds = idle_seconds

    def _all(self) -> list[Snapshot]:
        found = []
        for ready in self.root.glob(f"*/*/{READY}"):
            snap = _read(ready)
            if snap is not None:
                found.append(snap)
        return found

    def find(self, env: str, key: str) -> Snapshot | None:
        """The newest fresh snapshot of ``env`` under ``key`` (its last use set to now), or
        ``None``; stale snapshots of ``env`` (another key) and expired ones are removed."""
        self.evict(env=env, key=key)
        now = time.time()
        best: Snapshot | None = None
        for ready in (self.root / _env_dir(env)).glob(f"{key}.*/{READY}"):
            snap = _read(ready)
            if snap is None or now - snap.created >= self.max_age:
                continue
            if best is None or snap.created > best.created:
                best = snap
        if best is not None:
            os.utime(best.path / READY)
        return best

    def take(self, env: str, key: str, workspace: Path, home: Path) -> Snapshot:
        """Freeze ``workspace``'s upper directory and a copy of ``home`` as ``env``'s
        snapshot under ``key`` and stack it under a new empty upper directory of
        ``workspace`` (no sandbox may have the overlay mounted meanwhile)."""
        layers = overlay.of(workspace)
        if layers is None or layers.snapshot is not None:
            raise ValueError(f"{workspace} is not a fresh overlay workspace")
        parent = self.root / _env_dir(env)
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(mode=0o700)
        try:
            (tmp / overlay.LEASE).touch()
            (tmp / "home").mkdir(mode=0o700)
            copy_tree(home, tmp / "home")
            layers.upper.rename(tmp / "upper")
            layers.upper.mkdir(mode=0o755)
            size = _du(tmp)
            created = time.time()
            (tmp / READY).write_text(json.dumps({"created": created, "size": size}))
            final = parent / f"{key}.{uuid.uuid4().hex[:12]}"
            tmp.rename(final)
        except BaseException:
            if not layers.upper.exists() and (tmp / "upper").is_dir():
                (tmp / "upper").rename(layers.upper)  # the attempt keeps what setup wrote
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        overlay.stack(workspace, final / "upper")
        self.evict()
        return Snapshot(final, created, size)

    def use(self, snap: Snapshot, workspace: Path, home: Path) -> None:
        """Start ``workspace`` (a fresh overlay, nothing written yet) and ``home`` (empty)
        from ``snap``."""
        overlay.stack(workspace, snap.upper)
        copy_tree(snap.home, home)

    def evict(self, *, env: str | None = None, key: str | None = None) -> list[Path]:
        """Remove expired snapshots, ``env``'s under another key than ``key``, and the least
        recently used beyond ``max_bytes``: those no sandbox holds and none used for
        ``idle_seconds``; returns what went."""
        now = time.time()
        removed = []
        kept = []
        snaps = sorted(self._all(), key=lambda s: (s.path / READY).stat().st_mtime, reverse=True)
        guard = min(self.idle_seconds, self.max_age)
        for snap in snaps:
            if now - (snap.path / READY).stat().st_mtime < guard:
                kept.append(snap)
                continue
            stale = now - snap.created >= self.max_age or (
                env is not None
                and key is not None
                and snap.path.parent.name == _env_dir(env)
                and not snap.path.name.startswith(f"{key}.")
            )
            if stale and self._remove(snap.path):
                removed.append(snap.path)
            elif not stale:
                kept.append(snap)
        total = 0
        for snap in kept:  # most recently used first
            total += snap.size
            if total > self.max_bytes and self._remove(snap.path):
                removed.append(snap.path)
                total -= snap.size
        return removed

    def clear(self, env: str) -> list[Path]:
        """Remove every snapshot of ``env`` that no sandbox holds."""
        return [p for p in (self.root / _env_dir(env)).glob("*.*") if self._remove(p)]

    def _remove(self, path: Path) -> bool:
        try:
            with open(path / overlay.LEASE, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # a sandbox runs on it
                trash = self.root / f".trash-{uuid.uuid4().hex}"
                path.rename(trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def sweep(self) -> None:
        """At start: what a crash left half made or half removed, then :meth:`evict`."""
        for junk in (*self.root.glob(".tmp-*"), *self.root.glob(".trash-*")):
            shutil.rmtree(junk, ignore_errors=True)
        self.evict()
