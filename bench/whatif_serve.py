"""``python -m bench.whatif_serve serve …``: ``wham serve`` with prototype optimizations.

An experiment, not a product: it monkeypatches the engine (with the timing wrappers of
``traced_serve`` too) to estimate what three start-up changes would buy, selected by
``$BENCH_WHATIF`` (comma-separated, default all):

- ``pool``: a warm workspace pool. After an attempt, a fresh clone of the same mirror and
  branch is made in the background (``create_workspace``, unchanged); the next attempt whose
  branch head is still the same takes it with one ``rename`` instead of cloning.
- ``home``: a ``CODEX_HOME`` template. The first attempt's ``CODEX_HOME`` (Codex's SQLite
  state, skills, installation id; not its sessions or config) is copied into each new one
  before the sandbox starts, so Codex does not create and migrate its databases again.
- ``fwd``: the launcher starts the gateway forwarder in the background and execs Codex at
  once instead of waiting for the forwarder's ``ready`` line (Codex's first request comes
  ~150 ms later; the forwarder is ready in ~50 ms).

Run it with ``python -m bench --server-module bench.whatif_serve``.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from . import traced_serve
from .phases import LAUNCHER_CONCURRENT, copy_template

_ENABLED = {
    x.strip() for x in os.environ.get("BENCH_WHATIF", "pool,home,fwd").split(",") if x.strip()
}


class _Pool:
    """One ready workspace per (mirror, branch), refilled after each attempt."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ready: dict[tuple[str, str], tuple[Path, str]] = {}
        self.filling: dict[tuple[str, str], threading.Thread] = {}
        self.last: dict[str, tuple[Path, str, str]] = {}  # attempt dir -> (mirror, branch, url)


def install() -> None:
    traced_serve.install()
    from openwham.engine import attempt
    from openwham.runtimes import codex
    from openwham.sandbox import bwrap, workspace

    if "fwd" in _ENABLED:
        original_launcher = codex.launcher

        def launcher(codex_argv: Any, **kw: Any) -> list[str]:
            argv = original_launcher(codex_argv, **kw)
            return [argv[0], argv[1], LAUNCHER_CONCURRENT, *argv[3:]]

        setattr(codex, "launcher", launcher)  # noqa: B010

    if "home" in _ENABLED:
        template: list[Path | None] = [None]
        start = bwrap.start

        def start_with_home(spec: Any, argv: Any, **kw: Any) -> Any:
            home = next(
                (h for h, d in spec.rw_binds.items() if d == codex.SANDBOX_CODEX_HOME), None
            )
            if home is not None and template[0] is not None:
                copy_template(template[0], Path(home))
            proc = start(spec, argv, **kw)
            if home is not None and template[0] is None:
                wait = proc.wait

                def wait_and_keep(*a: Any, **k: Any) -> Any:
                    result = wait(*a, **k)
                    if template[0] is None and (Path(home) / "state_5.sqlite").exists():
                        keep = Path(home).parent.parent / f".codex-home-template-{uuid.uuid4().hex}"
                        shutil.copytree(
                            home, keep, symlinks=True, ignore=shutil.ignore_patterns("sessions")
                        )
                        template[0] = keep
                    return result

                setattr(proc, "wait", wait_and_keep)  # noqa: B010
            return proc

        setattr(bwrap, "start", start_with_home)  # noqa: B010

    if "pool" in _ENABLED:
        pool = _Pool()
        create = workspace.create_workspace

        def head(mirror: Path, branch: str) -> str:
            ref = f"refs/heads/{branch}^{{commit}}"
            return workspace.git("rev-parse", ref, cwd=mirror).strip()

        def fill(mirror: Path, branch: str, url: str, root: Path) -> None:
            key = (str(mirror), branch)
            dest = root / f".pool-{uuid.uuid4().hex}"
            try:
                sha = create(mirror, dest, branch, url)
            except Exception:
                shutil.rmtree(dest, ignore_errors=True)
                return
            with pool.lock:
                old = pool.ready.pop(key, None)
                pool.ready[key] = (dest, sha)
                pool.filling.pop(key, None)
            if old is not None:
                shutil.rmtree(old[0], ignore_errors=True)

        def pooled_create(mirror: Path, dest: Path, branch: str, origin_url: str) -> str:
            key = (str(mirror), branch)
            with pool.lock:
                pool.last[str(dest.parent)] = (mirror, branch, origin_url)
                filling = pool.filling.get(key)
            if filling is not None:
                filling.join()  # a refill under way finishes sooner than a new clone
            with pool.lock:
                ready = pool.ready.pop(key, None)
            if ready is not None:
                path, sha = ready
                if sha == head(mirror, branch):
                    os.rename(path, dest)
                    return sha
                shutil.rmtree(path, ignore_errors=True)
            return create(mirror, dest, branch, origin_url)

        setattr(attempt, "create_workspace", pooled_create)  # noqa: B010

        run_turn = attempt.Engine.run_turn

        def run_turn_then_refill(self: Any, turn_id: str, control: Any = None) -> Any:
            try:
                return run_turn(self, turn_id, control)
            finally:
                with pool.lock:
                    last = pool.last.pop(str(self.attempts_root / turn_id), None)
                if last is not None:
                    mirror, branch, url = last
                    key = (str(mirror), branch)
                    with pool.lock:
                        busy = key in pool.filling
                        if not busy:
                            t = threading.Thread(
                                target=fill,
                                args=(mirror, branch, url, self.attempts_root),
                                daemon=True,
                            )
                            pool.filling[key] = t
                    if not busy:
                        t.start()

        setattr(attempt.Engine, "run_turn", run_turn_then_refill)  # noqa: B010


def main() -> None:
    install()
    from openwham.cli.main import main as wham_main

    wham_main()


if __name__ == "__main__":
    main()
