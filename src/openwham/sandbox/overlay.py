"""Copy-on-write workspaces: an overlay of a checkout prepared once per commit.

Writing a 5,000-file checkout per attempt costs seconds on a busy disk (docs/benchmarks.md,
"Cold workspace"). With an overlay, an attempt's workspace is a checkout made once per
(repository, commit) and shared read-only (the *lower* layer, in ``DATA_DIR/checkouts``) and
the attempt's own *upper* directory, which receives every file the attempt writes (the
kernel copies a lower file up before changing it). Making one is three ``mkdir`` and a
symlink.

An attempt directory that uses one holds, beside the (empty, on the host) ``workspace``:

- ``overlay-lower``: a symlink to the shared checkout (never bound into a sandbox);
- ``overlay-upper``: what the attempt wrote (whiteouts for what it deleted);
- ``overlay-work``: the kernel's scratch directory for the same file system;
- ``overlay-snapshot`` (optional): a symlink to a post-setup snapshot (``sandbox.snapshots``),
  an upper directory frozen after a successful setup script, stacked read-only between the
  attempt's upper directory and the checkout (never bound into a sandbox either).

The overlay is mounted only in a private mount namespace of the process that needs the
merged view: bubblewrap's launch (so the sandbox's namespaces are made from it and the agent
sees the overlay at ``/workspace``) and host git on the workspace
(``sandbox.workspace.git``), both started through ``openwham.lifeline.command`` (``unshare
--mount`` with private propagation, then :func:`mount_line`'s ``mount -t overlay``, then the
program). Nothing is mounted in the host's namespace, so a crash leaks no mount: the
namespace goes with its last process. The mount is made by the server's user (root), before
bubblewrap drops every capability; the agent cannot unmount or remount it (no capabilities,
and the seccomp filter refuses ``mount``/``umount2``), cannot reach the lower layer except
through the overlay (every write to a lower file lands in the upper directory), and sees no
other attempt's upper directory. An upper directory belongs to one attempt: only that
attempt's sandboxes and host git mount it, and one sandbox at a time (:func:`claim_upper`:
the kernel allows a second mount of an upper directory in use, with a warning, and the two
views then disagree).

Needs root (``CAP_SYS_ADMIN`` in the host's user namespace) and overlayfs;
:func:`unavailable` says why not, and workspaces are then full checkouts as before.
"""

from __future__ import annotations

import fcntl
import functools
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from openwham import lifeline

LOWER = "overlay-lower"
SNAPSHOT = "overlay-snapshot"
UPPER = "overlay-upper"
WORK = "overlay-work"

# Characters that would end or split an overlay mount option (paths are ours, not users').
_BAD = frozenset(",:\\\n\0")


class OverlayUnavailable(RuntimeError):
    """This host cannot mount an overlay (not root, no overlayfs)."""


@dataclass(frozen=True)
class Overlay:
    """The layers of one workspace's overlay (host paths, resolved)."""

    lower: Path
    upper: Path
    work: Path
    #: a post-setup snapshot stacked over ``lower`` (read-only like it), or ``None``
    snapshot: Path | None = None

    def options(self) -> bytes:
        layers = (self.lower, self.upper, self.work, *((self.snapshot,) if self.snapshot else ()))
        for p in layers:
            if _BAD & set(str(p)):
                raise ValueError(f"overlay path {p} holds a character mount options cannot")
        lowers = f"{self.snapshot}:{self.lower}" if self.snapshot else str(self.lower)
        return f"lowerdir={lowers},upperdir={self.upper},workdir={self.work}".encode()


def of(workspace: Path) -> Overlay | None:
    """The overlay ``workspace`` is made of (its siblings name it), or ``None`` for a plain
    directory."""
    parent = workspace.absolute().parent
    lower = parent / LOWER
    if not lower.is_symlink():
        return None
    target = lower.resolve()
    if not (target / ".git").is_dir():
        raise OverlayUnavailable(f"the checkout {target} of {workspace} is gone")
    snapshot: Path | None = None
    if (parent / SNAPSHOT).is_symlink():
        snapshot = (parent / SNAPSHOT).resolve()
        if not snapshot.is_dir():
            raise OverlayUnavailable(f"the setup snapshot {snapshot} of {workspace} is gone")
    return Overlay(target, (parent / UPPER).resolve(), (parent / WORK).resolve(), snapshot)


def stack(workspace: Path, snapshot: Path) -> None:
    """Put ``snapshot`` (a frozen upper directory over the same checkout) under
    ``workspace``'s own upper directory, which must be empty: while no sandbox or host git
    has the overlay mounted."""
    parent = workspace.absolute().parent
    link = parent / SNAPSHOT
    if link.is_symlink():
        link.unlink()
    link.symlink_to(snapshot.resolve(), target_is_directory=True)
    overlay = of(workspace)
    assert overlay is not None
    overlay.options()


def make(lower: Path, workspace: Path) -> Overlay:
    """Lay out ``workspace``'s overlay over ``lower`` in its parent (the attempt's
    directory)."""
    parent = workspace.absolute().parent
    for name in (UPPER, WORK):
        (parent / name).mkdir(mode=0o755)
    workspace.mkdir(mode=0o755)
    (parent / LOWER).symlink_to(lower.resolve(), target_is_directory=True)
    overlay = of(workspace)
    assert overlay is not None
    overlay.options()  # refuse paths the mount would misread now, not at the first launch
    return overlay


def mount_line(overlay: Overlay, target: Path) -> str:
    """The shell line that mounts ``overlay`` on ``target``, for ``lifeline.command``'s
    ``before`` in a private mount namespace (``mount_namespace``): bubblewrap's launch and
    host git on a workspace. Mount events do not propagate back to the host (propagation
    private), and the namespace ends with the last process in it."""
    options = overlay.options().decode()
    return lifeline.quote(
        lifeline.tool("mount"), "-n", "-t", "overlay", "overlay", "-o", options, str(target)
    )


@functools.cache
def unavailable() -> str | None:
    """``None`` when overlay workspaces work here, else why not (probed once: a mount in a
    private namespace of a child process, over empty directories)."""
    if os.geteuid() != 0:
        return "the server does not run as root (overlay mounts need CAP_SYS_ADMIN)"
    try:
        with tempfile.TemporaryDirectory(prefix="openwham-overlay-probe-") as tmp:
            root = Path(tmp)
            (root / "lower" / ".git").mkdir(parents=True)
            (root / "lower" / "f").write_text("lower\n")
            overlay = make(root / "lower", root / "workspace")
            line = mount_line(overlay, root / "workspace")  # as bwrap's launch and git do
            argv = ["cat", str(root / "workspace" / "f")]
            cmd = lifeline.command(argv, mount_namespace=True, before=[line])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
            if proc.stdout != "lower\n":
                return f"overlayfs mount failed: {proc.stderr.strip()[-300:]}"
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return f"overlayfs mount failed: {exc}"
    return None


LEASE = "lease"


def claim_upper(overlay: Overlay) -> int:
    """An exclusive ``flock`` on the upper directory (its fd; close it to release): one
    mount of an upper directory at a time (the kernel allows a second with only a warning,
    and two mounts' views of one upper directory do not stay consistent)."""
    fd = os.open(overlay.upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OverlayUnavailable(
            f"the workspace's overlay {overlay.upper} is in use by another sandbox"
        ) from None
    return fd


def hold(overlay: Overlay) -> list[IO[bytes]]:
    """Shared ``flock`` s on the lease files of the lower checkout and of the snapshot (those
    that have one), held while a sandbox uses the overlay: the checkout cache and the
    snapshot cache evict only what they can lock exclusively. Closing the files (or the
    process ending) releases them."""
    held: list[IO[bytes]] = []
    for layer in (overlay.lower, overlay.snapshot):
        if layer is None:
            continue
        try:
            f = open(layer.parent / LEASE, "rb")  # noqa: SIM115 - held until the sandbox ends
        except FileNotFoundError:
            continue
        fcntl.flock(f, fcntl.LOCK_SH)
        held.append(f)
    return held
