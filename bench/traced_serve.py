"""``python -m bench.traced_serve serve …``: ``wham serve`` with timing wrappers.

Only used for the start-up breakdown (the headline figures come from the plain ``wham``
entry point). It wraps, without changing behaviour, the functions ``Engine.run_turn`` calls
and appends one JSON line per span or point to ``$BENCH_TRACE``:
``{"turn": id, "name": …, "t0": time.time(), "t1": time.time()}``.

With ``$BENCH_SAMPLE`` (a path) a thread samples, every ``$BENCH_SAMPLE_MS`` (10) ms, each
server thread's CPU time since the last sample (``/proc/self/task/TID/stat``) and its stack,
and charges that CPU to the stack's innermost openwham function (``own``) and to its leaf
function (``leaf``), in seconds, written to the path every 5 s and at exit: where the
server's own CPU goes (approximately: a thread's CPU between two samples is charged to
where it was at the second).

Every process the server starts (``subprocess.Popen``) is a point ``spawn``: ``what`` the
program (``git <verb>``, ``bwrap``, …, wrappers such as ``setpriv`` looked through), ``cpu``
the starting thread's CPU seconds in ``_execute_child`` (the fork or vfork and exec, with
the GIL held in the fork of a ``preexec_fn``), ``preexec`` whether it had one
(:func:`spawn_summary` counts them per run).

With ``$BENCH_CODEX_RUST_LOG`` (a ``RUST_LOG`` filter) the sandboxed Codex logs to its
stderr, and each of its log lines after the prompt is written becomes a point
``codex_log`` at Codex's own timestamp (``msg``: the line without its span prefix);
those lines are not passed on to the engine.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_local = threading.local()
_path = os.environ.get("BENCH_TRACE", "")
_file = open(_path, "a", buffering=1) if _path else None  # noqa: SIM115


def emit(
    name: str, t0: float, t1: float | None = None, turn: str | None = None, **extra: Any
) -> None:
    if _file is None:
        return
    record = {
        "turn": turn or getattr(_local, "turn", None),
        "name": name,
        "t0": t0,
        "t1": t1,
        **extra,
    }
    with _lock:
        _file.write(json.dumps(record) + "\n")


def span(
    name: str, fn: Callable[..., Any], describe: Callable[..., dict[str, Any]] | None = None
) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            emit(name, t0, time.time(), **(describe(*args, **kwargs) if describe else {}))

    return wrapper


def _wrap(owner: Any, attr: str, name: str, **kw: Any) -> None:
    """Time ``owner.attr`` as span ``name``; a renamed function is reported, not fatal (the
    breakdown then lacks that row)."""
    fn = getattr(owner, attr, None)
    if fn is None:
        print(f"bench.traced_serve: {owner.__name__}.{attr} not found: not traced", file=sys.stderr)
        return
    setattr(owner, attr, span(name, fn, **kw))


#: programs that start another given on their command line (``openwham.lifeline``'s)
_WRAPPERS = frozenset({"setpriv", "unshare", "prlimit", "sh", "env"})


def spawn_kind(argv: Any) -> str:
    """``git <verb>`` for a git command line (its ``-c``/``-C`` options skipped), else the
    program's name; wrappers (``setpriv … sh -c … git …``) are looked through."""
    if isinstance(argv, (str, bytes)):
        argv = [argv]
    names = [os.path.basename(os.fsdecode(a)) for a in argv]
    for i, name in enumerate(names):
        if name == "git":
            rest = iter(names[i + 1 :])
            for arg in rest:
                if arg in ("-c", "-C"):
                    next(rest, None)
                elif not arg.startswith("-"):
                    return f"git {arg}"
            return "git"
        if name == "bwrap":
            return "bwrap"
    return next((n for n in names if n not in _WRAPPERS and not n.startswith("-")), names[0])


def spawn_summary(events: list[dict[str, Any]], t0: float, t1: float) -> str:
    """The ``spawn`` points from ``t0`` to ``t1``: how many of each kind, and the starting
    threads' CPU in ``_execute_child`` in all."""
    found = [e for e in events if e["name"] == "spawn" and t0 <= e["t0"] <= t1]
    kinds: dict[str, int] = {}
    for e in found:
        kinds[e["what"]] = kinds.get(e["what"], 0) + 1
    cpu = sum(e.get("cpu", 0.0) for e in found) * 1000
    wall = sum((e.get("t1") or e["t0"]) - e["t0"] for e in found) * 1000
    each = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda x: (-x[1], x[0])))
    return (
        f"{len(found)} processes ({each or 'none'}); starting them {cpu:.0f} ms CPU, "
        f"{wall:.0f} ms wall"
    )


def _trace_spawns() -> None:
    execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def traced(self: Any, args: Any, executable: Any, preexec_fn: Any, *a: Any, **k: Any) -> Any:
        t0, c0 = time.time(), time.thread_time()
        try:
            return execute_child(self, args, executable, preexec_fn, *a, **k)
        finally:
            cpu = time.thread_time() - c0
            emit("spawn", t0, time.time(), what=spawn_kind(args), cpu=cpu, preexec=bool(preexec_fn))

    setattr(subprocess.Popen, "_execute_child", traced)  # noqa: B010


def _trace_thread_starts() -> None:
    """``thread_start``: each ``Thread.start`` of an attempt's thread (it waits until the new
    thread runs, which needs the GIL), with the new thread's name."""
    start = threading.Thread.start

    def traced(self: threading.Thread) -> None:
        t0 = time.time()
        start(self)
        if getattr(_local, "turn", None) is not None:
            emit("thread_start", t0, time.time(), thread=self.name)

    setattr(threading.Thread, "start", traced)  # noqa: B010


def install() -> None:
    _trace_spawns()
    from openwham.engine import agent, attempt, executor, recorder, result, standby, titling
    from openwham.engine import workspace as engine_workspace
    from openwham.gateway import app as gateway_app
    from openwham.runtimes import codex
    from openwham.sandbox import bwrap, workspace

    run_turn = attempt.Engine.run_turn

    def traced_run_turn(self: Any, turn_id: str, control: Any = None) -> Any:
        _local.turn = turn_id
        t0 = time.time()
        try:
            return run_turn(self, turn_id, control)
        finally:
            emit("run_turn", t0, time.time())
            _local.turn = None

    setattr(attempt.Engine, "run_turn", traced_run_turn)  # noqa: B010

    submit = executor.InProcessExecutor.submit

    def traced_submit(self: Any, turn_ids: Any) -> None:
        ids = list(turn_ids)
        for turn_id in ids:
            emit("submit", time.time(), turn=turn_id)
        submit(self, ids)

    setattr(executor.InProcessExecutor, "submit", traced_submit)  # noqa: B010

    _wrap(attempt.Engine, "_claim", "claim")
    # what an attempt's thread does between its claim and its take
    _wrap(recorder.TurnRecorder, "__init__", "recorder_init")
    _wrap(titling.Titles, "start", "titles_start")
    _wrap(engine_workspace.Workspaces, "prepare", "prepare")
    _trace_thread_starts()
    _wrap(attempt.Engine, "_write_title", "title")
    _wrap(workspace.Mirrors, "ensure", "mirror_ensure")
    # the names Workspaces.prepare_cold calls (create_workspace before workspace_at)
    for name in ("create_workspace", "workspace_at"):
        if hasattr(engine_workspace, name):
            _wrap(engine_workspace, name, "create_workspace")
    _wrap(workspace, "git", "git", describe=lambda *a, **k: {"cmd": a[0] if a else "?"})
    _wrap(codex, "codex_home_files", "codex_home_files")
    _wrap(gateway_app.Gateway, "register_attempt", "register_attempt")
    _wrap(
        gateway_app.Gateway,
        "release",
        "gateway_release",
        describe=lambda self, attempt_id, *a, **k: {"attempt": attempt_id},
    )

    # called on the agent's output threads too, where no turn is set: named by the recorder
    def of_recorder(self: Any, *a: Any, **k: Any) -> dict[str, Any]:
        return {"turn": self.turn_id}

    _wrap(recorder.TurnRecorder, "message", "recorder_message", describe=of_recorder)
    _wrap(recorder.TurnRecorder, "status", "recorder_status", describe=of_recorder)
    _wrap(recorder.TurnRecorder, "finish", "recorder_finish", describe=of_recorder)
    _wrap(recorder.TurnRecorder, "flush", "recorder_flush", describe=of_recorder)
    # its writer thread's writes (the recorder's own thread since the calls queue)
    _wrap(recorder.TurnRecorder, "_write", "recorder_write", describe=of_recorder)
    _wrap(
        gateway_app.Gateway,
        "_final_response",
        "gateway_final_response",
        describe=lambda self, record, *a, **k: {"turn": record.attempt_id},
    )
    _wrap(
        agent.AgentRun,
        "early_diff",
        "early_diff",
        describe=lambda self: {"turn": self.claim.turn_id},
    )
    _wrap(result.Results, "finish", "results_finish")
    pump = gateway_app._Passthrough._pump

    async def traced_pump(self: Any, send: Any) -> None:
        t0 = time.time()  # the upstream's answer began (its headers are in)
        try:
            await pump(self, send)
        finally:
            emit("gateway_response", t0, time.time(), turn=self.record.attempt_id)

    setattr(gateway_app._Passthrough, "_pump", traced_pump)  # noqa: B010
    _wrap(attempt, "workspace_diff", "workspace_diff")
    _wrap(engine_workspace.Workspaces, "take_standby", "take_standby")
    _wrap(standby.StandbyPool, "take", "pool_take")  # its wait for a fill under way
    # a standby into the pool's ready list (a take has it at once from then on); older trees
    # have no ``_made`` (then not traced)
    _wrap(
        standby.StandbyPool,
        "_made",
        "standby_ready",
        describe=lambda self, key, prepared: {"turn": None, "standby": prepared.dir.name},
    )
    for name in ("branch_head", "branch_ref"):  # branch_ref since it reads the files
        if hasattr(engine_workspace, name):
            _wrap(engine_workspace, name, "branch_head")
    rust_log = os.environ.get("BENCH_CODEX_RUST_LOG")
    if rust_log:
        sandbox_env = codex.sandbox_env
        setattr(  # noqa: B010
            codex, "sandbox_env", lambda token: {**sandbox_env(token), "RUST_LOG": rust_log}
        )

    start = bwrap.start

    def traced_start(spec: Any, argv: Any, **kw: Any) -> Any:
        turn = [getattr(_local, "turn", None)]  # None for a standby until it is taken
        seen = {"stdout": False, "stderr": False}

        def hooked(on_output: Any) -> Any:
            def hook(stream: str, line: str) -> None:
                if stream == "stderr" and _codex_log(line, turn[0]):
                    return
                if not seen.get(stream):
                    seen[stream] = True
                    emit(f"sandbox_first_{stream}", time.time(), turn=turn[0], line=line[:120])
                if stream == "stdout" and '"turn.completed"' in line:
                    emit("turn_completed_line", time.time(), turn=turn[0])
                elif stream == "stderr" and line == getattr(codex, "WRITTEN_MARKER", None):
                    emit("result_written", time.time(), turn=turn[0])
                if on_output is not None:
                    on_output(stream, line)

            return hook

        if kw.get("on_output") is not None:
            kw["on_output"] = hooked(kw["on_output"])
        t0 = time.time()
        proc = start(spec, argv, **kw)
        emit("bwrap_start_call", t0, time.time(), turn=turn[0], argv0=str(argv[0]))
        send = proc.send

        def traced_send(stdin: Any, on_output: Any = None) -> Any:
            turn[0] = getattr(_local, "turn", None)
            emit("prompt_sent", time.time(), turn=turn[0])
            return send(stdin, hooked(on_output))

        setattr(proc, "send", traced_send)  # noqa: B010

        def on_exit() -> None:
            result = proc.wait()
            emit("sandbox_exit", time.time(), turn=turn[0], duration=result.duration)

        threading.Thread(target=on_exit, daemon=True).start()
        return proc

    setattr(bwrap, "start", traced_start)  # noqa: B010

    authenticate = gateway_app.Gateway._authenticate

    def traced_authenticate(self: Any, request: Any) -> Any:
        t = time.time()
        record = authenticate(self, request)
        emit("gateway_request", t, turn=getattr(record, "attempt_id", None))
        return record

    setattr(gateway_app.Gateway, "_authenticate", traced_authenticate)  # noqa: B010


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CODEX_LOG = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z +[A-Z]+ +(.*)")


def _codex_log(line: str, turn: str | None) -> bool:
    """A line of Codex's own log (``RUST_LOG``): emitted as ``codex_log`` at its time."""
    found = _CODEX_LOG.match(_ANSI.sub("", line))  # app-server colours its log, exec not
    if found is None:
        return False
    at = datetime.datetime.fromisoformat(found.group(1) + "+00:00").timestamp()
    message = found.group(2)
    cut = message.rfind("}: ")
    emit("codex_log", at, turn=turn, msg=(message[cut + 3 :] if cut >= 0 else message)[:200])
    return True


def _sampler(path: str, every: float) -> None:
    """Charges the threads' CPU to their stacks (see the module's doc) until the process ends."""
    import atexit
    import collections

    own = collections.Counter[str]()
    leaf = collections.Counter[str]()
    seen: dict[int, float] = {}
    samples = [0]
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(native: int | None) -> float | None:
        try:
            with open(f"/proc/self/task/{native}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            return None

    def loop() -> None:
        me = threading.get_ident()
        while True:
            time.sleep(every)
            samples[0] += 1
            if samples[0] % max(1, int(5 / every)) == 0:
                dump()  # also when the process is killed
            natives = {t.ident: t.native_id for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                native = natives.get(ident)
                used = cpu(native) if ident != me and native is not None else None
                if used is None or native is None:
                    continue
                spent, seen[native] = used - seen.get(native, used), used
                if spent <= 0:
                    continue
                code = frame.f_code
                leaf[f"{code.co_filename.rsplit('/', 2)[-1]}:{code.co_name}"] += spent
                f: Any = frame
                while f is not None and "/openwham/" not in f.f_code.co_filename:
                    f = f.f_back
                where = (
                    f"{f.f_code.co_filename.split('/openwham/', 1)[1]}:{f.f_code.co_name}"
                    if f is not None
                    else "(no openwham frame)"
                )
                own[where] += spent

    def dump() -> None:
        with open(path, "w") as out:
            json.dump({"samples": samples[0], "every": every, "own": own, "leaf": leaf}, out)

    atexit.register(dump)
    threading.Thread(target=loop, name="bench-sampler", daemon=True).start()


def main() -> None:
    install()
    if os.environ.get("BENCH_SAMPLE"):
        _sampler(os.environ["BENCH_SAMPLE"], float(os.environ.get("BENCH_SAMPLE_MS", "10")) / 1000)
    from openwham.cli.main import main as wham_main

    wham_main()


if __name__ == "__main__":
    main()
