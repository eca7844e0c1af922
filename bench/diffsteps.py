"""``python -m bench.diffsteps``: what the attempt's diff script's steps cost on an overlay
workspace of a generated repository (``--files``, 5,000), in a real bubblewrap sandbox.

Each variant of :func:`openwham.engine.diff.script` runs ``--runs`` times, each on a fresh
overlay workspace over one shared checkout (as an attempt's), in a sandbox of its own; the
sandbox's start is the ``true`` variant (the engine runs the script in the agent's sandbox
after Codex exits, so it does not pay it). ``timed``: the script as the engine runs it, with
the time of ``git add -A`` and of ``git diff --cached`` inside it; the others replace the
``add`` step (``refresh``: ``update-index --refresh`` alone, ``untracked``: ``ls-files -o``
alone, ``onepath``: ``add -A`` of one path, ``noadd``: none) or add a setting (``uc``:
``core.untrackedCache``, ``nopre``: ``core.preloadIndex`` off). ``--edit``: the workspace has
one file changed and one added first. Prints min / median / max ms of each. Loopback
only, nothing else started; run under the bench lock like any other.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openwham.engine import diff as diffs
from openwham.sandbox.bwrap import SandboxSpec
from openwham.sandbox.provider import BUBBLEWRAP
from openwham.sandbox.workspace import Checkouts, workspace_at

from .repo import TARGET, generate

ADD = "  g add -A >/dev/null\n"


def variants(sha: str) -> dict[str, str]:
    """The scripts to time, by name (see the module's doc)."""
    base = diffs.script(sha)
    assert ADD in base, "the diff script changed: update bench.diffsteps"
    timed = base.replace(
        ADD, f'  echo "T0 $EPOCHREALTIME" >&2\n{ADD}  echo "T1 $EPOCHREALTIME" >&2\n'
    )
    timed = timed.replace('"$out/diff"\n', '"$out/diff"\n  echo "T2 $EPOCHREALTIME" >&2\n')
    setting = "core.quotePath=false"
    return {
        "true": "true",
        "timed": timed,
        "refresh": timed.replace(ADD, "  g update-index -q --refresh >/dev/null\n"),
        "untracked": timed.replace(ADD, "  g ls-files -o --exclude-standard >/dev/null\n"),
        "onepath": timed.replace(ADD, "  g add -A -- README.md >/dev/null\n"),
        "noadd": timed.replace(ADD, ""),
        "uc": timed.replace(setting, f"{setting} -c core.untrackedCache=true"),
        "nopre": timed.replace(setting, f"{setting} -c core.preloadIndex=false"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.diffsteps", description=__doc__)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--edit", action="store_true", help="one file changed and one added")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="wham-bench-diffsteps-", dir="/var/tmp"))
    try:
        repo = generate(work / "repo", args.files)
        mirror = work / "mirror.git"
        subprocess.run(["git", "clone", "-q", "--mirror", str(repo), str(mirror)], check=True)
        sha = subprocess.run(
            ["git", "-C", str(mirror), "rev-parse", "main"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        checkouts = Checkouts(work / "checkouts")
        if not checkouts.enabled:
            print(f"no overlay workspaces here: {checkouts.reason}", file=sys.stderr)
            return 1
        times: dict[str, list[float]] = {}
        for i in range(args.runs):
            for name, text in variants(sha).items():
                attempt = work / f"a{i}-{name}"
                attempt.mkdir()
                workspace = attempt / "workspace"
                workspace_at(mirror, workspace, "main", str(repo), sha, checkouts=checkouts)
                out = attempt / "out"
                out.mkdir()
                if args.edit:
                    edit = f"cd /workspace && echo x >> {TARGET} && echo new > NEW.txt"
                    BUBBLEWRAP.run(SandboxSpec(workspace=workspace), ["/bin/bash", "-c", edit])
                t0 = time.perf_counter()
                BUBBLEWRAP.run(
                    SandboxSpec(workspace=workspace, rw_binds={out: diffs.OUT_DIR}),
                    ["/bin/bash", "-c", text],
                )
                times.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
                error = (out / "error").read_text() if (out / "error").exists() else ""
                marks = dict(
                    (line.split()[0], float(line.split()[1]))
                    for line in error.splitlines()
                    if line[:1] == "T" and len(line.split()) == 2
                )
                if {"T0", "T1", "T2"} <= marks.keys():
                    times.setdefault(f"{name}: add step", []).append(
                        (marks["T1"] - marks["T0"]) * 1000
                    )
                    times.setdefault(f"{name}: diff step", []).append(
                        (marks["T2"] - marks["T1"]) * 1000
                    )
                shutil.rmtree(attempt, ignore_errors=True)
        for name, values in times.items():
            print(
                f"{name:>20}: min {min(values):6.1f} median {statistics.median(values):6.1f} "
                f"max {max(values):6.1f} ms"
            )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
