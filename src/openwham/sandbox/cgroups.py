"""Per-run cgroups for sandboxes: limits (pids, memory, CPU), membership, kill and accounting.

Optional and detected: cgroup v2 (``/sys/fs/cgroup/cgroup.controllers``) or the v1
hierarchies ``/sys/fs/cgroup/{pids,memory,cpu,freezer}``. Each run gets its own group
``…/openwham/<pidns>-<pid>-<n>-<hex>`` under the server's own cgroup where that is possible (so the
server's own limits still cover its sandboxes), else under the hierarchy's root. The process
that will exec bubblewrap joins the group before the exec (writes ``0`` to each of
:meth:`RunCgroup.procs`), so nothing the sandbox starts can escape it; afterwards
``kill_all`` empties it and ``remove`` deletes it.

Without cgroups a sandbox still runs: the PID namespace alone guarantees the kill, but
processes and memory are then bounded by rlimits only (see ``openwham.sandbox.bwrap``).

A run may start in the *background* (``background=True``): its group's CPU weight is a
64th of a normal one (v2 ``cpu.weight`` 2 of 100, v1 ``cpu.shares`` 16 of 1024), so while
other sandboxes want the cores it gets little of them, and all of any idle core;
``set_background(False)`` gives it the normal weight (a standby sandbox taken by an attempt,
or waited for by one).

``freeze``/``thaw`` stop a run's processes while its disk use is measured
(``openwham.sandbox.disk``): v2's ``cgroup.freeze``, v1's freezer hierarchy. A v1-frozen
process does not even die of SIGKILL until thawed, so every kill thaws first.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import signal
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("pids", "memory", "cpu")
FREEZER = "freezer"  # v1's hierarchy; v2 has cgroup.freeze in every group
GROUP_NAME = "openwham"
_CPU_PERIOD_US = 100_000
#: (normal, background) CPU weights: v2 ``cpu.weight``, v1 ``cpu.shares``
_CPU_WEIGHT = {2: ("100", "2"), 1: ("1024", "16")}
_counter = itertools.count(1)


def _pid_namespace() -> int:
    """Group names start with it: a server's pid means something only inside its own PID
    namespace, and containers may share one cgroup hierarchy."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@dataclass(frozen=True)
class CgroupHost:
    """What this host offers: cgroup ``version`` (1 or 2) and, per usable controller, the
    directory under which per-run groups are created (v2: one directory for all)."""

    version: int
    parents: dict[str, Path]

    @property
    def controllers(self) -> frozenset[str]:
        """Usable controllers; ``freezer`` when runs can be frozen (always on v2)."""
        return frozenset(self.parents) | ({FREEZER} if self.version == 2 else frozenset())


def _own_paths() -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; v2's line is under the key ``""``."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for name in parts[1].split(",") if parts[1] else [""]:
            out[name] = parts[2]
    return out


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _sweep_stale(parent: Path) -> None:
    """Empty and remove groups left by dead servers of this PID namespace.

    A server killed at the very moment bubblewrap was setting up can leave a sandbox behind
    (bwrap's init arms its parent-death signal only after it forked the command); its group
    is how the next server finds and ends it."""
    ns = str(_pid_namespace())
    with contextlib.suppress(OSError):
        for child in parent.iterdir():
            parts = child.name.split("-")
            if not child.is_dir() or len(parts) < 2 or parts[0] != ns or not parts[1].isdigit():
                continue
            if int(parts[1]) == os.getpid():
                continue
            try:
                os.kill(int(parts[1]), 0)
                continue
            except ProcessLookupError:
                pass
            except OSError:
                continue
            _thaw_dir(child)  # a server killed while measuring a run's disk use left it frozen
            for _ in range(100):
                try:
                    procs = [int(x) for x in (child / "cgroup.procs").read_text().split()]
                except (OSError, ValueError):
                    procs = []
                for p in procs:
                    _kill_pid(p, child.name)
                try:
                    child.rmdir()
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    time.sleep(0.01)


def _usable_parent(base: Path) -> Path | None:
    parent = base / GROUP_NAME
    try:
        parent.mkdir(exist_ok=True)
    except OSError:
        return None
    if not os.access(parent, os.W_OK):
        return None
    _sweep_stale(parent)
    return parent


def _probe_v1(root: Path) -> CgroupHost | None:
    own = _own_paths()
    parents: dict[str, Path] = {}
    # the freezer first: its sweep thaws what a killed server left frozen, which would not
    # die of the other hierarchies' sweeps
    for ctrl in (FREEZER, *CONTROLLERS):
        mount = root / ctrl
        if not (mount / "cgroup.procs").is_file():
            continue
        rel = own.get(ctrl, "/").lstrip("/")
        base = mount / rel if rel and (mount / rel).is_dir() else mount
        parent = _usable_parent(base) or (_usable_parent(mount) if base != mount else None)
        if parent is not None:
            parents[ctrl] = parent
    return CgroupHost(1, parents) if parents else None


def _enable(group: Path, wanted: list[str]) -> list[str]:
    """Enable ``wanted`` controllers for ``group``'s children; returns those enabled."""
    try:
        available = (group / "cgroup.controllers").read_text().split()
    except OSError:
        return []
    for ctrl in wanted:
        if ctrl in available:
            with contextlib.suppress(OSError):
                _write(group / "cgroup.subtree_control", f"+{ctrl}")
    try:
        enabled = (group / "cgroup.subtree_control").read_text().split()
    except OSError:
        return []
    return [c for c in wanted if c in enabled]


def _probe_v2(root: Path) -> CgroupHost | None:
    rel = _own_paths().get("", "/").lstrip("/")
    # Our own group first (delegated setups); it usually holds processes, which v2 forbids
    # for a group whose children use controllers, so the hierarchy root is the fallback.
    candidates = [root / rel] if rel else []
    candidates.append(root)
    for base in candidates:
        if not base.is_dir() or not _enable(base, list(CONTROLLERS)):
            continue
        parent = _usable_parent(base)
        if parent is None:
            continue
        enabled = _enable(parent, list(CONTROLLERS))
        if enabled:
            return CgroupHost(2, {c: parent for c in enabled})
    return None


def probe(root: Path = CGROUP_ROOT) -> CgroupHost | None:
    """Detect usable cgroups (v2 first, then v1); ``None`` when there are none we may use."""
    if (root / "cgroup.controllers").is_file():
        return _probe_v2(root)
    if any((root / c / "cgroup.procs").is_file() for c in CONTROLLERS):
        return _probe_v1(root)
    return None


@cache
def host() -> CgroupHost | None:
    """``probe()`` once per process."""
    return probe()


@dataclass(frozen=True)
class CgroupEvents:
    oom_kills: int
    pids_max_hits: int


class RunCgroup:
    """The cgroup(s) of one sandbox run."""

    def __init__(self, cghost: CgroupHost, name: str, dirs: dict[str, Path]) -> None:
        self.host = cghost
        self.name = name
        self.dirs = dirs  # controller -> directory (v2: the same one for all)

    @classmethod
    def create(
        cls,
        cghost: CgroupHost,
        *,
        max_pids: int | None,
        memory_bytes: int | None,
        cpus: float | None,
        background: bool = False,
    ) -> RunCgroup:
        name = f"{_pid_namespace()}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(3)}"
        dirs: dict[str, Path] = {}
        group = cls(cghost, name, dirs)
        try:
            for ctrl, parent in cghost.parents.items():
                d = parent / name
                if d not in dirs.values():
                    d.mkdir()
                dirs[ctrl] = d
            group._limit(max_pids, memory_bytes, cpus)
            if background:
                group.set_background(True)
        except BaseException:
            group.remove()
            raise
        return group

    def _limit(self, max_pids: int | None, memory_bytes: int | None, cpus: float | None) -> None:
        v2 = self.host.version == 2
        if max_pids is not None and "pids" in self.dirs:
            _write(self.dirs["pids"] / "pids.max", str(max_pids))
        if memory_bytes is not None and "memory" in self.dirs:
            d = self.dirs["memory"]
            if v2:
                _write(d / "memory.max", str(memory_bytes))
                with contextlib.suppress(OSError):
                    _write(d / "memory.swap.max", "0")
            else:
                _write(d / "memory.limit_in_bytes", str(memory_bytes))
                with contextlib.suppress(OSError):  # absent without swap accounting
                    _write(d / "memory.memsw.limit_in_bytes", str(memory_bytes))
        if cpus is not None and "cpu" in self.dirs:
            d = self.dirs["cpu"]
            quota = max(1000, int(cpus * _CPU_PERIOD_US))
            if v2:
                _write(d / "cpu.max", f"{quota} {_CPU_PERIOD_US}")
            else:
                _write(d / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(quota))

    def set_background(self, background: bool) -> bool:
        """Give the group the background or the normal CPU weight; ``False`` without a cpu
        controller (nothing changes)."""
        d = self.dirs.get("cpu")
        if d is None:
            return False
        normal, low = _CPU_WEIGHT[self.host.version]
        name = "cpu.weight" if self.host.version == 2 else "cpu.shares"
        _write(d / name, low if background else normal)
        return True

    def cpu_weight(self) -> int | None:
        """The group's CPU weight (v2 ``cpu.weight``, v1 ``cpu.shares``), if it has one."""
        d = self.dirs.get("cpu")
        if d is None:
            return None
        name = "cpu.weight" if self.host.version == 2 else "cpu.shares"
        return int((d / name).read_text().strip())

    def procs(self) -> list[Path]:
        """Each distinct ``cgroup.procs``: writing ``0`` to each moves the writer into the
        group (a sandbox's launch, ``sandbox.bwrap``)."""
        return [d / "cgroup.procs" for d in dict.fromkeys(self.dirs.values())]

    def add(self, pid: int) -> None:
        """Move process ``pid`` into the group (from outside it; nothing if it is gone).
        What it started before stays where it was: a launch joins itself before it starts
        anything (``procs``)."""
        for procs in self.procs():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                _write(procs, str(pid))

    def _procs_file(self) -> Path:
        d = self.dirs.get("pids") or next(iter(self.dirs.values()))
        return d / "cgroup.procs"

    def pids(self) -> list[int]:
        """Processes in the group now (empty when gone or removed)."""
        try:
            return [int(x) for x in self._procs_file().read_text().split()]
        except (OSError, ValueError):
            return []

    def freeze(self, timeout: float = 1.0) -> bool:
        """Stop every process of the run (they cannot run, fork or write until
        :meth:`thaw`); ``True`` once all are frozen, ``False`` without a freezer or when
        they did not freeze within ``timeout`` (then they are thawed again)."""
        d = self._freezer_dir()
        if d is None:
            return False
        v2 = self.host.version == 2
        try:
            _write(d / ("cgroup.freeze" if v2 else "freezer.state"), "1" if v2 else "FROZEN")
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        while True:
            try:
                if v2:
                    frozen = _read_key(d / "cgroup.events", "frozen") == 1
                else:
                    frozen = (d / "freezer.state").read_text().strip() == "FROZEN"
            except OSError:
                frozen = False
            if frozen:
                return True
            if time.monotonic() > deadline:
                self.thaw()
                return False
            time.sleep(0.001)

    def thaw(self) -> None:
        """Let the run's processes go on (nothing happens when they are not frozen)."""
        d = self._freezer_dir()
        if d is not None:
            _thaw_dir(d)

    def _freezer_dir(self) -> Path | None:
        if self.host.version == 2:
            return next(iter(self.dirs.values()), None)
        return self.dirs.get(FREEZER)

    def kill_all(self, timeout: float = 1.0) -> bool:
        """SIGKILL everything in the group until it is empty; ``True`` when it is."""
        self.thaw()  # a frozen v1 process would not die
        kill_file = self._procs_file().parent / "cgroup.kill"
        if self.host.version == 2 and kill_file.exists():
            with contextlib.suppress(OSError):
                _write(kill_file, "1")
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:
                _kill_pid(pid, self.name)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def events(self) -> CgroupEvents:
        """OOM kills and refused forks (pids.max reached) so far."""
        oom = 0
        hits = 0
        if "memory" in self.dirs:
            d = self.dirs["memory"]
            name = "memory.events" if self.host.version == 2 else "memory.oom_control"
            oom = _read_key(d / name, "oom_kill")
        if "pids" in self.dirs:
            hits = _read_key(self.dirs["pids"] / "pids.events", "max")
        return CgroupEvents(oom, hits)

    def remove(self) -> None:
        """Delete the group(s); retries briefly while the kernel finishes exiting tasks."""
        self.thaw()
        for d in dict.fromkeys(self.dirs.values()):
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    for pid in self.pids():
                        _kill_pid(pid, self.name)
                    time.sleep(0.01)


def _thaw_dir(group: Path) -> None:
    with contextlib.suppress(OSError):
        if (group / "cgroup.freeze").exists():
            _write(group / "cgroup.freeze", "0")
        elif (group / "freezer.state").exists():
            _write(group / "freezer.state", "THAWED")


def _kill_pid(pid: int, group: str) -> None:
    """SIGKILL ``pid`` without risk of hitting a recycled pid: the pidfd pins the process we
    then check is still in the run's group ``group`` (by reading its cgroup file after)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if f"/{GROUP_NAME}/{group}" not in Path(f"/proc/{pid}/cgroup").read_text():
            return
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _read_key(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
