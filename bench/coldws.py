"""``python -m bench.coldws``: a cold workspace, before and after sharing the mirror's objects.

Side by side in one run, interleaved, on the generated repository (5,000 files by default):

- before: the previous ``create_workspace`` (``git clone --local --no-hardlinks``, which
  copies every object of the mirror, then ``remote set-url`` and ``rev-parse``);
- after: today's ``create_workspace`` (``git clone --shared --no-checkout``, the relative
  alternates entry, ``reset --hard`` for the checkout, ``remote set-url``, ``rev-parse``);
- overlay: ``create_workspace(checkouts=...)``, an overlay over the checkout of the commit
  made once and shared (``sandbox.overlay``); the first run at the commit makes it (printed
  apart), the others find it (what every later attempt at that commit pays);
- the first ``git status`` in each, in the agent's sandbox (what its first command pays).

Prints min/median/max in ms and the ratio of the medians. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from openwham.sandbox import bwrap
from openwham.sandbox.workspace import Checkouts, Mirrors, create_workspace, git

from .repo import describe, generate


def _before(mirror: Path, dest: Path, branch: str, origin: str) -> str:
    """``create_workspace`` as it was: every object copied."""
    git("clone", "--quiet", "--local", "--no-hardlinks", "--branch", branch, str(mirror), str(dest))
    git("remote", "set-url", "origin", origin, cwd=dest)
    return git("rev-parse", "HEAD", cwd=dest).strip()


def _first_status(ws: Path) -> float:
    """The first ``git status`` in the agent's sandbox (timed inside it: the sandbox's own
    start is not counted), in seconds."""
    script = "s=$(date +%s%N); git status --porcelain >/dev/null; e=$(date +%s%N); echo $((e-s))"
    result = bwrap.run(bwrap.SandboxSpec(workspace=ws), ["bash", "-c", script])
    if not result.ok:
        raise RuntimeError(f"git status in the sandbox failed: {result.stderr[-500:]}")
    return int(result.stdout.split()[-1]) / 1e9


def _timed(fn: Callable[..., object], *args: object, **kw: object) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def _row(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"{name:<44} {ms[0]:8.0f} {statistics.median(ms):8.0f} {ms[-1]:8.0f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.coldws", description=__doc__)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-coldws-", dir=args.workdir))
    try:
        repo = generate(work / "repo", files=args.files)
        print(describe(repo))
        mirror = Mirrors(work / "mirrors").ensure("bench", str(repo))  # not timed
        out: dict[str, list[float]] = {}
        checkouts = Checkouts(work / "checkouts")
        if not checkouts.enabled:
            print(f"overlay workspaces unavailable: {checkouts.reason}")
        else:
            (work / "first").mkdir()
            t = _timed(
                create_workspace,
                mirror,
                work / "first" / "workspace",
                "main",
                str(repo),
                checkouts=checkouts,
            )
            print(
                f"overlay: the checkout made at the first attempt on the commit: {t * 1000:.0f} ms"
            )

        def _overlay(mirror: Path, dest: Path, branch: str, origin: str) -> str:
            return create_workspace(mirror, dest, branch, origin, checkouts=checkouts)

        makers = [("before", _before), ("after", create_workspace)]
        if checkouts.enabled:
            makers.append(("overlay", _overlay))
        for i in range(args.runs):
            for name, make in makers:
                attempt = work / f"{name}{i}"
                attempt.mkdir()
                ws = attempt / "workspace"
                out.setdefault(f"{name}: create_workspace", []).append(
                    _timed(make, mirror, ws, "main", str(repo))
                )
                out.setdefault(f"{name}: first git status in the sandbox", []).append(
                    _first_status(ws)
                )
                shutil.rmtree(attempt)
        head = f"ms, {args.runs} runs each, interleaved"
        print(f"{head:<44} {'min':>8} {'median':>8} {'max':>8}")
        for name, values in out.items():
            print(_row(name, values))
        before = statistics.median(out["before: create_workspace"])
        after = statistics.median(out["after: create_workspace"])
        print(f"cold workspace, median before / after: {before / after:.1f}x")
        if checkouts.enabled:
            ov = statistics.median(out["overlay: create_workspace"])
            print(f"cold workspace, median after / overlay: {after / ov:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
