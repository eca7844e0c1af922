"""``python -m bench.clistart``: how long ``wham`` takes to start, per command.

Runs ``wham --help``, ``wham task list --help`` and ``wham task list --json`` (against a
bound port that refuses connections: the SDK loads and the command fails at once, so the
time is start-up, not the server) in fresh interpreters. With ``--tree DIR`` (repeatable)
each run uses that tree's ``src`` (``PYTHONPATH``), the runs interleaved so every tree sees
the same machine load: before/after in one run.

    .venv/bin/python -m bench.clistart [--runs 10] [--tree /tmp/before --tree .]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = "import sys; from openwham.cli.main import main; sys.argv[0] = 'wham'; main()"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--tree", action="append", type=Path, default=[], help="source trees")
    args = p.parse_args()
    trees = [t.resolve() for t in args.tree] or [ROOT]
    with tempfile.TemporaryDirectory() as home, socket.socket() as refused:
        refused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{refused.getsockname()[1]}"
        commands = {
            "--help": ["--help"],
            "task list --help": ["task", "list", "--help"],
            "task list --json": ["task", "list", "--json"],
        }
        times: dict[tuple[Path, str], list[float]] = {}
        for _ in range(args.runs):
            for name, argv in commands.items():
                for tree in trees:
                    env = {
                        "PATH": os.environ["PATH"],
                        "HOME": home,
                        "WHAM_CONFIG_DIR": f"{home}/config",
                        "WHAM_URL": url,
                        "WHAM_TOKEN": "x",
                        "PYTHONPATH": str(tree / "src"),
                    }
                    start = time.perf_counter()
                    subprocess.run([sys.executable, "-c", RUN, *argv], env=env, capture_output=True)
                    times.setdefault((tree, name), []).append(time.perf_counter() - start)
    print(f"{'tree':<28} {'command':<18} {'ms min/median/max':>20}")
    for (tree, name), ts in times.items():
        ms = [t * 1000 for t in ts]
        row = f"{min(ms):.0f}/{statistics.median(ms):.0f}/{max(ms):.0f}"
        print(f"{str(tree)[-28:]:<28} {name:<18} {row:>20}")


if __name__ == "__main__":
    main()
