"""Which environment a checkout belongs to, in the Codex CLI's order (codex-cli.md §4.7).

Candidates are the environments holding one of the checkout's git remotes: GitHub remotes are
looked up with ``environments/by-repo/github/{owner}/{repo}`` as the CLI does, and (an
openwham addition, for servers whose repositories are not on GitHub) environments whose
repository clone URL equals a remote. Then: a label (or id) match, the single candidate, the
pinned one, the one with the most tasks. Without candidates the whole list is used.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from openwham.client import endpoints
from openwham.client.core import Op
from openwham.client.errors import APIError, WhamError
from openwham.wire import Environment

_GITHUB = re.compile(
    r"^(?:https?://|ssh://|git://)?(?:[^@/]+@)?github\.com[:/](?P<owner>[^/]+)/(?P<repo>[^/]+?)"
    r"(?:\.git)?/?$"
)


class UnknownEnvironment(WhamError):
    """No environment matches; the message lists the known labels."""


def git_remote_urls(repo: Path) -> list[str]:
    """The checkout's remote URLs (``git config --get-regexp``, then ``git remote -v``)."""
    urls: list[str] = []
    for cmd in (
        ["git", "-C", str(repo), "config", "--get-regexp", r"remote\..*\.url"],
        ["git", "-C", str(repo), "remote", "-v"],
    ):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            return []
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] not in urls:
                urls.append(parts[1])
        if urls:
            break
    return urls


def github_repo(url: str) -> tuple[str, str] | None:
    """``(owner, repo)`` of a GitHub remote URL."""
    m = _GITHUB.match(url.strip())
    return (m["owner"], m["repo"]) if m else None


def _same_repo(a: str, b: str) -> bool:
    def norm(url: str) -> str:
        text = url.strip().rstrip("/").removesuffix(".git").rstrip("/")
        if text.startswith("file://"):
            text = urlsplit(text).path
        if text.startswith("/"):
            with contextlib.suppress(OSError):
                text = str(Path(text).resolve())
        return text.lower() if "github.com" in text else text

    return norm(a) == norm(b)


def choose(
    environments: list[Environment], candidates: list[Environment], label: str | None
) -> Environment:
    """Pick one environment; raises :class:`UnknownEnvironment` with the known labels."""
    if not environments and not candidates:
        raise UnknownEnvironment(
            "no environments exist on this server", hint="create one with `wham env create`"
        )
    if label:
        for env in environments + candidates:
            if env.id == label:
                return env
        matches = [e for e in environments if e.label.lower() == label.lower()]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(sorted({e.label or e.id for e in environments})) or "none"
        if matches:
            raise UnknownEnvironment(f"environment label {label!r} is ambiguous; use its id")
        raise UnknownEnvironment(f"unknown environment {label!r}; known: {known}")
    pool = candidates or environments
    if len(pool) == 1:
        return pool[0]
    pinned = [e for e in pool if e.is_pinned]
    if len(pinned) == 1:
        return pinned[0]
    return max(pinned or pool, key=lambda e: e.task_count)


def resolve_op(repo: Path | None = None, label: str | None = None) -> Op[Environment]:
    """The environment for ``label`` or for the checkout at ``repo`` (see module docstring)."""
    environments: list[Environment] = yield endpoints.list_environments()
    if label:
        return choose(environments, [], label)
    urls = git_remote_urls(repo) if repo is not None else []
    candidates: list[Environment] = []
    for url in urls:
        gh = github_repo(url)
        if gh is not None:
            try:
                found: list[Environment] = yield endpoints.environments_by_repo("github", *gh)
            except APIError:
                found = []  # the CLI tolerates by-repo failures
            candidates += [e for e in found if e.id not in {c.id for c in candidates}]
        for env in environments:
            clones = [r.clone_url or "" for r in env.repo_map.values()]
            if any(c and _same_repo(c, url) for c in clones) and env not in candidates:
                candidates.append(env)
    return choose(environments, candidates, None)
