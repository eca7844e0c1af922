"""Host subprocesses that die with the server (``PR_SET_PDEATHSIG``).

A ``wham serve`` killed with SIGKILL cannot stop what it started; without this, a ``git
fetch`` or ``git push`` it ran kept going (a push could land a branch nobody records, hours
later). The kernel sends the child SIGKILL when the thread that started it ends. That thread
must therefore wait for the child (as ``subprocess.run`` does), never hand it to another
thread. Only the direct child gets the signal; what it started notices its closed pipes (a
local remote's ``git-receive-pack`` finishes its hook first).

Two ways to arm it, both checking that the parent is still the process that asked (a parent
killed before the signal was armed is noticed: the child is then an orphan and runs nothing):

- :func:`command`: the command line prefixed by ``setpriv --pdeathsig KILL`` (util-linux)
  and a one-line ``/bin/sh`` check. No ``preexec_fn``, so ``subprocess`` starts it with
  ``vfork``: a ``preexec_fn`` makes it ``fork`` the whole server (copying the page tables of
  ~170 MB with the GIL held: 1.6 ms of the server's CPU and 5.5 ms of wall per process on a
  quiet machine, ~10 ms under load, against 0.2 ms and 2.4 ms; docs/benchmarks.md).
  ``mount_namespace`` adds ``unshare --mount`` (a private mount namespace, e.g. for an
  overlay mounted by a ``before`` line).
- :func:`die_with_parent`: a ``preexec_fn``, left for what starts rarely (the extra API
  processes of ``wham serve --processes``, once each). Host git and bubblewrap's launch use
  :func:`command`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shlex
import shutil
import signal
from collections.abc import Callable, Sequence

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

#: exit status of a :func:`command` whose parent was gone before its check, or whose
#: ``before`` line failed
REFUSED = 125
#: the checking shell (POSIX ``sh``: dash on Debian, whose ``$PPID`` is ``getppid()`` at its
#: start, i.e. after ``setpriv`` armed the signal)
SHELL = "/bin/sh"


class LifelineUnavailable(OSError):
    """A util-linux tool (``setpriv``, ``unshare``, ``mount``; scripts/setup.sh) is missing."""


@functools.cache
def tool(name: str) -> str:
    """The path of the system tool ``name`` (``/usr/bin``, ``/bin``, ``/usr/sbin``, ``/sbin``:
    never the caller's ``PATH``)."""
    found = shutil.which(name, path=os.pathsep.join(("/usr/bin", "/bin", "/usr/sbin", "/sbin")))
    if found is None:
        raise LifelineUnavailable(f"{name} (util-linux) is not installed: scripts/setup.sh")
    return found


def setpriv() -> str:
    """``setpriv``'s path (a test puts another in front of it)."""
    return tool("setpriv")


def command(
    argv: Sequence[str], *, mount_namespace: bool = False, before: Sequence[str] = ()
) -> list[str]:
    """``argv`` as a command line that dies with this process's calling thread: started
    without a ``preexec_fn`` (``subprocess`` then uses ``vfork``). ``setpriv --pdeathsig KILL``
    arms the signal and execs ``/bin/sh``, which runs ``argv`` only if its parent is still this
    process (``$PPID``, read after the signal was armed), after each ``before`` line (shell
    code, its words quoted by :func:`quote`; a failing one stops it with status
    :data:`REFUSED`); ``exec`` keeps the pid, so the signal reaches ``argv``'s program. With
    ``mount_namespace``: in a private mount namespace of its own (``unshare --mount``,
    propagation private; it goes with its last process)."""
    script = "".join(f"{line} || exit {REFUSED}\n" for line in before)
    script = f'[ "$PPID" = "$0" ] || exit {REFUSED}\n{script}exec "$@"'
    prefix = [setpriv(), "--pdeathsig", "KILL", "--"]
    if mount_namespace:
        prefix += [tool("unshare"), "--mount", "--propagation", "private", "--"]
    return [*prefix, SHELL, "-c", script, str(os.getpid()), *argv]


def quote(*words: str) -> str:
    """``words`` as one line of shell code for :func:`command`'s ``before``."""
    return shlex.join(words)


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child die with this process's calling thread. Made
    before the fork: it knows the parent's pid, so a parent that died before ``prctl`` ran
    is noticed (the child is then an orphan and exits at once). It makes ``subprocess``
    fork the whole server: prefer :func:`command` where a command line can do the rest."""
    parent = os.getpid()

    def setup() -> None:  # between fork and exec: keep it minimal
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return setup
