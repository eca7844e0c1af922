"""Credentials for host git's calls to private remotes, handed to git for one call only.

A credential never goes into argv, the environment, a URL or a named file: its text is in an
anonymous in-memory file (``memfd_create``) of this process. HTTPS: a credential helper
(``-c credential.helper=…``) that prints ``/dev/fd/N`` (inherited by git and its children,
reopened from its start each time) for ``get``; ``store``/``erase`` do nothing. SSH:
``GIT_SSH_COMMAND`` names the key and the known_hosts lines as ``/proc/<this process>/fd/N``
(ssh closes inherited descriptors) with ``StrictHostKeyChecking=yes``. Sandboxes have their
own pid namespace and ``/proc``: they see neither. The files close with the call.
Redirects are not followed with a credential (it would go to the host redirected to)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

#: The ssh options every host git call uses (no prompts, no user config or agent).
SSH_BASE = "ssh -F /dev/null -o BatchMode=yes"


@dataclass(frozen=True, slots=True)
class GitAuth:
    """One account's credential for the repositories under ``url_prefix``."""

    url_prefix: str
    kind: Literal["https", "ssh"]
    username: str | None
    secret: str = field(repr=False)  # the token/password, or the SSH private key
    known_hosts: str | None = None


@dataclass(frozen=True, slots=True)
class GitCall:
    """What a git call adds for its credential: ``-c`` arguments, environment, fds."""

    args: list[str]
    env: dict[str, str]
    fds: tuple[int, ...]


def _memfd(name: str, text: str) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)  # ssh refuses a key others could read
        data = text.encode()
        while data:
            data = data[os.write(fd, data) :]
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def git_call(auth: GitAuth | None) -> Iterator[GitCall]:
    """The arguments, environment and descriptors one git call needs for ``auth`` (none
    without one: no helper at all, so git asks nobody)."""
    if auth is None:
        yield GitCall(["-c", "credential.helper="], {"GIT_SSH_COMMAND": SSH_BASE}, ())
        return
    fds: list[int] = []
    try:
        if auth.kind == "https":
            body = f"username={auth.username or 'x-access-token'}\npassword={auth.secret}\n"
            fd = _memfd("wham-git-credential", body)
            fds.append(fd)
            helper = f'!f() {{ test "$1" = get && cat /dev/fd/{fd}; }}; f'
            args = [
                "-c",
                "credential.helper=",
                "-c",
                f"credential.helper={helper}",
                "-c",
                "http.followRedirects=false",
            ]
            yield GitCall(args, {"GIT_SSH_COMMAND": SSH_BASE}, tuple(fds))
        else:
            key = auth.secret if auth.secret.endswith("\n") else auth.secret + "\n"
            fds.append(_memfd("wham-git-key", key))
            fds.append(_memfd("wham-git-known-hosts", (auth.known_hosts or "").strip() + "\n"))
            # ssh closes every inherited descriptor at start: it opens this process's
            own = f"/proc/{os.getpid()}/fd"
            ssh = (
                f"{SSH_BASE} -o IdentitiesOnly=yes -o IdentityAgent=none"
                f" -o IdentityFile={own}/{fds[0]} -o UserKnownHostsFile={own}/{fds[1]}"
                " -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes"
                " -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no"
            )
            yield GitCall(["-c", "credential.helper="], {"GIT_SSH_COMMAND": ssh}, ())
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


_REFUSALS = (
    ("authentication failed", "authentication failed"),
    ("could not read username", "authentication failed (no credential)"),
    ("could not read password", "authentication failed (no credential)"),
    ("permission denied (publickey", "authentication failed"),
    ("permission denied", "authentication failed"),
    ("host key verification failed", "host key verification failed"),
    ("the requested url returned error: 403", "access refused (HTTP 403)"),
)


def refusal(stderr: str) -> str | None:
    """What the remote refused, from git's error output (``None``: not a refusal)."""
    text = stderr.lower()
    for needle, what in _REFUSALS:
        if needle in text:
            return what
    return None


def matches(prefix: str, url: str) -> bool:
    """Whether ``url`` is under ``prefix`` (a prefix that ends in a host has ``/`` added at
    save, so ``https://github.com/`` never matches ``https://github.com.evil/``)."""
    return url.startswith(prefix)
