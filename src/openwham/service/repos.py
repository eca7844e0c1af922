"""Describe a repository named by git URL or local path, in the GitHubRepo shape of repo_map."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from openwham import lifeline
from openwham.gitpaths import LocalRepoPolicy
from openwham.store import models as m
from openwham.wire import GitHubRepo, GitHubRepoOwner, RepoSpec

from .accounts import OWNER_KEY
from .errors import BadRequest

_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:(?!//)(?P<path>.+)$")
_URL_SCHEMES = ("https", "http", "ssh", "git", "file")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$")


def repo_key(url: str) -> str:
    """Stable repository key (Codex uses ``github-<id>``; openwham hashes the clone URL)."""
    return "repo-" + hashlib.sha256(url.encode()).hexdigest()[:16]


def local_policy(
    db: Session, account_id: str, data_dir: Path, roots: tuple[Path, ...] | None
) -> LocalRepoPolicy:
    """Where ``account_id``'s local repositories may be: ``WHAM_LOCAL_REPO_ROOTS`` (``roots``)
    when set; unset, anywhere outside the data directory for the server owner's account (a
    single-user install) and nowhere for every other account."""
    if roots is None and not owns_server(db, account_id):
        roots = ()
    return LocalRepoPolicy(data_dir=data_dir, roots=roots)


def owns_server(db: Session, account_id: str) -> bool:
    """Whether the server owner is the one and only member of ``account_id`` (their own
    accounts; an account shared with anyone else is not single-user)."""
    state = db.get(m.ServerState, OWNER_KEY)
    if state is None:
        return False
    members = set(
        db.scalars(select(m.Membership.user_id).where(m.Membership.account_id == account_id))
    )
    return members == {state.value}


def normalise_url(raw: str, *, policy: LocalRepoPolicy | None = None) -> tuple[str, str]:
    """Return (clone URL, path part) or raise BadRequest with what is wrong; a local path is
    judged by ``policy`` (by everything git would open for it) before anything else."""
    url = raw.strip()
    if not url or len(url) > 2000 or any(c in url for c in "\n\r\0"):
        raise BadRequest("Repository URL must be a git URL or an absolute local path")
    if url.startswith("/"):
        path = Path(os.path.normpath(url))
        if policy is not None and (reason := policy.refusal(path)) is not None:
            raise BadRequest(reason)
        if not path.is_dir():
            raise BadRequest(f"Repository path does not exist or is not a directory: {url}")
        return str(path), str(path)
    m = _SCP_LIKE.match(url)
    if m:
        return url, m.group("path")
    parsed = urlparse(url)
    if parsed.scheme not in _URL_SCHEMES or (parsed.scheme != "file" and not parsed.netloc):
        raise BadRequest(
            "Repository URL must be https://, http://, ssh://, git://, file://, "
            "user@host:path or an absolute local path"
        )
    # The clone URL is shown in every environment and task response: a token or password in
    # it would leak (for http(s) the user part alone is often a token, e.g. GitHub's).
    if parsed.password is not None or (parsed.scheme in ("http", "https") and parsed.username):
        raise BadRequest(
            "Repository URL must not contain credentials; use a URL without user:password@"
        )
    if parsed.scheme == "file":
        return normalise_url(parsed.path, policy=policy)[0], parsed.path
    return url, parsed.path


def _split_name(path: str) -> tuple[str, str]:
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts:
        raise BadRequest("Repository URL has no repository name")
    name = parts[-1].removesuffix(".git") or parts[-1]
    owner = parts[-2] if len(parts) > 1 else "local"
    return owner, name


def _local_head(path: str) -> tuple[bool, str | None]:
    """(is a git repository, branch its HEAD names) for a local path, via ``git ls-remote``.

    When git itself cannot be run the answer is (True, None): nothing is known, so nothing is
    refused here.
    """
    try:
        out = subprocess.run(  # dies with the server; started without a preexec_fn (vfork)
            lifeline.command(["git", "ls-remote", "--symref", path, "HEAD"]),
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return True, None
    if out.returncode != 0:
        return False, None
    for line in out.stdout.splitlines():
        if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
            return True, line[len("ref: refs/heads/") : -len("\tHEAD")]
    return True, None


def describe(
    spec: RepoSpec | str, *, policy: LocalRepoPolicy | None = None
) -> tuple[str, GitHubRepo]:
    """Key and GitHubRepo record for one repository of an environment."""
    if isinstance(spec, str):
        spec = RepoSpec(url=spec)
    url, path = normalise_url(spec.url, policy=policy)
    owner, name = _split_name(path)
    if spec.name:
        if not _NAME_RE.match(spec.name):
            raise BadRequest("Repository name must look like owner/repo")
        owner, name = spec.name.split("/", 1)
    detected = None
    if url.startswith("/"):
        is_repo, detected = _local_head(url)
        if not is_repo:
            raise BadRequest(f"Repository path is not a git repository: {url}")
    branch = spec.default_branch or detected or "main"
    validate_branch_name(branch)
    key = repo_key(url)
    repo = GitHubRepo(
        id=key,
        name=name,
        owner=GitHubRepoOwner(login=owner, id=None, type="User", avatar_url=None, url=None),
        repository_full_name=f"{owner}/{name}",
        clone_url=url,
        default_branch=branch,
        master_branch=None,
        language=None,
        visibility="private",
        git_url=url,
    )
    return key, repo


_BAD_REF = re.compile(
    r"(^[-/.])|(\.\.)|([\x00-\x20~^:?*\[\\\x7f])|(@\{)|(/\.)|(\.lock$)|([/.]$)|//"
)


def validate_branch_name(branch: str) -> str:
    """Reject names git would refuse (``git check-ref-format --branch`` rules, checked here)."""
    if not branch or len(branch) > 255 or branch == "@" or _BAD_REF.search(branch):
        raise BadRequest(f"Invalid branch name: {branch!r}")
    return branch
