"""The seccomp filter every sandbox runs under (``bwrap --seccomp FD``).

bubblewrap's namespaces and dropped capabilities already make most of these calls fail, but
not all of them: a process may ``ptrace`` any process of its own uid in its PID namespace —
bwrap's init included, which a setup script once stopped with ``PTRACE_ATTACH``, leaving the
attempt hanging — and calls such as ``bpf``, ``perf_event_open``, ``userfaultfd``, ``keyctl``
or ``io_uring_setup`` are kernel attack surface that no task needs. The filter denies them,
whatever the namespaces allow.

Denied calls fail with ``EPERM`` (``ENOSYS`` for ``clone3``, whose flags a filter cannot
read, so that the C library falls back to ``clone``), never with a kill: programs that probe
(``unshare`` checks, libuv's io_uring detection, ``personality`` queries) carry on. The only
kill is for a foreign system-call ABI (32-bit ``int 0x80`` on x86_64, x32): such a call would
bypass every rule, and no program in the sandbox is built for it.

The filter is built with libseccomp (through ``pyseccomp``) once per process and handed to
bwrap as a memfd; docs/notes-execution.md compares it with the Codex CLI's own filter.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
from types import ModuleType
from typing import Any

# Denied outright (EPERM). Each entry is (syscall, why); names the running architecture does
# not have (``umount`` on aarch64, …) are skipped.
DENIED: tuple[tuple[str, str], ...] = (
    ("ptrace", "stop or read other processes of the sandbox, bwrap's init included"),
    ("process_vm_readv", "read another process's memory"),
    ("process_vm_writev", "write another process's memory"),
    ("mount", "file system changes (no capability needed inside a new user namespace)"),
    ("umount", "file system changes"),
    ("umount2", "uncover what bwrap mounted over"),
    ("pivot_root", "file system changes"),
    ("move_mount", "new mount API"),
    ("open_tree", "new mount API"),
    ("fsopen", "new mount API"),
    ("fsconfig", "new mount API"),
    ("fsmount", "new mount API"),
    ("fspick", "new mount API"),
    ("mount_setattr", "new mount API"),
    ("kexec_load", "replace the kernel"),
    ("kexec_file_load", "replace the kernel"),
    ("bpf", "kernel attack surface (verifier bugs)"),
    ("perf_event_open", "kernel attack surface, side channels"),
    ("userfaultfd", "stalls kernel code at will: the classic race-exploit helper"),
    ("keyctl", "kernel keyrings are not namespaced"),
    ("add_key", "kernel keyrings are not namespaced"),
    ("request_key", "kernel keyrings are not namespaced"),
    ("open_by_handle_at", "opens files by handle, past every mount (the 'shocker' escape)"),
    ("init_module", "kernel modules"),
    ("finit_module", "kernel modules"),
    ("delete_module", "kernel modules"),
    ("swapon", "host swap"),
    ("swapoff", "host swap"),
    ("reboot", "host power"),
    ("setns", "join other namespaces"),
    ("io_uring_setup", "kernel attack surface; bypasses per-call filtering; Codex does not use it"),
    ("io_uring_enter", "as io_uring_setup"),
    ("io_uring_register", "as io_uring_setup"),
)

CLONE_NEWUSER = 0x10000000
AF_VSOCK = 40


class SeccompUnavailable(RuntimeError):
    """libseccomp cannot build a filter here (library missing, unknown architecture)."""


_HINT = "install libseccomp2 (apt-get install libseccomp2, or run scripts/setup.sh)"


def _lib() -> ModuleType:
    """pyseccomp, imported on first use: its import fails when libseccomp is missing."""
    try:
        return importlib.import_module("pyseccomp")  # untyped: used through Any
    except (ImportError, OSError, RuntimeError) as exc:
        raise SeccompUnavailable(f"libseccomp is not usable here ({exc}): {_HINT}") from exc


def _deny(f: Any, name: str, *args: Any, err: int = errno.EPERM) -> None:
    sc = _lib()
    nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
    if nr < 0:  # not a call of this architecture (umount on aarch64, …)
        return
    f.add_rule(sc.ERRNO(err), nr, *args)


def build() -> Any:
    """The filter (a ``pyseccomp.SyscallFilter``) for the running architecture: x86_64 and
    aarch64, and others wherever libseccomp knows them."""
    sc = _lib()
    f = sc.SyscallFilter(sc.ALLOW)
    # A call of another ABI (i386 or x32 on x86_64) would match none of the rules below.
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name, _why in DENIED:
        _deny(f, name)
    # New user namespaces: unshare(CLONE_NEWUSER) and clone(CLONE_NEWUSER…). The flags are
    # clone's first argument on x86_64 and aarch64 alike. clone3 passes them in memory,
    # which a filter cannot read: ENOSYS makes glibc fall back to clone.
    newuser = sc.Arg(0, sc.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)
    _deny(f, "unshare", newuser)
    _deny(f, "clone", newuser)
    _deny(f, "clone3", err=errno.ENOSYS)
    # VM sockets are not network-namespaced: they reach the host's (or hypervisor's)
    # services past the sandbox's loopback-only network (Codex's filter denies them too).
    vsock = sc.Arg(0, sc.EQ, AF_VSOCK)
    _deny(f, "socket", vsock)
    _deny(f, "socketpair", vsock)
    # personality: the query (0xffffffff) and the default (PER_LINUX, 0) are fine; any other
    # value (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE, …) is a change and refused. A rule may
    # compare an argument once, so "neither all zeros nor all ones" is spelled as: some bit i
    # is set while the next bit (cyclically) is clear. Every other 32-bit value has such a
    # pair; the kernel reads only the low 32 bits, so the masks ignore the high ones.
    for i in range(32):
        bit, following = 1 << i, 1 << ((i + 1) % 32)
        _deny(f, "personality", sc.Arg(0, sc.MASKED_EQ, bit | following, bit))
    return f


@functools.cache
def program() -> bytes:
    """The filter as a BPF program, what ``bwrap --seccomp`` reads (built once)."""
    f = build()
    try:
        with os.fdopen(os.memfd_create("seccomp-export", os.MFD_CLOEXEC), "w+b") as out:
            f.export_bpf(out)  # libseccomp writes to the file descriptor
            out.seek(0)
            data = out.read()
    except (OSError, ValueError) as exc:
        raise SeccompUnavailable(f"libseccomp cannot export the filter ({exc}): {_HINT}") from exc
    if not data or len(data) % 8:
        raise SeccompUnavailable(f"libseccomp exported {len(data)} bytes, not a BPF program")
    return data


def program_fd() -> int:
    """A memfd holding :func:`program`, positioned at its start, inheritable (for
    ``pass_fds``); the caller closes it."""
    data = program()
    fd = os.memfd_create("seccomp-bpf", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
