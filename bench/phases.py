"""Microbenchmarks of the start-up steps, calling the engine's own functions one at a time.

Each step is what ``Engine._run`` does (or a candidate replacement), timed alone on the
generated repository, so the breakdown does not depend on the server:

- ``Mirrors.ensure`` on a warm mirror (``git fetch --prune``)
- ``create_workspace`` (``git clone --local --no-hardlinks`` of 5,000 files + rev-parse,
  ``remote set-url``, rev-parse), and the removal of a workspace (``shutil.rmtree``)
- candidates: ``clone --no-checkout`` alone (the object copy), the same clone into tmpfs
  (``/dev/shm``), ``checkout.workers=2`` (parallel checkout), ``--shared`` (alternates, no
  object copy), and ``rename`` of a workspace cloned ahead of time (a warm pool)
- ``bwrap.start`` of ``true`` with the engine's binds, the launcher (bwrap + gateway
  forwarder) with ``true`` as the agent, and the full Codex start to its first model request
  through a real gateway, as the engine does it and with two candidate changes (forwarder
  started concurrently with Codex; ``CODEX_HOME`` copied from a template made by the first
  run); plus Codex without any sandbox; in the 5,000-file and in a one-file workspace.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import harness as h


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def _take(pool: Path, target: Path) -> None:
    """What a warm pool would do at claim time: move a ready clone into place."""
    os.rename(pool, target)
    _git("rev-parse", "HEAD", cwd=target)


def _git(*args: str, cwd: Path | None = None) -> None:
    from openwham.sandbox.workspace import git

    git(*args, cwd=cwd)


def host_steps(repo: Path, work: Path, runs: int) -> dict[str, list[float]]:
    from openwham.sandbox.workspace import Mirrors, create_workspace

    out: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        out.setdefault(name, []).append(seconds)

    mirrors = Mirrors(work / "mirrors")
    mirrors.ensure("bench", str(repo))  # cold clone, not timed
    mirror = mirrors.path("bench")
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    clone = ["clone", "-q", "--local", "--no-hardlinks"]
    parallel = ["-c", "checkout.workers=2", "-c", "checkout.thresholdForParallelism=1"]
    for i in range(runs):
        add("mirror fetch (Mirrors.ensure, warm)", _timed(mirrors.ensure, "bench", str(repo)))
        ws = work / f"ws{i}"
        add(
            "create_workspace (git clone + 3 git calls)",
            _timed(create_workspace, mirror, ws, "main", str(repo)),
        )
        add("rmtree of a workspace (engine's finally)", _timed(shutil.rmtree, ws))

        nc = work / f"nc{i}"
        add(
            "  clone --no-checkout (object copy only)",
            _timed(_git, *clone, "--no-checkout", str(mirror), str(nc)),
        )
        add("  checkout of the files (after that)", _timed(_git, "checkout", "-q", "main", cwd=nc))
        shutil.rmtree(nc)

        par = work / f"par{i}"
        add(
            "  alt: clone with checkout.workers=2",
            _timed(_git, *parallel, *clone, str(mirror), str(par)),
        )
        shutil.rmtree(par)

        sh = work / f"sh{i}"
        add(
            "  alt: clone --shared (alternates, no object copy)",
            _timed(_git, "clone", "-q", "--shared", str(mirror), str(sh)),
        )
        shutil.rmtree(sh)

        if shm is not None:
            tmp = Path(tempfile.mkdtemp(prefix="bench-ws-", dir=shm))
            add(
                "  alt: the same clone into tmpfs (/dev/shm)",
                _timed(_git, *clone, str(mirror), str(tmp / "ws")),
            )
            shutil.rmtree(tmp)

        pool = work / f"pool{i}"
        create_workspace(mirror, pool, "main", str(repo))  # cloned "ahead of time"
        target = work / f"taken{i}"
        add(
            "  alt: take a workspace cloned ahead of time (rename + rev-parse)",
            _timed(_take, pool, target),
        )
        shutil.rmtree(target)
    return out


# The launcher with the forwarder started in the background: Codex is exec'd at once.
LAUNCHER_CONCURRENT = """\
set -u
python=$1 forwarder=$2 listen=$3 socket=$4 timeout=$5
shift 6
"$python" -I "$forwarder" --listen "$listen" --unix "$socket" \\
  </dev/null >/dev/null 2>/tmp/.openwham-forwarder.log &
exec "$@"
"""

# What a CODEX_HOME template leaves out: per-attempt config, sessions, helper links.
TEMPLATE_SKIP = {"config.toml", "ask.config.toml", "sessions", "tmp", "shell_snapshots"}


def copy_template(template: Path, home: Path) -> None:
    for entry in template.iterdir():
        if entry.name in TEMPLATE_SKIP:
            continue
        if entry.is_dir():
            shutil.copytree(entry, home / entry.name, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, home / entry.name)


def sandbox_steps(
    repo: Path, work: Path, model_url: str, clock: h.ModelClock, runs: int
) -> dict[str, list[float]]:
    from openwham.config import Settings
    from openwham.gateway import Gateway, GatewayServer, forwarder_path
    from openwham.runtimes import codex
    from openwham.runtimes.codex_cli import native_binary
    from openwham.sandbox import bwrap
    from openwham.sandbox.bwrap import Limits, SandboxSpec
    from openwham.sandbox.workspace import Mirrors, create_workspace

    out: dict[str, list[float]] = {}

    def add(name: str, seconds: float | None) -> None:
        if seconds is not None:
            out.setdefault(name, []).append(seconds)

    mirrors = Mirrors(work / "mirrors")
    mirror = mirrors.ensure("bench", str(repo))
    tiny = work / "tiny-repo"
    tiny.mkdir()
    (tiny / "README.md").write_text("tiny\n")
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=tiny, check=True)
    subprocess.run(["git", "add", "."], cwd=tiny, check=True)
    subprocess.run(
        ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "x"],
        cwd=tiny,
        check=True,
    )

    settings = Settings(
        data_dir=work / "gw-data",
        model_provider="openai-compatible",
        model_base_url=model_url,
        model_api_key="sk-bench-anything",
        model=h.MODEL,
    )
    gateway = Gateway.from_settings(settings)
    sock = Path(tempfile.mkdtemp(prefix="bench-gw-")) / "gateway.sock"
    server = GatewayServer(gateway, sock).start()
    limits = Limits(wall_clock_seconds=120, memory_bytes=4096 << 20)
    counter = [0]
    template: list[Path] = []

    def new_home() -> Path:
        counter[0] += 1
        home = work / f"home{counter[0]}"
        home.mkdir(mode=0o700)
        for name, text in codex.codex_home_files(base_url=codex.base_url(), model=h.MODEL).items():
            (home / name).write_text(text)
        return home

    def spec_for(ws: Path, home: Path, token: str) -> SandboxSpec:
        return SandboxSpec(
            workspace=ws,
            ro_binds={
                native_binary(): codex.SANDBOX_CODEX_BIN,
                forwarder_path(): codex.SANDBOX_FORWARDER,
                sock: codex.SANDBOX_GATEWAY_SOCKET,
            },
            rw_binds={home: codex.SANDBOX_CODEX_HOME},
            env=codex.sandbox_env(token),
            network=False,
            limits=limits,
        )

    def sandboxed(
        ws: Path, *, concurrent: bool = False, templated: bool = False, held: bool = False
    ) -> float | None:
        """bwrap.start → the first model request of Codex in a sandbox, as the engine runs it
        (new CODEX_HOME, token, launcher); optionally with the two start-up changes; or
        (``held``) from the prompt sent to a standby whose Codex waits for it."""
        home = new_home()
        t0 = time.perf_counter()
        if templated and template:
            copy_template(template[0], home)  # counted: it is on the critical path
        counter[0] += 1
        run = str(70000 + counter[0])
        attempt = f"phase-{run}"
        token = gateway.register_attempt(attempt, model=h.MODEL)
        cmd = codex.command(h.prompt(run), qa_mode=False)
        argv = codex.launcher(cmd.argv)
        if concurrent:
            argv = [argv[0], argv[1], LAUNCHER_CONCURRENT, *argv[3:]]
        if held:
            proc = bwrap.start(
                spec_for(ws, home, token), argv, hold=True, ready_marker=codex.READY_MARKER
            )
            proc.wait_ready(30)
            time.sleep(0.5)  # Codex's start-up, done before the task arrives
            t0 = time.perf_counter()
            proc.send(cmd.stdin)
        else:
            proc = bwrap.start(spec_for(ws, home, token), argv, stdin=cmd.stdin)
        clock.expect(run).wait(60)
        first = clock.first.get(run)
        proc.wait()
        gateway.revoke(attempt)
        if not template:
            keep = work / "codex-home-template"
            shutil.copytree(home, keep, symlinks=True, ignore=shutil.ignore_patterns("sessions"))
            template.append(keep)
        shutil.rmtree(home)
        return first[0] - t0 if first else None

    try:
        for i in range(runs):
            ws = work / f"sw{i}"
            create_workspace(mirror, ws, "main", str(repo))
            home = new_home()
            spec = spec_for(ws, home, "unused")
            add("bwrap: sandbox with the engine's binds, `true`", _timed(bwrap.run, spec, ["true"]))
            add(
                "bwrap + forwarder ready (launcher, agent = `true`)",
                _timed(bwrap.run, spec, codex.launcher(["true"])),
            )
            shutil.rmtree(home)
            variants: list[tuple[str, dict[str, bool]]] = [
                ("sandboxed Codex: bwrap.start -> first model request", {}),
                ("  alt: forwarder started concurrently with Codex", {"concurrent": True}),
                ("  alt: CODEX_HOME copied from a template", {"templated": True}),
                ("  alt: both", {"concurrent": True, "templated": True}),
                ("  standby: prompt sent to a waiting sandboxed Codex", {"held": True}),
            ]
            if not template:
                sandboxed(ws)  # makes the template; not counted
            # rotate the order: the first run after a clone is slower (cold caches)
            k = i % len(variants)
            for name, kw in variants[k:] + variants[:k]:
                add(name, sandboxed(ws, **kw))
            plain = h.run_plain_codex(
                repo, work / f"plain{i}", work / "plain-home", model_url, clock, str(80000 + i)
            )
            add("plain Codex, no sandbox: exec -> first model request", plain.first_request)
            shutil.rmtree(ws)

            tws = work / f"tiny{i}"
            create_workspace(tiny, tws, "main", str(tiny))
            add("sandboxed Codex, 1-file workspace", sandboxed(tws))
            plain = h.run_plain_codex(
                tiny, work / f"plaint{i}", work / "plain-home", model_url, clock, str(90000 + i)
            )
            add("plain Codex, 1-file workspace", plain.first_request)
            shutil.rmtree(tws)
    finally:
        server.stop()
        shutil.rmtree(sock.parent, ignore_errors=True)
    return out


def summarize(results: dict[str, list[float]]) -> list[tuple[str, float, float, int]]:
    """(name, median ms, min ms, n) per step, in insertion order."""
    return [
        (name, statistics.median(v) * 1000, min(v) * 1000, len(v))
        for name, v in results.items()
        if v
    ]
