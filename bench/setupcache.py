"""``python -m bench.setupcache``: first model request with the post-setup cache (issue 19).

An environment whose setup script takes ``--setup-seconds`` (10) seconds and writes
``--deps-mb`` (10) MB of files into an ignored directory (``deps/``). Each run makes a new
environment on each of two ``wham serve`` processes, one keeping a standby sandbox
(``WHAM_STANDBY_SANDBOXES=1``) and one none (``=0``), and posts two tasks on it: the first
runs the setup script (cold, for comparison) and takes the snapshot; the second is a cache
hit, on the first server taken from the standby started from the snapshot (waited for until
its Codex blocks reading its prompt), on the second started then from the snapshot. Latency
is ``POST tasks`` until the scripted model receives the task's first request. The servers
alternate within each run, so both see the same machine. The snapshot's size and the time to
take it are read from the servers' logs ("post-setup snapshot …: N bytes in S s"). Each
second task's setup log is checked: "Resumed cached container", and "prepared in advance"
exactly on the standby server. For reference, the standby server also runs two tasks on an
environment without a setup script each run (the second takes a plain standby). ``--repos
N``: environments of N repositories (each a clone in ``workspace/<name>``, ``deps/`` beside
them; the snapshot is a copy of the whole workspace). Prints min / median / max. Loopback
only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import harness as h
from .repo import generate, git

SNAPSHOT_LOG = re.compile(r"post-setup snapshot \S+: (\d+) bytes in ([\d.]+) s")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def setup_script(seconds: float, mb: int) -> list[str]:
    return [
        f"sleep {seconds}",
        "mkdir -p deps",
        f"for i in $(seq 1 {mb * 10}); do head -c 102400 /dev/urandom > deps/lib$i.bin; done",
        "echo setup done",
    ]


def wait_standby(srv: h.WhamServer, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not h.standby_waiting(srv.process.pid):
        if time.monotonic() > deadline:
            raise RuntimeError("no standby sandbox became ready")
        time.sleep(0.05)


def run_task(srv: h.WhamServer, clock: h.ModelClock, env_id: str, tag: str) -> tuple[float, str]:
    """Post a task and wait for its end and its workspace's removal; milliseconds until its
    first model request, and its setup log."""
    event = clock.expect(tag)
    t0 = time.perf_counter()
    task_id, turn_id = srv.create_task(env_id, f"bench-run-{tag}: look at deps")
    if not event.wait(180):
        raise RuntimeError(f"{tag}: no model request")
    ms = (clock.first[tag][0] - t0) * 1000
    deadline = time.monotonic() + 120
    while True:
        turn = srv.client.get(srv.api(f"tasks/{task_id}")).json()["current_assistant_turn"]
        if turn.get("turn_status") in h.TERMINAL:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tag} never ended")
        time.sleep(0.02)
    if turn["turn_status"] != "completed":
        raise RuntimeError(f"{tag}: {turn['turn_status']} {turn.get('error')}")
    ws = srv.data_dir / "attempts" / turn_id / "workspace"
    while ws.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    r = srv.client.get(srv.api(f"tasks/{task_id}/turns/{turn_id}/logs"))
    r.raise_for_status()
    return ms, "\n".join(entry["line"] for entry in r.json()["logs"])


def stats(values: list[float], digits: int = 0) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{low:8.{digits}f} {mid:8.{digits}f} {high:8.{digits}f}  (n={len(values)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.setupcache", description=__doc__)
    ap.add_argument("--runs", type=int, default=5, help="environments per server (5)")
    ap.add_argument("--setup-seconds", type=float, default=10.0, help="setup's sleep (10)")
    ap.add_argument("--deps-mb", type=int, default=10, help="MB setup writes into deps/ (10)")
    ap.add_argument("--files", type=int, default=200, help="files in the generated repository")
    ap.add_argument("--maintenance", default="", help="a maintenance script line (none)")
    ap.add_argument("--keep-logs", type=Path, help="copy the servers' logs into this directory")
    ap.add_argument("--repos", type=int, default=1, help="repositories per environment (1)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="wham-bench-setupcache-", dir="/var/tmp"))
    model, clock = h.start_model()
    model.script = [h.Shell("ls deps | wc -l"), h.Say("Seen.")]
    servers: dict[str, h.WhamServer] = {}
    body = {
        "label": "bench/setupcache",
        "setup": setup_script(args.setup_seconds, args.deps_mb),
        "maintenance_setup": [args.maintenance] if args.maintenance else [],
    }
    results: dict[str, list[float]] = {"cold": [], "standby": [], "no standby": [], "plain": []}
    try:
        repos: list[str] = []
        for i in range(max(1, args.repos)):
            repo = generate(work / ("repo" if i == 0 else f"repo{i}"), args.files)
            (repo / ".gitignore").write_text("deps/\n")
            git("add", ".gitignore", cwd=repo)
            git("commit", "-q", "-m", "ignore deps", cwd=repo)
            repos.append(str(repo))
        for name, count in (("standby", "1"), ("no standby", "0")):
            servers[name] = h.WhamServer.start(
                work / f"data-{count}",
                model.url,
                log_path=work / f"serve-{count}.log",
                extra_env={"WHAM_STANDBY_SANDBOXES": count},
            )
        deadline = time.monotonic() + 60 * args.runs * (1 + args.setup_seconds / 10)
        for n in range(args.runs):
            order = list(servers.items())
            if n % 2:
                order.reverse()
            for i, (name, srv) in enumerate(order):
                if time.monotonic() > deadline:
                    raise RuntimeError("out of time")
                r = srv.client.post(srv.api("environments"), json={**body, "repos": repos})
                r.raise_for_status()
                env_id = str(r.json()["id"])
                cold, lines = run_task(srv, clock, env_id, f"1{n:02d}{i}")
                if "setup done" not in lines:
                    raise RuntimeError(f"the first task did not run setup:\n{lines}")
                results["cold"].append(cold)
                if srv.standby:
                    wait_standby(srv)
                time.sleep(0.5)
                warm, lines = run_task(srv, clock, env_id, f"2{n:02d}{i}")
                if not lines.startswith("Resumed cached container") or "setup done" in lines:
                    raise RuntimeError(f"{name}: the second task was no cache hit:\n{lines}")
                if ("prepared in advance" in lines) != srv.standby:
                    raise RuntimeError(f"{name}: standby use not as expected:\n{lines}")
                results[name].append(warm)
                if srv.standby:
                    wait_standby(srv)  # the refill done: the other server runs on a quiet host
                log(f"run {n + 1} {name}: cold {cold:.0f} ms, cache hit {warm:.0f} ms")
                if srv.standby:  # reference: the same server's standby without a setup script
                    r = srv.client.post(
                        srv.api("environments"),
                        json={"label": "bench/plain", "repos": repos[:1]},
                    )
                    r.raise_for_status()
                    plain_env = str(r.json()["id"])
                    run_task(srv, clock, plain_env, f"3{n:02d}{i}")
                    wait_standby(srv)
                    time.sleep(0.5)
                    plain, lines = run_task(srv, clock, plain_env, f"4{n:02d}{i}")
                    results["plain"].append(plain)
                    wait_standby(srv)
                    log(f"run {n + 1} {name}: plain standby {plain:.0f} ms")
        sizes, takes = [], []
        for srv in servers.values():
            for m in SNAPSHOT_LOG.finditer(srv.log_path.read_text()):
                sizes.append(int(m.group(1)) / 1e6)
                takes.append(float(m.group(2)) * 1000)
        print("first model request after POST tasks, ms:      min   median      max")
        print(f"  second task, cache hit + standby from snapshot {stats(results['standby'])}")
        print(f"  second task, cache hit, no standby             {stats(results['no standby'])}")
        print(f"  first task, setup script run (cold)            {stats(results['cold'])}")
        print(f"  reference: standby, no setup script            {stats(results['plain'])}")
        if sizes:
            print(f"snapshot size, MB:                              {stats(sizes, 1)}")
            print(f"time to take the snapshot, ms:                  {stats(takes, 1)}")
        else:
            print("snapshot size and time: not found in the servers' logs")
        return 0
    finally:
        for srv in servers.values():
            srv.stop()
            if args.keep_logs:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(srv.log_path, args.keep_logs / srv.log_path.name)
        model.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
