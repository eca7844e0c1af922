"""What git opens for a local repository, and whether an account may have it opened.

A local repository path is more than the directory it names: git follows a ``.git`` file
(``gitdir: …``) or symlink, a worktree's ``commondir``, ``objects/info/alternates`` (recursively,
relative entries against the object directory that lists them) and any symlink inside the git
directory. Each of these could lead into openwham's data directory (another account's mirror,
the keys, the database), so a path is judged by every real path git would open, not by the
string it was given. Checked when an environment is saved and again whenever git is about to
open the path (``POST tasks``, mirror clone and fetch), because the directory can change after
it was accepted.

A leaf module: the service (environment checks) and the sandbox (mirrors) both use it.
"""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass
from pathlib import Path

MAX_ALTERNATES = 64  # git itself stops at 5 levels; a longer chain is refused, not followed
_SETTING = "WHAM_LOCAL_REPO_ROOTS"


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def _read_gitfile(path: Path) -> Path | None:
    """The directory a ``.git`` file names (relative to the file's directory), or ``None``."""
    try:
        with open(path, "rb") as f:
            text = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return None
    first = text.splitlines()[0] if text else ""
    if not first.startswith("gitdir: "):
        return None
    return _real(path.parent / first[len("gitdir: ") :].strip())


def _git_dir(path: Path) -> Path:
    """The git directory git's ``enter_repo`` picks for ``path`` (``path/.git``, ``path``,
    ``path.git/.git``, ``path.git``: the first that is a directory or a gitfile)."""
    for candidate in (path / ".git", path, Path(f"{path}.git") / ".git", Path(f"{path}.git")):
        if candidate.is_dir():
            return _real(candidate)
        if candidate.is_file() and (target := _read_gitfile(candidate)) is not None:
            return target
    return _real(path)


def _unquote(line: str) -> str:
    """An alternates line as git reads it: C-style quoted when it starts with a quote."""
    if len(line) >= 2 and line.startswith('"') and line.endswith('"'):
        raw = line[1:-1].encode("utf-8", "surrogateescape")
        return codecs.escape_decode(raw)[0].decode("utf-8", "surrogateescape")
    return line


def _alternates(objects: Path) -> list[Path]:
    try:
        text = (objects / "info" / "alternates").read_text("utf-8", "surrogateescape")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            found.append(_real(objects / _unquote(line)))  # absolute entries replace the base
    return found


def _symlink_targets(top: Path) -> list[Path]:
    """The targets of every symlink under ``top`` (git follows them when it reads refs,
    objects or packs)."""
    found = []
    for parent, dirs, files in os.walk(top, followlinks=False):
        for name in (*dirs, *files):
            entry = os.path.join(parent, name)
            if os.path.islink(entry):
                found.append(_real(entry))
    return found


def opened_paths(path: str | Path) -> list[Path]:
    """Every real path git may open for the repository at ``path``: the path itself, its git
    directory (gitfile, symlink), the common directory of a worktree, all alternate object
    directories (recursively) and the targets of symlinks inside any of them.

    Raises ``ValueError`` when the alternates chain is longer than :data:`MAX_ALTERNATES`.
    """
    top = Path(os.path.normpath(path))
    found: dict[Path, None] = {_real(top): None}
    git_dir = _git_dir(top)
    found[git_dir] = None
    common = git_dir
    try:
        line = (git_dir / "commondir").read_text("utf-8", "surrogateescape").splitlines()
    except OSError:
        line = []
    if line and line[0].strip():
        common = _real(git_dir / line[0].strip())
        found[common] = None
    trees = [git_dir, common]
    queue = [_real(common / "objects")]
    seen: set[Path] = set()
    while queue:
        objects = queue.pop()
        if objects in seen:
            continue
        seen.add(objects)
        if len(seen) > MAX_ALTERNATES:
            raise ValueError(f"more than {MAX_ALTERNATES} alternate object directories")
        found[objects] = None
        trees.append(objects)
        queue.extend(_alternates(objects))
    for tree in dict.fromkeys(trees):
        if tree.is_dir():
            for target in _symlink_targets(tree):
                found[target] = None
    return list(found)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass(frozen=True)
class LocalRepoPolicy:
    """Where an account's local repositories may be: never the data directory; inside one of
    ``roots`` (``None``: anywhere else, the server owner's default; ``()``: nowhere)."""

    data_dir: Path
    roots: tuple[Path, ...] | None = None

    def refusal(self, path: str | Path) -> str | None:
        """Why git must not open the local repository at ``path``, or ``None``."""
        if self.roots == ():
            return (
                "Local repository paths are not open to this account: the server's "
                f"{_SETTING} setting names the directories local repositories may live in "
                "(unset, only the server owner's account may use local paths)"
            )
        try:
            paths = opened_paths(path)
        except ValueError as exc:
            return f"Repository path {path} cannot be used: {exc}"
        data = _real(self.data_dir)
        for opened in paths:
            if _inside(opened, data):
                return (
                    f"Repository path {path} leads into openwham's data directory (git would "
                    "open it through its path, .git file or symlink, commondir or alternates)"
                )
        if self.roots is not None:
            for opened in paths:
                if not any(_inside(opened, root) for root in self.roots):
                    where = os.pathsep.join(str(r) for r in self.roots)
                    return (
                        f"Repository path {path} is outside the directories local repositories "
                        f"may live in ({_SETTING}={where}): git would open {opened}"
                    )
        return None
