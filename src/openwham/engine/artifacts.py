"""A completed attempt's Codex home as an artifact (``store.artifacts``), so that a follow-up
or a fork of it runs on any node, not only on the one whose disk holds its files.

:func:`pack` makes a tar of the compacted Codex home: regular files and directories only
(links, FIFOs and devices the agent made are left out, never followed), sizes checked as it
reads. :func:`unpack` writes such a tar into a new attempt's directory and trusts nothing in
it: the agent chose every name and byte in the Codex home, and the archive comes back from a
shared store. Every member must be a plain file or directory with a relative name without
``..``; files are created anew (``O_EXCL | O_NOFOLLOW``) under directories it made itself, so
nothing can lead out of the destination; the bytes written are counted against the cap while
they are written, whatever the headers say (docs/security.md, "Stored sessions").
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path, PurePosixPath

from openwham.store.artifacts import ArtifactError, ArtifactTooLarge

from .files import read_capped

CODEX_HOME = "codex-home"  # the packed Codex home of a completed attempt
CODEX_HOME_MISSING = "codex-home.missing"  # why there is none (UTF-8 text), when too big

_CHUNK = 1 << 16


class UnsafeArchive(ArtifactError):
    """A stored archive holds something :func:`pack` never writes."""


def pack(home: Path, max_bytes: int) -> bytes:
    """A tar of ``home``'s regular files and directories; :class:`ArtifactTooLarge` as soon
    as it would hold more than ``max_bytes``. The agent wrote there (its sandbox is gone):
    entries are looked at with ``lstat`` and files opened with ``O_NOFOLLOW``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        stack = [""]
        while stack:
            rel = stack.pop()
            with os.scandir(home / rel if rel else home) as entries:
                listing = sorted(entries, key=lambda e: e.name)
            for entry in listing:
                name = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                info = tarfile.TarInfo(name)
                info.mtime = int(st.st_mtime)
                if stat.S_ISDIR(st.st_mode):
                    info.type, info.mode = tarfile.DIRTYPE, 0o700
                    tar.addfile(info)
                    stack.append(name)
                elif stat.S_ISREG(st.st_mode):
                    data = _read(entry.path, max_bytes - buf.tell() + 1)
                    info.size, info.mode = len(data), 0o600
                    tar.addfile(info, io.BytesIO(data))
                if buf.tell() > max_bytes:
                    raise ArtifactTooLarge("Its Codex session", _size(home), max_bytes)
    if buf.tell() > max_bytes:
        raise ArtifactTooLarge("Its Codex session", buf.tell(), max_bytes)
    return buf.getvalue()


def _read(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since it was looked at
            return b""
        return read_capped(f, limit)


def _size(home: Path) -> int:
    """What the home's regular files hold (for the message of a session too big to keep)."""
    total = 0
    for root, _dirs, files in os.walk(home):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _parts(name: str) -> list[str]:
    """The components of a member's name, refused when it could lead anywhere but below
    the destination."""
    if not name or "\0" in name or name.startswith("/"):
        raise UnsafeArchive(f"The stored Codex session holds an unsafe name: {name!r}")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if not parts or any(p in ("..", "") or p.startswith("/") for p in parts):
        raise UnsafeArchive(f"The stored Codex session holds an unsafe name: {name!r}")
    return parts


def unpack(data: bytes, dest: Path, max_bytes: int) -> None:
    """Write a :func:`pack` archive into ``dest`` (which must not exist yet). Anything but
    plain files and directories with relative names, a name twice, or more than
    ``max_bytes`` written raises :class:`UnsafeArchive` / :class:`ArtifactTooLarge`; the
    caller removes ``dest`` then."""
    dest.mkdir(mode=0o700)
    made: set[tuple[str, ...]] = {()}  # directories this unpack created (never a link)
    written = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                parts = _parts(member.name)
                if member.isdir():
                    _mkdirs(dest, parts, made)
                    continue
                if not member.isreg():
                    raise UnsafeArchive(
                        f"The stored Codex session holds {member.name!r}, which is not a "
                        "plain file or directory"
                    )
                _mkdirs(dest, parts[:-1], made)
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                path = dest.joinpath(*parts)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    while chunk := source.read(_CHUNK):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ArtifactTooLarge("The stored Codex session", written, max_bytes)
                        out.write(chunk)
                if member.mtime:
                    os.utime(path, (member.mtime, member.mtime))
    except FileExistsError as exc:
        raise UnsafeArchive(f"The stored Codex session holds a name twice: {exc.filename}") from exc
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"The stored Codex session is damaged ({exc})") from exc


def _mkdirs(dest: Path, parts: list[str], made: set[tuple[str, ...]]) -> None:
    """Create ``dest/parts...`` one directory at a time; only directories this unpack made
    are entered again (a file of the same name was written first: refused)."""
    for i in range(1, len(parts) + 1):
        key = tuple(parts[:i])
        if key in made:
            continue
        os.mkdir(dest.joinpath(*key), 0o700)  # FileExistsError: a file took the name
        made.add(key)
