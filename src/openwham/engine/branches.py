"""Does a branch exist in an environment's repository? Asked by ``POST tasks`` before anything
is stored, so a task on a missing branch is refused at once (400) instead of failing later.

Cheap first: a bare mirror (``DATA_DIR/mirrors``, kept by the engine) that already has the
branch answers without any network. Otherwise ``git ls-remote`` asks the remote itself for that
one ref: one round trip, no clone, no fetch and no mirror lock, so a first task on a large
repository is not held up by a full clone in the request (the attempt fetches the mirror as
it always does). A remote that cannot be reached is a 400 that says so and why.
"""

from __future__ import annotations

import os
import subprocess

from openwham.config import Settings
from openwham.sandbox.workspace import Mirrors, branch_head
from openwham.service.errors import BadRequest

LS_REMOTE_TIMEOUT = 30.0

# Host-side git as the mirrors run it: no system/global config, no prompts, no ext transport.
_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
}


def branch_exists(settings: Settings, repo_key: str, url: str, branch: str) -> bool:
    """Whether ``branch`` is a branch of the repository at ``url``; :class:`BadRequest` when
    the repository cannot be reached (the message names it and git's reason)."""
    try:
        mirror = Mirrors(settings.resolved_data_dir / "mirrors").path(repo_key)
    except ValueError:
        mirror = None
    if mirror is not None and (mirror / "HEAD").exists() and branch_head(mirror, branch):
        return True
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.devnull, **_ENV}
    try:
        proc = subprocess.run(
            [
                "git",
                "-c",
                "protocol.ext.allow=never",
                "ls-remote",
                "--heads",
                "--",
                url,
                f"refs/heads/{branch}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=LS_REMOTE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BadRequest(
            f"Repository not reachable: {url} (no answer in {LS_REMOTE_TIMEOUT:.0f} s)"
        ) from exc
    except OSError as exc:
        raise BadRequest(f"Repository not reachable: {url} ({exc})") from exc
    if proc.returncode != 0:
        lines = [x.strip() for x in proc.stderr.splitlines() if x.strip()]
        reason = lines[0].removeprefix("fatal: ")[:500] if lines else f"git exit {proc.returncode}"
        raise BadRequest(f"Repository not reachable: {url} ({reason})")
    return any(
        line.split("\t", 1)[-1] == f"refs/heads/{branch}" for line in proc.stdout.splitlines()
    )
