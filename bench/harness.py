"""The pieces the benchmark drives: the scripted model, a real ``wham serve``, plain Codex.

Nothing here reaches the network: the model is ``tests/support/scripted_model.py`` on
127.0.0.1, the repository is a local path, Codex's network features are off.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
WHAM = VENV_BIN / "wham"
MODEL = "gpt-5.5"  # a slug Codex 0.169.0 knows: it offers the freeform apply_patch tool
TERMINAL = ("completed", "failed", "cancelled")
PREFIX = "/backend-api/wham"

if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from support.scripted_model import Patch, Say, ScriptedModel, Shell, Step  # noqa: E402

from .repo import TARGET, TARGET_LINE  # noqa: E402

MARKER = re.compile(r"bench-run-(\d+)")


def task_script() -> list[Step]:
    """The (b) task: a few shell commands, one apply_patch edit, a final message."""
    return [
        Shell("ls && git status --short | head -5"),
        Shell("grep -rl 'def f0003_1' src | head -3"),
        Shell(f"wc -l {TARGET} && head -5 {TARGET}"),
        Patch(
            "*** Begin Patch\n"
            f"*** Update File: {TARGET}\n"
            "@@\n"
            f"-{TARGET_LINE.splitlines()[1]}\n"
            f"+{TARGET_LINE.splitlines()[1].replace('x + 0', 'x + 1')}\n"
            "*** End Patch"
        ),
        Shell(f"git diff --stat && python3 -c 'print(open(\"{TARGET}\").read()[:40])'"),
        Say("I changed f0000_0 to add one."),
    ]


def prompt(run: str) -> str:
    return f"bench-run-{run}: make f0000_0 in {TARGET} add one instead of zero."


# --------------------------------------------------------------------------- scripted model


@dataclass
class ModelClock:
    """Arrival times (``time.perf_counter()`` and ``time.time()``) of the first model request
    of each run, keyed by the ``bench-run-<n>`` marker in the prompt; plus every request."""

    first: dict[str, tuple[float, float]] = field(default_factory=dict)
    arrivals: dict[str, list[float]] = field(default_factory=dict)
    arrivals_wall: dict[str, list[float]] = field(default_factory=dict)
    requests: int = 0
    _events: dict[str, threading.Event] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def expect(self, run: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(run, threading.Event())

    def on_request(self, body: dict[str, Any]) -> None:
        now = (time.perf_counter(), time.time())
        self.requests += 1
        found = MARKER.search(json.dumps(body.get("input") or []))
        if not found:
            return
        run = found.group(1)
        with self._lock:
            self.arrivals.setdefault(run, []).append(now[0])
            self.arrivals_wall.setdefault(run, []).append(now[1])
            if run in self.first:
                return
            self.first[run] = now
            event = self._events.setdefault(run, threading.Event())
        event.set()


def start_model() -> tuple[ScriptedModel, ModelClock]:
    clock = ModelClock()
    model = ScriptedModel(on_request=clock.on_request).start()
    return model, clock


# --------------------------------------------------------------------------- wham serve


def add_mode_argument(ap: argparse.ArgumentParser) -> None:
    """``--mode``: ``WHAM_CODEX_MODE`` values to compare, one server each (repeatable)."""
    ap.add_argument(
        "--mode",
        action="append",
        default=[],
        choices=["exec", "app-server"],
        help="WHAM_CODEX_MODE, one server per tree and mode (default: the server's default)",
    )


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHAM_")}
    env.update(extra)
    return env


@dataclass
class WhamServer:
    url: str
    data_dir: Path
    process: subprocess.Popen[str]
    log_path: Path
    token: str = ""
    standby: bool = True
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))
    #: the group whose CPU is the server's and all it started (None: not available)
    account: CpuAccount | None = None

    @classmethod
    def start(
        cls,
        data_dir: Path,
        model_url: str,
        *,
        log_path: Path,
        module: str | None = None,
        extra_env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> WhamServer:
        """``wham serve --port 0 --data-dir D`` (or ``python -m <module> serve …``)."""
        env = _clean_env(
            {
                "WHAM_MODEL_PROVIDER": "openai-compatible",
                "WHAM_MODEL_BASE_URL": model_url,
                "WHAM_MODEL_API_KEY": "sk-bench-anything",
                "WHAM_MODEL": MODEL,
                # a fresh data dir has fresh usage windows, but N can be large
                "WHAM_RATE_LIMIT_PRIMARY": "1000000",
                "WHAM_RATE_LIMIT_SECONDARY": "1000000",
                **(extra_env or {}),
            }
        )
        argv = [sys.executable, "-m", module] if module else [str(WHAM)]
        argv += ["serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir)]
        argv += extra_args
        account = CpuAccount.create()
        proc = subprocess.Popen(
            account.wrap(argv) if account else argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        log = open(log_path, "w")  # noqa: SIM115 (closed by the pump thread)
        url = None
        seen: list[str] = []
        for line in proc.stdout:
            log.write(line)
            seen.append(line)
            m = re.match(r"openwham (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            proc.wait(10)
            raise RuntimeError("wham serve did not print its URL:\n" + "".join(seen))

        def pump() -> None:
            assert proc.stdout is not None
            with log:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()

        threading.Thread(target=pump, daemon=True).start()
        server = cls(url=url, data_dir=data_dir, process=proc, log_path=log_path, account=account)
        server.standby = env.get("WHAM_STANDBY_SANDBOXES", "2") != "0"
        deadline = time.monotonic() + 30
        while True:
            try:
                if server.client.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"wham serve did not become healthy; see {log_path}")
            time.sleep(0.05)
        out = subprocess.run(
            [str(WHAM), "token", "create", "--data-dir", str(data_dir)],
            check=True,
            capture_output=True,
            text=True,
            # the server's database (a token made in another one would be refused)
            env=_clean_env({k: v for k, v in env.items() if k == "WHAM_DATABASE_URL"}),
        )
        server.token = out.stdout.strip()
        server.client.headers["Authorization"] = f"Bearer {server.token}"
        return server

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        if self.account is not None:
            self.account.remove()

    def cpu_seconds(self) -> float:
        """CPU of the server and of everything it started, sandboxes included
        (:class:`CpuAccount`); without the group, what :func:`cpu_seconds` sees."""
        if self.account is not None:
            return self.account.seconds()
        return cpu_seconds(self.process.pid)

    @property
    def cpu_scope(self) -> str:
        """What :meth:`cpu_seconds` counts, for a report's label."""
        if self.account is not None:
            return "server and all it started, sandboxes included"
        return "server and reaped children only: not the sandboxes' processes (no cpuacct)"

    def api(self, path: str) -> str:
        return f"{self.url}{PREFIX}/{path.lstrip('/')}"

    def create_env(self, repo: Path) -> str:
        r = self.client.post(
            self.api("environments"), json={"label": "bench/repo", "repos": [str(repo)]}
        )
        r.raise_for_status()
        return str(r.json()["id"])

    def create_task(self, env_id: str, text: str) -> tuple[str, str]:
        body = {
            "new_task": {"environment_id": env_id},
            "input_items": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"content_type": "text", "text": text}],
                }
            ],
        }
        deadline = time.monotonic() + 60
        while True:  # a 503 (the admission gate) created nothing: ask again when told
            r = self.client.post(self.api("tasks"), json=body)
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(float(r.headers.get("retry-after") or 1))
        if r.status_code != 200:
            raise RuntimeError(f"POST tasks: {r.status_code} {r.text}")
        data = r.json()
        return str(data["task"]["id"]), str(data["turn"]["id"])

    def stream(
        self,
        task_id: str,
        turn_id: str,
        timeout: float = 180,
        client: httpx.Client | None = None,
    ) -> tuple[list[dict[str, Any]], float]:
        """Read the turn's SSE stream to its terminal ``task_turn_event`` (with ``client``, or
        the server's). Returns the frames' data and ``perf_counter()`` when the terminal frame
        arrived."""
        frames: list[dict[str, Any]] = []
        url = self.api(f"tasks/{task_id}/turns/{turn_id}/stream")
        with (client or self.client).stream("GET", url, timeout=timeout) as r:
            r.raise_for_status()
            data: list[str] = []
            for line in r.iter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                    continue
                if line or not data:
                    continue
                frame = json.loads("\n".join(data))
                data = []
                frames.append(frame)
                payload = frame.get("payload") or {}
                if (
                    frame.get("item_type") == "task_turn_event"
                    and payload.get("turn_status") in TERMINAL
                ):
                    return frames, time.perf_counter()
        raise RuntimeError(f"stream of {turn_id} ended without a terminal event")

    def wait_cleanup(self, turn_id: str, timeout: float = 30) -> None:
        """Wait until the engine removed the attempt's workspace (its ``finally``), so the
        next run does not share the disk with a 5,000-file ``rm -rf``; then, if the server
        keeps standby sandboxes, until the next one waits for its prompt (the server is idle
        again, as between the tasks of a person)."""
        ws = self.data_dir / "attempts" / turn_id / "workspace"
        deadline = time.monotonic() + timeout
        while ws.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.standby:
            while not (self.standbys_ready(1) and self._standby_settled()):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)

    def standbys_ready(self, enough: int | None = None) -> int:
        """How many standbys the server's pool holds ready, i.e. a take has them at once
        (counted up to ``enough``): the files of ``attempts/.ready-standbys``
        (``engine.workspace.READY_STANDBYS``). A server from before that directory (an older
        ``--tree``): its sandboxed Codex processes waiting for their prompt
        (:func:`standbys_waiting`), which a take may not have yet (its pool takes it in once
        its thread has seen the sandbox's ready marker)."""
        shown = self.data_dir / "attempts" / ".ready-standbys"
        if not shown.is_dir():
            return standbys_waiting(self.process.pid, enough)
        try:
            found = sum(1 for _ in shown.iterdir())
        except OSError:
            return 0
        return found if enough is None else min(found, enough)

    def _standby_settled(self) -> bool:
        """The engine rewrote a standby's index after its checkout (1 s after the clone), or
        the standby is an overlay (its index is the shared checkout's, settled once per
        commit; its workspace shows nothing on the host, where it is not mounted)."""
        for standby in (self.data_dir / "attempts").glob(".standby-*"):
            if (standby / "overlay-lower").is_symlink():
                return True
        for git_dir in (self.data_dir / "attempts").glob(".standby-*/workspace/.git"):
            try:
                if (git_dir / "index").stat().st_mtime - (git_dir / "HEAD").stat().st_mtime > 1:
                    return True
            except OSError:
                continue
        return False


CPUACCT = Path("/sys/fs/cgroup/cpuacct")


class CpuAccount:
    """A cgroup v1 ``cpuacct`` group of the bench's own (``openwham-bench-<pid>-<n>``) that a
    server starts in: its ``cpuacct.usage`` is the CPU of the server and of everything it
    started, sandboxes included. The server's ``cutime`` is not: bubblewrap's outer process
    exits on its child's exit code without reaping it, so a sandbox's CPU never reaches its
    parent (a sandbox's 0.6 s loop adds 0.0 s to the server's ``cutime``). openwham puts
    its sandboxes into cgroups of the cpu, memory, pids and freezer hierarchies, never
    cpuacct, so they stay in this group. ``None`` from :meth:`create` where there is no
    such hierarchy (cgroup v2: the sandboxes would leave the group)."""

    _made = 0

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls) -> CpuAccount | None:
        cls._made += 1
        path = CPUACCT / f"openwham-bench-{os.getpid()}-{cls._made}"
        try:
            path.mkdir()
        except OSError:
            return None
        return cls(path)

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` started inside the group (a shell joins it, then execs ``argv``)."""
        procs = str(self.path / "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

    def seconds(self) -> float:
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        """Once its processes are gone (a sandbox still ending is waited for a little)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """CPU of ``pid`` and of the children it reaped, in seconds (``/proc/PID/stat`` utime +
    stime + cutime + cstime). Not a server's sandboxes (:class:`CpuAccount` says why):
    :meth:`WhamServer.cpu_seconds` counts them where it can."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (only what this bench started)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:  # it ended meanwhile
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(children)
            todo.extend(children)
    return found


def standby_waiting(server_pid: int) -> bool:
    """Whether a standby's Codex under ``server_pid`` waits for its prompt (see
    :func:`standbys_waiting`)."""
    return standbys_waiting(server_pid, 1) >= 1


def standbys_waiting(server_pid: int, enough: int | None = None) -> int:
    """How many sandboxed Codex processes (argv[0] is the in-sandbox binary path) under the
    server ``server_pid`` are blocked reading their stdin, i.e. standby sandboxes that
    finished their start-up (counted up to ``enough``); from ``/proc/PID/task/*/syscall``
    (``0 0x0 …`` is read(0, …) on x86-64). Only the server's own descendants: another
    server on the machine has standbys too. In
    app-server mode the driver reads its stdin (the prompt) once its Codex's thread started.
    """
    from openwham.runtimes import codex
    from openwham.runtimes.appserver import SANDBOX_DRIVER

    found = 0
    for pid in descendants(server_pid):
        proc = Path(f"/proc/{pid}")
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            execs = argv[0].decode() == codex.SANDBOX_CODEX_BIN and b"exec" in argv
            if not execs and SANDBOX_DRIVER.encode() not in argv:
                continue
            for task in (proc / "task").iterdir():
                if (task / "syscall").read_text().split()[:2] == ["0", "0x0"]:
                    found += 1
                    break
        except (OSError, UnicodeDecodeError, IndexError):
            continue
        if enough is not None and found >= enough:
            break
    return found


def stream_summary(frames: list[dict[str, Any]]) -> dict[str, float | None]:
    """Server-side timestamps (``time.time()``) of the milestones in a turn's events."""
    out: dict[str, float | None] = {
        "setting_up": None,
        "title": None,
        "first_worklog": None,
        "first_status_after_setup": None,
        "terminal": None,
    }
    for f in frames:
        kind, payload, ts = f.get("item_type"), f.get("payload") or {}, f.get("timestamp")
        if kind == "task_turn_event":
            if payload.get("text") == "Setting up" and out["setting_up"] is None:
                out["setting_up"] = ts
            elif payload.get("turn_status") in TERMINAL:
                out["terminal"] = ts
            elif out["first_status_after_setup"] is None:
                out["first_status_after_setup"] = ts
        elif kind == "task_title_generated" and out["title"] is None:
            out["title"] = ts
        elif kind == "work_log_message" and out["first_worklog"] is None:
            out["first_worklog"] = ts
    return out


def final_status(frames: list[dict[str, Any]]) -> str:
    for f in reversed(frames):
        payload = f.get("payload") or {}
        if f.get("item_type") == "task_turn_event" and payload.get("turn_status") in TERMINAL:
            if payload.get("turn_status") != "completed":
                return f"{payload.get('turn_status')}: {payload.get('error')}"
            return "completed"
    return "no terminal event"


# --------------------------------------------------------------------------- plain codex


@dataclass
class PlainRun:
    wall: float  # codex exec start → exit (seconds)
    first_request: float | None  # codex exec start → first model request
    last_request: float | None  # codex exec start → last model request
    arrivals: list[float]  # codex exec start → each model request
    clone: float  # the fresh `git clone` before it (not part of `wall`)
    exit_code: int
    completed: bool


def run_plain_codex(
    repo: Path, scratch: Path, home: Path, model_url: str, clock: ModelClock, run: str
) -> PlainRun:
    """The same pinned binary, the same config (``codex_home_files`` with the provider
    pointed straight at the scripted model), the same argv (``codex.command``), directly in a
    fresh ``git clone`` of the repository (settled, see below): no server, no sandbox, no
    gateway. ``home`` is kept between runs, as a user's ``~/.codex`` is: Codex's state
    databases exist after the first run (a fresh CODEX_HOME would charge plain Codex for
    creating them, which openwham's standby does before the task)."""
    from openwham.runtimes import codex
    from openwham.runtimes.codex_cli import native_binary

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    work = scratch / "work"
    t0 = time.perf_counter()
    subprocess.run(["git", "clone", "-q", str(repo), str(work)], check=True, capture_output=True)
    clone = time.perf_counter() - t0
    # Settle the clone like any clone older than a second (and like openwham's standby
    # workspaces): otherwise every index entry is "racily clean" and the task's first `git
    # status` re-reads all 5,000 files.
    time.sleep(1.05)
    subprocess.run(["git", "update-index", "-q", "--refresh"], cwd=work, check=True)
    home.mkdir(mode=0o700, exist_ok=True)
    for name, text in codex.codex_home_files(base_url=model_url, model=MODEL).items():
        (home / name).write_text(text)
    cmd = codex.command(prompt(run), workdir=str(work), executable=str(native_binary()))
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(scratch),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "CODEX_HOME": str(home),
        codex.TOKEN_ENV: "sk-bench-anything",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(cmd.argv, input=cmd.stdin, env=env, capture_output=True, timeout=180)
    wall = time.perf_counter() - t0
    arrived = clock.first.get(run)
    arrivals = clock.arrivals.get(run, [])
    completed = b'"turn.completed"' in proc.stdout
    if not completed:
        sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
    return PlainRun(
        wall=wall,
        first_request=(arrived[0] - t0) if arrived else None,
        last_request=(arrivals[-1] - t0) if arrivals else None,
        arrivals=[a - t0 for a in arrivals],
        clone=clone,
        exit_code=proc.returncode,
        completed=completed,
    )


def iter_trace(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
