"""Host subprocesses that die with the server (``PR_SET_PDEATHSIG``).

A ``wham serve`` killed with SIGKILL cannot stop what it started; without this, a ``git
fetch`` or ``git push`` it ran kept going (a push could land a branch nobody records, hours
later). :func:`die_with_parent` is a ``preexec_fn``: the kernel sends the child SIGKILL when
the thread that started it ends. That thread must therefore wait for the child (as
``subprocess.run`` does), never hand it to another thread. Only the direct child gets the
signal; what it started notices its closed pipes (a local remote's ``git-receive-pack``
finishes its hook first).
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child die with this process's calling thread. Made
    before the fork: it knows the parent's pid, so a parent that died before ``prctl`` ran
    is noticed (the child is then an orphan and exits at once)."""
    parent = os.getpid()

    def setup() -> None:  # between fork and exec: keep it minimal
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return setup
