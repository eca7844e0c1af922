"""Run commands in a bubblewrap sandbox: the only way openwham runs agent code.

What a sandboxed command sees and may do:

- **Filesystem.** A fresh tmpfs root, remounted read-only, holding: ``/usr`` read-only (with
  ``/bin``, ``/lib``, ``/lib64``, ``/sbin`` as on the host: symlinks on merged-/usr systems),
  an ``/etc`` of a few read-only host files (``ETC_FILES``: TLS roots, loader cache, name
  service config …; never ``shadow``, ``ssl/private``, ``ssh``, ``pip.conf``, ``npmrc``,
  ``gitconfig``) plus generated ``passwd``, ``group``, ``hosts`` and ``hostname``
  (``resolv.conf`` only with network), a private ``/proc``, a minimal read-only ``/dev``,
  size-limited private tmpfs at ``/tmp`` (``/var/tmp`` links to it), ``/dev/shm`` and
  ``/home`` (HOME is ``/home/openwham``, unless a bind replaces it), the workspace
  (read-write, or read-only for Ask mode) and the caller's extra binds. Nothing else of the
  host exists inside: not ``/root``, ``/home``, ``/var``, ``/srv``, ``/opt``, ``/run``,
  ``/sys``, ``/work`` or the data directory. Note that the sandbox's uid is the server's uid
  on the host (root here): whatever the server can read in a bound tree, the sandbox can.
- **Namespaces.** Own user, PID, IPC, UTS (hostname ``openwham``), cgroup and — unless
  ``network`` — network namespace (loopback only). The user inside is uid/gid 1000 with no
  capabilities and cannot create further user namespaces. ``--die-with-parent`` (and,
  from the fork until bwrap arms that, ``openwham.lifeline``'s parent-death signal: a
  server killed in between left the sandbox running) and ``--new-session`` (no terminal
  injection).
- **System calls.** A seccomp filter (``openwham.sandbox.seccomp``) refuses ptrace, mount,
  bpf, perf_event_open, userfaultfd, keyrings, io_uring, new user namespaces, personality
  changes and more with EPERM. The stall watchdog (below) covers what it does not.
- **Environment.** The environment is cleared: PATH, HOME, LANG,
  TERM and ``SandboxSpec.env`` only. bwrap's own arguments travel through a memfd, so the
  sandbox's ``ps`` does not show host paths.
- **Limits.** rlimits set before bwrap execs (file size, open files, CPU seconds, no core
  files); a per-run cgroup (``openwham.sandbox.cgroups``) caps processes+threads, memory and
  optionally CPU where the host offers one. Without cgroups, processes fall back to
  RLIMIT_NPROC (which the kernel ignores when the server runs as root: then only the
  wall-clock limit stops a fork bomb) and memory to a per-process RLIMIT_DATA. The wall-clock
  limit is enforced from the host, and so is the stall watchdog (``Limits.stall_seconds``:
  no output while every process is stopped or a zombie). ``host_gaps()`` lists what this
  host cannot enforce.
- **Disk.** ``SandboxSpec.disk`` (``openwham.sandbox.disk``): the host directories it names
  may hold so much at most. A monitor measures them (with the sandbox frozen, where the host
  has a freezer): at most once a second while its processes wrote more than 1 MiB since
  the last measure, at once when any sign of growth (those writes, the file system's free
  bytes and inodes) shows more than is left of the budget, every 10 s regardless, and once
  more when the sandbox ends; beyond the budget the sandbox is killed
  (``SandboxResult.disk_exceeded``). Not while a held sandbox waits for its input.
- **Ending.** ``SandboxProcess.kill()`` SIGKILLs bwrap's process group; the sandbox's PID
  namespace dies with its init, so every process in it dies too; the cgroup, when there is
  one, is swept until empty. The process is spawned from a thread that lives as long as the
  sandbox, so bubblewrap's parent-death signal fires only when the server itself dies.

There is no unsandboxed mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import resource
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from openwham import lifeline
from openwham.sandbox import cgroups, disk, overlay, seccomp

log = logging.getLogger(__name__)

SANDBOX_UID = 1000
SANDBOX_GID = 1000
SANDBOX_USER = "openwham"
SANDBOX_HOSTNAME = "openwham"
SANDBOX_HOME = "/home/openwham"
SANDBOX_WORKSPACE = "/workspace"
# The workspace's sibling through which it borrows its mirror's git objects (on the host a
# symlink the engine made, in the sandbox a read-only bind of its target: see workspace.py).
SHARED_OBJECTS = "mirror-objects"
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

INSTALL_HINT = (
    "bubblewrap (bwrap) is required to run tasks and was not found on PATH. "
    "Install it with `apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap`, "
    "or run scripts/setup.sh, which installs it."
)

# Host /etc entries bound read-only (when present). The sandbox's uid is the server's uid
# outside, so it could read the server's own 0600 files: nothing is bound that may hold one.
# Deliberately absent: shadow/gshadow, ssl/private (TLS keys), ssh (host keys), sudoers,
# pip.conf, npmrc, gitconfig, wgetrc (may hold credentials), and the host's passwd, group,
# hosts, hostname and resolv.conf (generated instead).
ETC_FILES = (
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "magic",
    "magic.mime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "perl",
    "profile",
    "protocols",
    "python3",
    "services",
    "shells",
    "ssl/certs",
    "ssl/openssl.cnf",
    "terminfo",
    "timezone",
)
_ROOT_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_MAX_LINE = 4 << 20
DISK_INTERVAL = 1.0  # seconds between two disk measures at least …
DISK_DUTY = 4.0  # … and this many times as long as the last one took (unless it may be over)


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create a sandbox here; the message says what to do."""


def bwrap_available() -> str | None:
    """Path of the ``bwrap`` executable, or ``None`` when it is not installed."""
    return shutil.which("bwrap")


def require_bwrap() -> str:
    """Path of ``bwrap``; raises ``SandboxUnavailable`` with install instructions if absent."""
    path = bwrap_available()
    if path is None:
        raise SandboxUnavailable(INSTALL_HINT)
    return path


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Resource limits of one sandboxed run. ``None`` leaves a limit unset.

    ``max_processes`` counts threads too (that is what pids.max and RLIMIT_NPROC count).
    ``tmpfs_bytes`` caps each of /tmp, /dev/shm and /home.
    ``max_output_bytes`` is how much of each stream ``SandboxResult`` keeps (the tail);
    the ``on_output`` callback still sees every line.
    ``stall_seconds``: the watchdog kills a run that printed nothing while every one of its
    processes was stopped (state T/t: SIGSTOP, a ptrace stop) or a zombie for this long — it
    could never go on by itself (a process waiting for the model sleeps, state S).
    """

    wall_clock_seconds: float = 3600.0
    max_processes: int | None = 1024
    memory_bytes: int | None = 4 << 30
    max_file_bytes: int | None = 1 << 30
    max_open_files: int | None = 4096
    cpu_seconds: int | None = None
    cpus: float | None = None
    tmpfs_bytes: int | None = 1 << 30
    max_output_bytes: int = 4 << 20
    stall_seconds: float | None = None


@dataclass(frozen=True, kw_only=True)
class SandboxSpec:
    """What one sandboxed run sees. Host paths are bound at absolute sandbox paths."""

    workspace: Path
    workspace_dir: str = SANDBOX_WORKSPACE
    workspace_readonly: bool = False
    ro_binds: Mapping[Path, str] = field(default_factory=dict)
    rw_binds: Mapping[Path, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    network: bool = False
    cwd: str | None = None  # default: workspace_dir
    limits: Limits = field(default_factory=Limits)
    # Helpers the stall watchdog does not count: a process with one of these words in its
    # argv (the in-sandbox forwarders, which sleep on a socket whatever the rest does).
    idle_helpers: tuple[str, ...] = ()
    # What the host directories the sandbox writes to may hold (``openwham.sandbox.disk``).
    disk: disk.DiskBudget | None = None
    # Start at the background CPU weight (``cgroups``): a standby's start-up yields the cores
    # to running attempts until ``send`` or ``hurry`` gives it the normal weight.
    background: bool = False


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended.

    ``exit_code`` is the command's status (128+N when it died of signal N, as bwrap reports
    it) or negative (-9) when the sandbox was killed from outside. ``killed_reason`` is set
    when the run failed because of a limit or a kill, e.g. "wall-clock limit of 3 s reached",
    "memory limit reached", "process limit of 64 reached", "file size limit reached";
    several are joined with "; ".
    """

    exit_code: int
    timed_out: bool
    killed_reason: str | None
    stdout: str
    stderr: str
    duration: float
    output_truncated: bool = False
    stalled: bool = False  # killed by the watchdog (``Limits.stall_seconds``)
    disk_reason: str | None = None  # over ``SandboxSpec.disk`` (killed, or found at the end)

    @property
    def disk_exceeded(self) -> bool:
        return self.disk_reason is not None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_reason is None


def _check_sandbox_path(path: str) -> str:
    norm = os.path.normpath(path)
    if not path.startswith("/") or norm == "/" or ".." in Path(path).parts:
        raise ValueError(f"sandbox path must be absolute and below /: {path!r}")
    return norm


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)  # no MFD_CLOEXEC: bwrap inherits it through pass_fds
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _generated_etc() -> dict[str, bytes]:
    u, g = SANDBOX_UID, SANDBOX_GID
    files = {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"{SANDBOX_USER}:x:{u}:{g}:{SANDBOX_USER}:{SANDBOX_HOME}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\n{SANDBOX_USER}:x:{g}:\nnogroup:x:65534:\n",
        "hosts": (
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{SANDBOX_HOSTNAME}\n::1\tlocalhost ip6-localhost\n"
        ),
        "hostname": f"{SANDBOX_HOSTNAME}\n",
    }
    return {k: v.encode() for k, v in files.items()}


def build_args(spec: SandboxSpec) -> tuple[list[str], list[int]]:
    """bwrap's options for ``spec`` (the command follows them after ``--``) and the fds they
    refer to (generated /etc files as memfds), which the caller passes on and then closes."""
    workspace = spec.workspace.resolve()
    if not workspace.is_dir():
        raise ValueError(f"workspace {workspace} is not a directory")
    ws_dir = _check_sandbox_path(spec.workspace_dir)
    lim = spec.limits
    fds: list[int] = []
    a: list[str] = [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        *([] if spec.network else ["--unshare-net"]),
        "--disable-userns",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_GID),
        "--hostname",
        SANDBOX_HOSTNAME,
        "--cap-drop",
        "ALL",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ]
    env = {
        "PATH": SANDBOX_PATH,
        "HOME": SANDBOX_HOME,
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        **spec.env,
    }
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"bad environment variable {key!r}")
        a += ["--setenv", key, value]

    # System: /usr read-only; top-level lib/bin dirs mirror the host (symlink or bind).
    a += ["--ro-bind", "/usr", "/usr"]
    for name in _ROOT_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            a += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            a += ["--ro-bind", str(host), f"/{name}"]
    a += ["--perms", "0755", "--dir", "/etc"]
    for name in ETC_FILES:
        a += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for name in _generated_etc():
        a += ["--perms", "0644", "--ro-bind-data", f"{{fd:{name}}}", f"/etc/{name}"]
    if spec.network:
        resolv = Path("/etc/resolv.conf").resolve()
        if resolv.is_file():
            a += ["--ro-bind", str(resolv), "/etc/resolv.conf"]

    size = ["--size", str(lim.tmpfs_bytes)] if lim.tmpfs_bytes else []
    a += ["--proc", "/proc", "--dev", "/dev"]
    a += ["--perms", "1777", *size, "--tmpfs", "/dev/shm"]
    a += ["--perms", "1777", *size, "--tmpfs", "/tmp"]
    a += ["--perms", "0755", "--dir", "/var", "--symlink", "/tmp", "/var/tmp"]
    a += ["--perms", "0755", *size, "--tmpfs", "/home"]
    a += ["--perms", "0700", "--dir", SANDBOX_HOME]

    a += ["--ro-bind" if spec.workspace_readonly else "--bind", str(workspace), ws_dir]
    shared = workspace.parent / SHARED_OBJECTS
    dest = posixpath.join(posixpath.dirname(ws_dir), SHARED_OBJECTS)
    if shared.is_symlink() and shared.is_dir():  # read-only: the mirror is every attempt's
        a += ["--ro-bind", str(shared.resolve()), dest]
    elif shared.is_dir():  # a multi-repository workspace: a link per repository
        for link in sorted(shared.iterdir()):
            if link.is_symlink() and link.is_dir() and not link.name.startswith("."):
                a += ["--ro-bind", str(link.resolve()), posixpath.join(dest, link.name)]
    binds = [(p, d, "--ro-bind") for p, d in spec.ro_binds.items()]
    binds += [(p, d, "--bind") for p, d in spec.rw_binds.items()]
    # Parents before children, so a bind inside another bind is not hidden by it.
    for host_path, dest, flag in sorted(binds, key=lambda b: _check_sandbox_path(b[1]).count("/")):
        if not Path(host_path).exists():
            raise ValueError(f"bind source {host_path} does not exist")
        a += [flag, str(Path(host_path).resolve()), _check_sandbox_path(dest)]

    # /proc read-only: the sandbox uid is the server's uid on the host, and for host root the
    # kernel allows writing most of /proc/sys (core_pattern, …) without any capability.
    a += ["--remount-ro", "/dev", "--remount-ro", "/proc", "--remount-ro", "/"]
    a += ["--chdir", _check_sandbox_path(spec.cwd) if spec.cwd else ws_dir]
    # Everything is valid: only now create the fds (nothing to leak on a ValueError).
    try:
        for name, data in _generated_etc().items():
            fd = _memfd(f"etc-{name}", data)
            fds.append(fd)
            a[a.index(f"{{fd:{name}}}")] = str(fd)
        try:
            fd = seccomp.program_fd()  # the command runs under it (and everything it starts)
        except seccomp.SeccompUnavailable as exc:  # no unfiltered fallback
            raise SandboxUnavailable(str(exc)) from exc
        fds.append(fd)
        a += ["--seccomp", str(fd)]
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return a, fds


def _rlimits(lim: Limits, cg: cgroups.CgroupHost | None) -> list[tuple[int, int, int]]:
    have = cg.controllers if cg else frozenset()
    wanted: list[tuple[int, int | None]] = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, lim.max_file_bytes),
        (resource.RLIMIT_NOFILE, lim.max_open_files),
        (resource.RLIMIT_CPU, lim.cpu_seconds),
    ]
    # Fallbacks when no cgroup does it better. RLIMIT_NPROC counts every process of the
    # host uid, and the kernel ignores it for root; RLIMIT_DATA is per process.
    if "pids" not in have:
        wanted.append((resource.RLIMIT_NPROC, lim.max_processes))
    if "memory" not in have:
        wanted.append((resource.RLIMIT_DATA, lim.memory_bytes))
    out: list[tuple[int, int, int]] = []
    root = os.geteuid() == 0
    for res, value in wanted:
        if value is None:
            continue
        # CPU: SIGXCPU at the soft limit (a clear reason), SIGKILL a second later.
        soft, hard = value, value + 1 if res == resource.RLIMIT_CPU else value
        _, host_hard = resource.getrlimit(res)
        if not root and host_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, host_hard), min(hard, host_hard)
        out.append((res, soft, hard))
    return out


_PRLIMIT = {
    resource.RLIMIT_CORE: "--core",
    resource.RLIMIT_FSIZE: "--fsize",
    resource.RLIMIT_NOFILE: "--nofile",
    resource.RLIMIT_CPU: "--cpu",
    resource.RLIMIT_NPROC: "--nproc",
    resource.RLIMIT_DATA: "--data",
}


def _prlimit(limits: list[tuple[int, int, int]]) -> list[str]:
    """``prlimit`` setting ``limits`` (``_rlimits``'s) on itself, then running what follows."""

    def value(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else str(v)

    options = [f"{_PRLIMIT[res]}={value(soft)}:{value(hard)}" for res, soft, hard in limits]
    return [lifeline.tool("prlimit"), *options, "--"] if options else []


def disk_enforcement(limit_mb: int) -> str:
    """How this host enforces an attempt's disk budget of ``limit_mb`` (for the log)."""
    if limit_mb <= 0:
        return "off (WHAM_SANDBOX_DISK_MB=0): an attempt may fill the disk"
    cg = cgroups.host()
    frozen = cg is not None and "freezer" in cg.controllers
    how = (
        "measured with the sandbox frozen (cgroup freezer)"
        if frozen
        else "measured while the sandbox runs (no cgroup freezer)"
    )
    return (
        f"{limit_mb} MB per attempt (WHAM_SANDBOX_DISK_MB), enforced by a usage monitor "
        f"(no size-limited file system), {how}"
    )


def host_gaps() -> list[str]:
    """Limits this host cannot enforce (empty when everything is); for logs and docs."""
    cg = cgroups.host()
    have = cg.controllers if cg else frozenset()
    gaps: list[str] = []
    if "pids" not in have:
        gap = "no pids cgroup: processes are limited by RLIMIT_NPROC"
        if os.geteuid() == 0:
            gap += ", which does not apply to root: a fork bomb runs until the wall-clock limit"
        gaps.append(gap)
    if "memory" not in have:
        gaps.append("no memory cgroup: memory is limited per process (RLIMIT_DATA), not in total")
    if "cpu" not in have:
        gaps.append("no cpu cgroup: `cpus` is not enforced")
    if "freezer" not in have:
        gaps.append(
            "no cgroup freezer: the disk budget is measured while the sandbox runs, "
            "so a file moved from directory to directory during a measure can escape it"
        )
    return gaps


_MAX_HELD_LINES = 10_000


def _tail_append(buf: deque[bytes], size: list[int], data: bytes, cap: int) -> bool:
    buf.append(data)
    size[0] += len(data)
    dropped = False
    while size[0] > cap and len(buf) > 1:
        size[0] -= len(buf.popleft())
        dropped = True
    if size[0] > cap:
        buf[0] = buf[0][size[0] - cap :]
        size[0] = cap
        dropped = True
    return dropped


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


_STOPPED_STATES = frozenset("TtZX")


def _task_states(pid: int) -> list[str] | None:
    """The state letter of each thread of ``pid`` (``None`` when it is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    states = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                states.append(f.read().rsplit(b")", 1)[1].split()[0].decode())
        except (OSError, IndexError):
            continue
    return states


def _is_helper(pid: int, helpers: tuple[str, ...]) -> bool:
    if not helpers:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return False
    return any(h.encode() in words for h in helpers)


def _tree_pids(outer: int) -> list[int]:
    """``outer`` and every process below it (the sandbox's processes, seen from the host)."""
    seen: list[int] = []
    todo = [outer]
    while todo and len(seen) < 100_000:
        pid = todo.pop()
        seen.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            children = f"/proc/{pid}/task/{tid}/children"
            with contextlib.suppress(OSError, ValueError), open(children) as f:
                todo += [int(x) for x in f.read().split()]
    return seen


def _stalled_tree(outer: int, helpers: tuple[str, ...] = ()) -> list[str] | None:
    """The states of the sandbox's processes when all of them are stopped or zombies;
    ``None`` as soon as one thread may still make progress. The outer bwrap and bwrap's init
    (pid 1 inside) are not counted: they only wait for their children; nor are ``helpers``."""
    seen: list[str] = []
    todo = [(outer, 0)]
    while todo:
        pid, depth = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [(int(x), depth + 1) for x in f.read().split()]
            except OSError:
                continue
        if depth < 2 or _is_helper(pid, helpers):
            continue
        states = _task_states(pid)
        if not states:  # gone (None), or reaped between listing its threads and reading them
            continue
        if any(st not in _STOPPED_STATES for st in states):
            return None
        seen.append("Z" if "Z" in states else states[0])
        if len(seen) > 100_000:
            break
    return seen or None


class SandboxProcess:
    """A running sandbox. Create with ``start``; always finish with ``wait`` or ``kill``."""

    def __init__(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None,
        on_output: Callable[[str, str], None] | None,
        hold: bool = False,
        ready_marker: str | None = None,
    ) -> None:
        if not argv:
            raise ValueError("empty command")
        if hold and stdin is not None:
            raise ValueError("a held sandbox gets its stdin from send()")
        self.spec = spec
        self.argv = list(argv)
        self._bwrap = require_bwrap()
        self._stdin = stdin
        self._hold = hold
        self._background = spec.background  # lowered CPU weight (read under _lock after start)
        self._released = threading.Event()
        if not hold:
            self._released.set()
        self._on_output = on_output
        self._held: list[tuple[str, str]] = []
        self._ready_marker = ready_marker
        self._ready = threading.Event()
        self._marker_seen = False
        self._deadline = 0.0
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._done = threading.Event()
        self._exit_events: list[threading.Event] = []
        self._start_error: BaseException | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._reaped = False
        self._reasons: list[str] = []
        self._timed_out = False
        self._cgroup: cgroups.RunCgroup | None = None
        self._out: dict[str, tuple[deque[bytes], list[int]]] = {
            "stdout": (deque(), [0]),
            "stderr": (deque(), [0]),
        }
        self._truncated = False
        self._result: SandboxResult | None = None
        self._t0 = time.monotonic()
        self._last_progress = self._t0  # output, or a thread not stopped (the watchdog)
        self._stalled = False
        self._meter: disk.Meter | None = None
        self._lease: list[IO[bytes]] = []  # the overlay's checkout and snapshot, in use
        self._upper: int | None = None  # the overlay's upper directory, this sandbox's alone
        self._disk_lock = threading.Lock()
        self._disk_reason: str | None = None
        self._disk_next = 0.0  # no measure before (unless it may be over)
        self._disk_walked = 0.0  # when the last measure was
        self._disk_snap: disk.Signals | None = None  # the signs of growth then
        self._disk_bytes = spec.disk.start_bytes if spec.disk else 0  # what it found
        self._readers: list[threading.Thread] = []  # stdout and stderr, once started
        self._readers_started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sandbox", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    @property
    def pid(self) -> int | None:
        """Host pid of the outer bwrap process."""
        return self._popen.pid if self._popen else None

    @property
    def cgroup(self) -> cgroups.RunCgroup | None:
        return self._cgroup

    def signal_command(self, signum: int) -> bool:
        """Send ``signum`` to the sandbox's command only: pid 2 of its PID namespace, a child
        of bwrap's init (the outer bwrap's child). False when it is gone."""
        outer = self.pid
        if outer is None or self._done.is_set():
            return False
        for init in _children(outer):
            for pid in _children(init):
                try:
                    with open(f"/proc/{pid}/status") as f:
                        nspid = next((ln.split()[1:] for ln in f if ln.startswith("NSpid:")), [])
                except OSError:
                    continue
                if nspid[-1:] == ["2"] and len(nspid) > 1:
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        return False
                    return True
        return False

    # -- the thread that owns the process (bwrap's parent-death signal is per thread) --

    def _spawn(self) -> subprocess.Popen[bytes]:
        lim = self.spec.limits
        args, fds = build_args(self.spec)
        try:
            layers = overlay.of(self.spec.workspace)
            if layers is not None:
                layers.options()
                try:
                    self._upper = overlay.claim_upper(layers)
                except overlay.OverlayUnavailable as exc:
                    raise SandboxUnavailable(str(exc)) from exc
                self._lease = overlay.hold(layers)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        target = self.spec.workspace.resolve()
        cghost = cgroups.host()
        try:
            if self.spec.disk is not None:
                self._meter = disk.Meter(self.spec.disk.paths)
            before: list[str] = []
            if layers is not None:  # bwrap's namespaces are made from this one
                before.append(overlay.mount_line(layers, target))
            if cghost is not None:
                self._cgroup = cgroups.RunCgroup.create(
                    cghost,
                    max_pids=lim.max_processes,
                    memory_bytes=lim.memory_bytes,
                    cpus=lim.cpus,
                    background=self._background,
                )
                before += [f"printf 0 > {shlex.quote(str(p))}" for p in self._cgroup.procs()]
            args_fd = _memfd("bwrap-args", b"".join(x.encode() + b"\0" for x in args))
            fds.append(args_fd)
            limits = _prlimit(_rlimits(lim, cghost))
            # Started without a preexec_fn (vfork: no fork of the server, lifeline.command).
            # Dies with this thread from the start on: bwrap's --die-with-parent is armed only
            # once bwrap runs, and a server killed before that left the sandbox running. The
            # chain: setpriv (the signal), unshare (an overlay's mount namespace), sh (checks
            # the parent, mounts the overlay, joins the cgroup), prlimit (the rlimits), bwrap.
            argv = lifeline.command(
                [*limits, self._bwrap, "--args", str(args_fd), "--", *self.argv],
                mount_namespace=layers is not None,
                before=before,
            )
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE
                if self._stdin is not None or self._hold
                else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=fds,
                start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
            )
            if self._cgroup is not None:  # in its group from here on, whatever sh got to
                self._cgroup.add(popen.pid)  # (sh's own join is what bwrap's children need)
            return popen
        finally:
            for fd in fds:
                os.close(fd)

    def _run(self) -> None:
        try:
            popen = self._spawn()
        except BaseException as exc:
            self._start_error = exc
            if self._cgroup is not None:
                self._cgroup.remove()
            if self._meter is not None:
                self._meter.close()
            self._release_overlay()
            self._started.set()
            return
        self._popen = popen
        self._t0 = self._last_progress = time.monotonic()
        if self._meter is not None:  # growth is counted from here (the budget's start_bytes)
            with contextlib.suppress(OSError):
                self._disk_snap = disk.signals(self._meter.fd, [popen.pid])
            self._disk_walked = self._t0
        pidfd = os.pidfd_open(popen.pid)
        self._started.set()
        try:
            self._supervise(popen, pidfd)
        except BaseException as exc:  # no result would leave its waiters waiting for good
            log.exception("sandbox supervision failed after the run; killing what is left")
            self._kill(f"sandbox supervision failed ({type(exc).__name__})")
            with self._lock:
                code = popen.wait()
                self._reaped = True
                self._released.set()
            if self._cgroup is not None:
                with contextlib.suppress(Exception):
                    self._cgroup.kill_all()
                    self._cgroup.remove()
            self._result = SandboxResult(
                exit_code=code,
                timed_out=self._timed_out,
                killed_reason="; ".join(self._reasons) or None,
                stdout="",
                stderr="",
                duration=time.monotonic() - self._t0,
                output_truncated=self._truncated,
                stalled=self._stalled,
                disk_reason=self._disk_reason,
            )
        finally:
            os.close(pidfd)
            with self._disk_lock:
                if self._meter is not None:
                    self._meter.close()
                    self._meter = None
            self._release_overlay()
            with self._lock:
                self._done.set()
                for event in self._exit_events:
                    event.set()

    def _release_overlay(self) -> None:
        for lease in self._lease:
            lease.close()
        self._lease = []
        if self._upper is not None:
            os.close(self._upper)
            self._upper = None

    def _supervise(self, popen: subprocess.Popen[bytes], pidfd: int) -> None:
        lim = self.spec.limits
        readers = [
            threading.Thread(target=self._read, args=(stream, name), daemon=True)
            for stream, name in ((popen.stdout, "stdout"), (popen.stderr, "stderr"))
        ]
        self._readers = list(readers)
        if self._stdin is not None or self._hold:
            readers.append(threading.Thread(target=self._feed, args=(popen.stdin,), daemon=True))
        for t in readers:
            t.start()
        self._readers_started.set()
        self._deadline = self._t0 + lim.wall_clock_seconds
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        # send() may move the deadline, so wake at least every half second to re-read it
        while not poller.poll(min(0.5, max(0.0, self._deadline - time.monotonic())) * 1000):
            now = time.monotonic()
            if now >= self._deadline:
                self._timed_out = True
                self._kill(f"wall-clock limit of {lim.wall_clock_seconds:g} s reached")
                break
            try:
                if lim.stall_seconds is not None and self._watch_stall(popen.pid, now):
                    break
                if self._meter is not None and self._watch_disk(popen.pid, now):
                    break
            except Exception as exc:  # a watchdog's bug must not leave the run unwatched
                log.exception("sandbox supervision failed; killing the run")
                self._kill(f"sandbox supervision failed ({type(exc).__name__})")
                break
        with self._lock:
            returncode = popen.wait()
            self._reaped = True
            self._released.set()  # a held sandbox that died: the stdin thread closes the pipe
        self._ready.set()
        if self._meter is not None and self._disk_reason is None:
            self._measure_disk(None)  # what it left: written after the last measure?
        # The PID namespace died with bwrap; the cgroup sweep is the second guarantee.
        if self._cgroup is not None:
            self._cgroup.kill_all()
        for t in readers:
            t.join(timeout=2.0)
        if not any(t.is_alive() for t in readers):  # closing under a blocked reader hangs
            for stream in (popen.stdout, popen.stderr, popen.stdin):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        events = self._cgroup.events() if self._cgroup is not None else None
        if self._cgroup is not None:
            self._cgroup.remove()
        duration = time.monotonic() - self._t0
        failed = returncode != 0 or self._timed_out
        reasons = list(self._reasons)
        if failed and events is not None:
            if events.oom_kills:
                reasons.append("memory limit reached")
            if events.pids_max_hits:
                reasons.append(f"process limit of {lim.max_processes} reached")
        if returncode == 128 + signal.SIGXFSZ:
            reasons.append("file size limit reached")
        elif returncode == 128 + signal.SIGXCPU:
            reasons.append("CPU time limit reached")
        out = {k: b"".join(v[0]).decode("utf-8", "replace") for k, v in self._out.items()}
        self._result = SandboxResult(
            exit_code=returncode,
            timed_out=self._timed_out,
            killed_reason="; ".join(reasons) or None,
            stdout=out["stdout"],
            stderr=out["stderr"],
            duration=duration,
            output_truncated=self._truncated,
            stalled=self._stalled,
            disk_reason=self._disk_reason,
        )

    def _watch_stall(self, outer: int, now: float) -> bool:
        """The watchdog's look at the process tree (only after a second without output);
        True when it killed the run for having stalled."""
        stall = self.spec.limits.stall_seconds
        if stall is None or now - self._last_progress < min(1.0, stall):
            return False
        states = _stalled_tree(outer, self.spec.idle_helpers)
        if states is None:
            self._last_progress = now
            return False
        if now - self._last_progress < stall:
            return False
        counts = ", ".join(f"{n} {st}" for st, n in sorted(Counter(states).items()))
        self._stalled = True
        self._kill(
            f"stalled: no output and no process able to run for {stall:g} s "
            f"(all {len(states)} processes stopped or zombie: {counts})"
        )
        return True

    def _watch_disk(self, outer: int, now: float) -> bool:
        """The disk monitor's turn; True when it killed the run."""
        if not self._released.is_set():  # a held standby: Codex waits for its prompt
            return False
        return self._disk_due(outer, now, quiet=now - self._disk_walked < disk.QUIET_SECONDS)

    def _disk_due(self, outer: int, now: float, *, quiet: bool) -> bool:
        """Measure when the signs of growth since the last measure show it may be over the
        budget (any sign: its processes' writes, the file system's free bytes or inodes),
        or (no sooner than ``_disk_next``) when its processes wrote more than
        ``QUIET_BYTES``, or always once ``quiet`` is false. The file system's signs alone
        do not make a measure below the budget: on a busy host they move all the time.
        True when the measure found it over."""
        budget, meter = self.spec.disk, self._meter
        snap = self._disk_snap
        if budget is None or meter is None:
            return False
        if snap is not None:
            try:
                now_signals = disk.signals(meter.fd, _tree_pids(outer))
                growth = now_signals.growth_since(snap)
                written = now_signals.written_since(snap)
            except OSError:  # also the meter closed meanwhile (the run ended: check_disk's
                # thread is not the sandbox's); the measure, under the lock, sees it closed
                growth = written = budget.max_bytes
            may_be_over = growth > budget.max_bytes - self._disk_bytes
            small = quiet and written <= disk.QUIET_BYTES
            if not may_be_over and (now < self._disk_next or small):
                return False
        return self._measure_disk(outer)

    def _measure_disk(self, outer: int | None) -> bool:
        """Measure the disk budget's directories (``outer``: the running sandbox, frozen
        meanwhile where the host can, and the deleted files its processes hold); over the
        budget, kill the run. True when it is over."""
        budget = self.spec.disk
        assert budget is not None
        with self._disk_lock:
            meter = self._meter
            if meter is None or self._disk_reason is not None:
                return self._disk_reason is not None
            t0 = time.monotonic()
            cg = self._cgroup if outer is not None else None
            frozen = cg is not None and cg.freeze()
            try:
                pids = _tree_pids(outer) if outer is not None else []
                with contextlib.suppress(OSError):  # before the walk: what follows is growth
                    self._disk_snap = disk.signals(meter.fd, pids)
                usage = meter.measure(budget.max_bytes, pids)
            finally:
                if frozen and cg is not None:
                    cg.thaw()
            self._disk_walked = time.monotonic()
            took = self._disk_walked - t0
            self._disk_next = self._disk_walked + max(DISK_INTERVAL, DISK_DUTY * took)
            self._disk_bytes = usage.bytes
            over = usage.over_reason is not None or usage.bytes > budget.max_bytes
            reason = budget.reason(usage) if over else None
            self._disk_reason = reason
        if reason is not None:
            if outer is None:
                with self._lock:
                    self._reasons.append(reason)
            else:
                self._kill(reason)
        return reason is not None

    def _read(self, stream: IO[bytes] | None, name: str) -> None:
        if stream is None:
            return
        buf, size = self._out[name]
        cap = self.spec.limits.max_output_bytes
        marker = self._ready_marker.encode() if self._ready_marker else None
        with contextlib.suppress(OSError, ValueError):
            while line := stream.readline(_MAX_LINE):
                if name == "stderr" and not self._marker_seen and line.rstrip(b"\n") == marker:
                    self._marker_seen = True
                    self._ready.set()
                    continue
                self._last_progress = time.monotonic()
                if _tail_append(buf, size, line, cap):
                    self._truncated = True
                text = line.decode("utf-8", "replace").rstrip("\n")
                with self._lock:
                    callback = self._on_output
                    if callback is None and self._hold and len(self._held) < _MAX_HELD_LINES:
                        self._held.append((name, text))
                if callback is not None:
                    with contextlib.suppress(Exception):
                        callback(name, text)

    def _feed(self, stream: IO[bytes] | None) -> None:
        if stream is None:
            return
        self._released.wait()
        if self._stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.write(self._stdin)
        with contextlib.suppress(OSError, ValueError):
            stream.close()

    def _kill(self, reason: str) -> None:
        with self._lock:
            if not self._reasons:
                self._reasons.append(reason)
            if self._popen is not None and not self._reaped:
                # bwrap and the sandbox's init share this process group; the init's death
                # takes the whole PID namespace with it.
                with contextlib.suppress(OSError):
                    os.killpg(self._popen.pid, signal.SIGKILL)
        if self._cgroup is not None:
            self._cgroup.kill_all(timeout=0.5)

    # -- public --

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the command printed ``ready_marker`` on stderr (its sandbox is set up:
        binds resolved, so host paths may move). ``False`` on timeout or if it ended."""
        return self._ready.wait(timeout) and self._marker_seen and self.poll() is None

    def send(self, stdin: bytes, on_output: Callable[[str, str], None] | None = None) -> bool:
        """Release a sandbox started with ``hold=True``: ``on_output`` gets the lines held so
        far and then every new one, in order; ``stdin`` is written (and closed); the wall
        clock starts again from now. ``False`` if the sandbox had already ended."""
        if not self._hold:
            raise RuntimeError("send() is for a sandbox started with hold=True")
        self.hurry()  # an attempt's now: the normal CPU weight before it reads its prompt
        while True:  # replay until nothing new was held meanwhile, then switch over
            with self._lock:
                held, self._held = self._held, []
                if not held:
                    self._on_output = on_output
                    break
            if on_output is not None:
                for name, text in held:
                    with contextlib.suppress(Exception):
                        on_output(name, text)
        with self._lock:
            if self._released.is_set():
                return False
            self._stdin = stdin
            self._t0 = time.monotonic()
            self._last_progress = self._t0
            self._deadline = self._t0 + self.spec.limits.wall_clock_seconds
            self._released.set()
        return True

    def hurry(self) -> None:
        """From now on, the normal CPU weight (a ``background`` run's start-up is waited
        for, or it was taken by an attempt); a no-op otherwise or without a cpu cgroup."""
        with self._lock:
            if not self._background:
                return
            self._background = False
            group = self._cgroup
        if group is not None:
            with contextlib.suppress(OSError):  # gone with the run
                group.set_background(False)

    def drain(self, timeout: float) -> bool:
        """Once the run has ended: wait until every line it wrote went through ``on_output``
        (the readers reached the end of both pipes and returned from the callback). The
        result is taken at most 2 s after the end, which a callback that waits (a database
        write under contention) can outlast, its pipe still holding the last lines. ``False``
        if that takes longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        if not self._readers_started.wait(timeout):
            return False
        for t in self._readers:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._readers)

    def check_disk(self) -> bool:
        """Check the disk budget now (the run's result is in, but its sandbox still closes
        down): measured unless the signs of growth show less than ``QUIET_BYTES`` since the
        last measure. Over it, the run is killed and ``True`` returned."""
        outer = self.pid
        if self._meter is None or self._done.is_set() or outer is None:
            return self._disk_reason is not None
        return self._disk_due(outer, float("inf"), quiet=True) or self._disk_reason is not None

    def kill(self, reason: str = "killed on request") -> SandboxResult:
        """Kill the whole process tree now and return the result (within about a second)."""
        if not self._done.is_set():
            self._kill(reason)
        return self.wait()

    def notify_on_exit(self, event: threading.Event) -> None:
        """Set ``event`` when the run has ended (at once if it has): a caller can wait for
        the end or for something else with one ``event.wait``."""
        with self._lock:
            if self._done.is_set():
                event.set()
            else:
                self._exit_events.append(event)

    def poll(self) -> SandboxResult | None:
        """The result if the run has ended, else ``None``."""
        return self._result if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> SandboxResult:
        """Wait for the end (the wall-clock limit applies regardless); ``TimeoutError`` if
        ``timeout`` passes first."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"sandbox still running after {timeout} s")
        assert self._result is not None
        return self._result

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill("sandbox closed")


def start(
    spec: SandboxSpec,
    argv: Sequence[str],
    *,
    stdin: bytes | None = None,
    on_output: Callable[[str, str], None] | None = None,
    hold: bool = False,
    ready_marker: str | None = None,
) -> SandboxProcess:
    """Start ``argv`` in a sandbox. ``on_output(stream, line)`` is called from a reader
    thread for every line of "stdout" and "stderr" as it arrives (keep it quick: the sandbox
    waits while it runs; lines over 4 MiB arrive in pieces). ``stdin`` ``None`` means
    /dev/null. Raises ``SandboxUnavailable`` without bwrap, ``ValueError`` for a bad spec.

    ``hold=True`` starts a standby: the command runs with its stdin open and empty until
    :meth:`SandboxProcess.send` gives it its input (a Codex started this way does its
    start-up work and then waits for the prompt). The first stderr line equal to
    ``ready_marker`` is not output: it marks the sandbox as set up (:meth:`wait_ready`)."""
    return SandboxProcess(
        spec, argv, stdin=stdin, on_output=on_output, hold=hold, ready_marker=ready_marker
    )


def run(
    spec: SandboxSpec,
    argv: Sequence[str],
    *,
    stdin: bytes | None = None,
    on_output: Callable[[str, str], None] | None = None,
) -> SandboxResult:
    """Run ``argv`` in a sandbox to its end (or its wall-clock limit)."""
    return start(spec, argv, stdin=stdin, on_output=on_output).wait()


def selftest() -> str | None:
    """Run ``true`` in a minimal sandbox; ``None`` if it works, else the reason it does not."""
    try:
        with tempfile.TemporaryDirectory(prefix="openwham-selftest-") as tmp:
            result = run(SandboxSpec(workspace=Path(tmp), workspace_readonly=True), ["true"])
    except SandboxUnavailable as exc:
        return str(exc)
    if result.exit_code != 0:
        return f"bubblewrap cannot create a sandbox here: {result.stderr.strip()[-500:]}"
    return None
