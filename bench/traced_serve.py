"""``python -m bench.traced_serve serve …``: ``wham serve`` with timing wrappers.

Only used for the start-up breakdown (the headline figures come from the plain ``wham``
entry point). It wraps, without changing behaviour, the functions ``Engine.run_turn`` calls
and appends one JSON line per span or point to ``$BENCH_TRACE``:
``{"turn": id, "name": …, "t0": time.time(), "t1": time.time()}``.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_local = threading.local()
_path = os.environ.get("BENCH_TRACE", "")
_file = open(_path, "a", buffering=1) if _path else None  # noqa: SIM115


def emit(name: str, t0: float, t1: float | None = None, turn: str | None = None, **extra: Any) -> None:
    if _file is None:
        return
    record = {"turn": turn or getattr(_local, "turn", None), "name": name, "t0": t0, "t1": t1, **extra}
    with _lock:
        _file.write(json.dumps(record) + "\n")


def span(name: str, fn: Callable[..., Any], describe: Callable[..., dict[str, Any]] | None = None) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            emit(name, t0, time.time(), **(describe(*args, **kwargs) if describe else {}))

    return wrapper


def install() -> None:
    from openwham.engine import attempt, executor, recorder
    from openwham.gateway import app as gateway_app
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

    attempt.Engine.run_turn = traced_run_turn  # type: ignore[method-assign]

    submit = executor.InProcessExecutor.submit

    def traced_submit(self: Any, turn_ids: Any) -> None:
        ids = list(turn_ids)
        for turn_id in ids:
            emit("submit", time.time(), turn=turn_id)
        submit(self, ids)

    executor.InProcessExecutor.submit = traced_submit  # type: ignore[method-assign]

    attempt.Engine._claim = span("claim", attempt.Engine._claim)  # type: ignore[method-assign]
    attempt.Engine._generate_title = span("title", attempt.Engine._generate_title)  # type: ignore[method-assign]
    workspace.Mirrors.ensure = span("mirror_ensure", workspace.Mirrors.ensure)  # type: ignore[method-assign]
    attempt.create_workspace = span("create_workspace", attempt.create_workspace)
    workspace.git = span("git", workspace.git, lambda *a, **k: {"cmd": a[0] if a else "?"})
    attempt.codex.codex_home_files = span("codex_home_files", attempt.codex.codex_home_files)
    gateway_app.Gateway.register_attempt = span("register_attempt", gateway_app.Gateway.register_attempt)  # type: ignore[method-assign]
    attempt.TurnRecorder.message = span("recorder_message", recorder.TurnRecorder.message)  # type: ignore[method-assign]
    attempt.TurnRecorder.status = span("recorder_status", recorder.TurnRecorder.status)  # type: ignore[method-assign]
    attempt.TurnRecorder.finish = span("recorder_finish", recorder.TurnRecorder.finish)  # type: ignore[method-assign]
    attempt.workspace_diff = span("workspace_diff", attempt.workspace_diff)

    start = bwrap.start

    def traced_start(spec: Any, argv: Any, *, stdin: Any = None, on_output: Any = None) -> Any:
        turn = getattr(_local, "turn", None)
        seen = {"stdout": False, "stderr": False}

        def hook(stream: str, line: str) -> None:
            if not seen.get(stream):
                seen[stream] = True
                emit(f"sandbox_first_{stream}", time.time(), turn=turn, line=line[:120])
            if on_output is not None:
                on_output(stream, line)

        t0 = time.time()
        proc = start(spec, argv, stdin=stdin, on_output=hook)
        emit("bwrap_start_call", t0, time.time(), argv0=str(argv[0]))
        wait = proc.wait

        def traced_wait(*args: Any, **kwargs: Any) -> Any:
            result = wait(*args, **kwargs)
            if not getattr(proc, "_bench_done", False):
                proc._bench_done = True
                emit("sandbox_exit", time.time(), turn=turn, duration=getattr(result, "duration", None))
            return result

        proc.wait = traced_wait
        return proc

    bwrap.start = traced_start

    authenticate = gateway_app.Gateway._authenticate

    def traced_authenticate(self: Any, request: Any) -> Any:
        t = time.time()
        record = authenticate(self, request)
        emit("gateway_request", t, turn=getattr(record, "attempt_id", None))
        return record

    gateway_app.Gateway._authenticate = traced_authenticate  # type: ignore[method-assign]


def main() -> None:
    install()
    from openwham.cli.main import main as wham_main

    wham_main()


if __name__ == "__main__":
    main()
