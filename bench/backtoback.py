"""``python -m bench.backtoback``: start latency of tasks arriving back to back (issue 20).

Each task is posted the moment the previous one's attempt ended (its workspace removed), so
the standby for the next is whatever the engine has by then. Start latency is ``POST tasks``
until the scripted model receives the task's first request. One ``wham serve`` per
``--tree`` (its ``src`` on ``PYTHONPATH``; default: this tree), one shared scripted model, a
small generated repository; blocks of ``--chain`` back-to-back tasks alternate between the
servers ``--runs`` times, so every tree sees the same machine. An ``idle`` start (the
server left until its standby is ready and settled) is measured once per block for reference.
Prints min / median / max and p50 per tree. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import harness as h
from .repo import generate


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def start_ms(
    srv: h.WhamServer,
    clock: h.ModelClock,
    env_id: str,
    tag: str,
    posted: list[tuple[float, str]] | None = None,
) -> float:
    """Post one task and wait for its end; milliseconds until its first model request
    (``tag``: digits, the marker ``harness.MARKER`` finds in the prompt). ``posted`` gets
    when it was posted (``time.time()``) and its attempt."""
    event = clock.expect(tag)
    at, t0 = time.time(), time.perf_counter()
    task_id, turn_id = srv.create_task(env_id, f"bench-run-{tag}: say hi")
    if posted is not None:
        posted.append((at, turn_id))
    if not event.wait(120):
        raise RuntimeError(f"{tag}: no model request")
    ms = (clock.first[tag][0] - t0) * 1000
    deadline = time.monotonic() + 120
    while True:
        turn = srv.client.get(srv.api(f"tasks/{task_id}")).json()["current_assistant_turn"]
        if turn.get("turn_status") in h.TERMINAL:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tag} never ended")
        time.sleep(0.01)
    ws = srv.data_dir / "attempts" / turn_id / "workspace"
    while ws.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    return ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.backtoback", description=__doc__)
    ap.add_argument("--tree", action="append", type=Path, default=[], help="source trees")
    ap.add_argument("--runs", type=int, default=3, help="blocks per tree (3)")
    ap.add_argument("--chain", type=int, default=5, help="back-to-back tasks per block (5)")
    ap.add_argument("--files", type=int, default=50, help="files in the generated repository")
    ap.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="run the servers under bench.traced_serve, keep their traces in this directory "
        "and print where the starts went (min / median / max ms from the POST to each phase)",
    )
    ap.add_argument(
        "--codex-log",
        action="store_true",
        help="with --trace: Codex's own log too (its start-up marks)",
    )
    h.add_mode_argument(ap)
    args = ap.parse_args(argv)
    from .bestof import phase_summary, traced  # (bestof imports startphases, which imports this)

    variants = [(t.resolve(), m) for t in (args.tree or [h.ROOT]) for m in (args.mode or [""])]
    trees = [t for t, _ in variants]

    work = Path(tempfile.mkdtemp(prefix="wham-bench-b2b-", dir="/var/tmp"))
    model, clock = h.start_model()
    model.script = [h.Shell("echo hi"), h.Say("Hi.")]
    servers: list[h.WhamServer] = []
    try:
        repo = generate(work / "repo", args.files)
        envs = []
        for i, (tree, mode) in enumerate(variants):
            extra = {"PYTHONPATH": str(tree / "src")}
            if mode:
                extra["WHAM_CODEX_MODE"] = mode
            srv = h.WhamServer.start(
                work / f"data-{i}",
                model.url,
                log_path=work / f"serve-{i}.log",
                module=traced(args.trace, i, args.codex_log, extra),
                extra_env=extra,
            )
            servers.append(srv)
            envs.append(srv.create_env(repo))
            start_ms(srv, clock, envs[-1], f"9{i}0000")
        b2b: dict[int, list[float]] = {i: [] for i in range(len(trees))}
        idle: dict[int, list[float]] = {i: [] for i in range(len(trees))}
        posted_b2b: dict[int, list[tuple[float, str]]] = {i: [] for i in range(len(trees))}
        posted_idle: dict[int, list[tuple[float, str]]] = {i: [] for i in range(len(trees))}
        for n in range(args.runs):
            for i, (srv, env_id) in enumerate(zip(servers, envs, strict=True)):
                # idle: the standby prepared and settled, as a person's next task finds it
                deadline = time.monotonic() + 30
                while not (srv._standby_settled() and h.standby_waiting(srv.process.pid)) and (
                    time.monotonic() < deadline
                ):
                    time.sleep(0.05)
                time.sleep(0.5)
                idle[i].append(start_ms(srv, clock, env_id, f"1{i}{n:02d}00", posted_idle[i]))
                for k in range(args.chain):
                    tag = f"2{i}{n:02d}{k:02d}"
                    b2b[i].append(start_ms(srv, clock, env_id, tag, posted_b2b[i]))
                log(f"tree {i} block {n + 1}: back to back {[round(x) for x in b2b[i][-5:]]}")
        if args.trace is not None:
            for i, (tree, mode) in enumerate(variants):
                events = list(h.iter_trace(args.trace / f"trace-{i}.jsonl"))
                for name, posted in (("idle", posted_idle[i]), ("back to back", posted_b2b[i])):
                    print(f"{tree} {mode}: {name}, ms from the POST to each phase's end")
                    print("\n".join(phase_summary(posted, events)))
        print("start (POST -> first model request), ms: min / median / max")
        for i, (tree, mode) in enumerate(variants):
            label = f"{str(tree)[-30:]} {mode}".strip()
            for name, values in (("idle", idle[i]), ("back to back", b2b[i])):
                print(
                    f"  {label:>30} {name:>13}: {min(values):6.0f} "
                    f"{statistics.median(values):6.0f} {max(values):6.0f}  (n={len(values)})"
                )
        if len(trees) == 2:
            a, b = (statistics.median(b2b[i]) for i in range(2))
            print(f"  back to back, ratio of medians tree 2 / tree 1: {b / a:.2f}")
        return 0
    finally:
        for srv in servers:
            srv.stop()
        model.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
