"""``python -m bench`` (or ``./bench/run``): openwham start-up latency and wall-time overhead.

(a) ``POST tasks`` -> the agent's first request at the model, warm mirror: p50, p95.
(b) one scripted task (shell commands, an apply_patch edit, a final message) through
    openwham (``POST tasks`` -> terminal event on the turn's SSE stream) and through plain
    ``codex exec`` in a fresh clone: p50 of each and the ratio.
Then a per-phase breakdown from a traced server and from microbenchmarks (``--no-breakdown``
skips both). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

from . import harness as h
from . import phases
from .repo import describe, generate

TARGET_A_MS = 250.0
TARGET_B_RATIO = 1.10

Row = tuple[str, float | None]


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p95 of 20 values is the 19th smallest)."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def median_of(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ms(x: float | None) -> str:
    return "   n/a" if x is None else f"{x * 1000:6.0f}"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return str(self.n)


# --------------------------------------------------------------------------- runs


def run_openwham_task(
    srv: h.WhamServer, env_id: str, clock: h.ModelClock, run: str, *, stream_at_once: bool
) -> dict[str, Any]:
    """One task. ``stream_at_once``: open the SSE stream right after POST (b); otherwise only
    after the first model request arrived, so the client adds no load during start-up (a).
    The stream replays from the start, so every event is seen either way."""
    event = clock.expect(run)
    wall0, t0 = time.time(), time.perf_counter()
    task_id, turn_id = srv.create_task(env_id, h.prompt(run))
    t_post = time.perf_counter()
    if not stream_at_once and not event.wait(120):
        raise RuntimeError(f"run {run}: no model request within 120 s; see {srv.log_path}")
    frames, t_end = srv.stream(task_id, turn_id)
    end_wall = wall0 + (t_end - t0)
    status = h.final_status(frames)
    if status != "completed":
        raise RuntimeError(f"run {run}: task ended {status}; server log: {srv.log_path}")
    srv.wait_cleanup(turn_id)
    first = clock.first.get(run)
    arrivals = clock.arrivals.get(run, [])
    return {
        "run": run,
        "turn": turn_id,
        "post_response": t_post - t0,
        "first_request": (first[0] - t0) if first else None,
        "last_request": (arrivals[-1] - t0) if arrivals else None,
        "requests": len(arrivals),
        "wall": t_end - t0,
        "wall0": wall0,
        "end_wall": end_wall,
        "first_request_wall": first[1] if first else None,
        "arrivals_wall": clock.arrivals_wall.get(run, []),
        "marks": h.stream_summary(frames),
    }


# --------------------------------------------------------------------------- breakdowns


def marks_breakdown(runs: list[dict[str, Any]]) -> list[Row]:
    """(a)'s start-up split by the turn's own SSE event timestamps (same host clock)."""

    def gap(a: str, b: str) -> float | None:
        out: list[float | None] = []
        for r in runs:
            m = {**r["marks"], "post": r["wall0"], "first_request": r["first_request_wall"]}
            ok = m.get(a) is not None and m.get(b) is not None
            out.append(m[b] - m[a] if ok else None)
        return median_of(out)

    return [
        ('POST -> claimed ("Setting up" event)', gap("post", "setting_up")),
        (
            "claimed -> prompt in the work log (title, mirror fetch, clone, CODEX_HOME)",
            gap("setting_up", "first_worklog"),
        ),
        (
            "prompt in the work log -> first model request (sandbox, forwarder, Codex)",
            gap("first_worklog", "first_request"),
        ),
    ]


def _by_turn(trace: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for rec in h.iter_trace(trace):
        if rec.get("turn"):
            out.setdefault(rec["turn"], []).append(rec)
    return out


def _first(recs: list[dict[str, Any]], name: str, cmd: str | None = None) -> dict[str, Any] | None:
    for rec in recs:
        if rec["name"] == name and (cmd is None or rec.get("cmd") == cmd):
            return rec
    return None


def _dur(rec: dict[str, Any] | None) -> float | None:
    return rec["t1"] - rec["t0"] if rec and rec.get("t1") is not None else None


def _between(a: float | None, b: float | None) -> float | None:
    return b - a if a is not None and b is not None else None


def _t(rec: dict[str, Any] | None, key: str = "t0") -> float | None:
    return rec.get(key) if rec else None


def traced_breakdown(trace: Path, runs: list[dict[str, Any]]) -> list[Row]:
    """Per-phase medians from the traced server's spans."""
    turns = _by_turn(trace)
    cols: dict[str, list[float | None]] = {}
    for r in runs:
        recs = turns.get(r["turn"], [])

        def f(name: str, cmd: str | None = None, recs: list[dict[str, Any]] = recs) -> Any:
            return _first(recs, name, cmd)

        ws, clone = f("create_workspace"), f("git", "clone")
        bw = f("bwrap_start_call") if ws else None  # a standby's sandbox started earlier
        out1, gw = f("sandbox_first_stdout"), f("gateway_request")
        rows: list[Row] = [
            (
                "HTTP POST -> executor.submit (parse, auth, task rows, commit)",
                _between(r["wall0"], _t(f("submit"))),
            ),
            ("submit -> worker thread in run_turn", _between(_t(f("submit")), _t(f("run_turn")))),
            ("claim (conditional UPDATE + event, commit)", _dur(f("claim"))),
            (
                "standby taken (rename, held token hand-over) -> prompt sent",
                _between(_t(f("claim"), "t1"), _t(f("prompt_sent"))),
            ),
            ("title (UPDATE + event, commit; after the prompt)", _dur(f("title"))),
            (
                "mirror fetch (git fetch --prune; with a standby: after the prompt, overlapped)",
                _dur(f("mirror_ensure")),
            ),
            ("cold start only: git clone --local --no-hardlinks", _dur(clone)),
            (
                "cold start only: rev-parse, remote set-url, rev-parse",
                (_dur(ws) or 0) - (_dur(clone) or 0) if ws else None,
            ),
            (
                "cold start only: CODEX_HOME, gateway token, work-log event",
                _between(_t(ws, "t1"), _t(bw)),
            ),
            ("cold start only: bwrap.start() call (cgroups, Popen)", _dur(bw)),
            (
                "prompt sent -> Codex's first JSON line",
                _between(_t(f("prompt_sent")), _t(out1)),
            ),
            ("Codex's first JSON line -> request at the gateway", _between(_t(out1), _t(gw))),
            ("gateway -> scripted model", _between(_t(gw), r["first_request_wall"])),
            ("= POST -> first model request (these traced runs)", r["first_request"]),
        ]
        for name, value in rows:
            cols.setdefault(name, []).append(value)
    return [(name, median_of(v)) for name, v in cols.items()]


def after_breakdown(trace: Path, runs: list[dict[str, Any]]) -> list[Row]:
    turns = _by_turn(trace)
    cols: dict[str, list[float | None]] = {}
    for r in runs:
        recs = turns.get(r["turn"], [])
        exit_ = _first(recs, "sandbox_exit")
        gws = [x for x in recs if x["name"] == "gateway_request"]
        completed = _first(recs, "turn_completed_line")
        written = _first(recs, "result_written")
        finish = _first(recs, "recorder_finish")
        last = _t(gws[-1]) if gws else None
        rows: list[Row] = [
            ("last model request -> Codex's turn.completed line", _between(last, _t(completed))),
            (
                "turn.completed -> diff written (launcher: kill the rest, git add -A, diff)",
                _between(_t(completed), _t(written)),
            ),
            (
                "diff written -> finish starts (read diff, stats, title)",
                _between(_t(written), _t(finish)),
            ),
            ("finish (final UPDATE + terminal event)", _dur(finish)),
            (
                "finish -> terminal event at the client (SSE)",
                _between(_t(finish, "t1"), r["end_wall"]),
            ),
            ("(off the path) last model request -> sandbox gone", _between(last, _t(exit_))),
        ]
        for name, value in rows:
            cols.setdefault(name, []).append(value)
    return [(name, median_of(v)) for name, v in cols.items()]


def loop_breakdown(trace: Path, runs: list[dict[str, Any]], plain: list[h.PlainRun]) -> list[Row]:
    """One model round trip of the agent loop, openwham (traced) against plain Codex."""
    turns = _by_turn(trace)
    req_path: list[float | None] = []
    back: list[float | None] = []
    recorder: list[float | None] = []
    for r in runs:
        recs = turns.get(r["turn"], [])
        gws = [x["t0"] for x in recs if x["name"] == "gateway_request"]
        arr = r.get("arrivals_wall") or []
        for n in range(min(len(gws), len(arr))):
            req_path.append(arr[n] - gws[n])
            if n + 1 < len(gws):
                back.append(gws[n + 1] - arr[n])
        spans = [x for x in recs if x["name"] in ("recorder_message", "recorder_status")]
        recorder.append(sum(_dur(x) or 0 for x in spans) if spans else None)
    plain_gaps: list[float | None] = []
    for p in plain:
        plain_gaps += [b - a for a, b in pairwise(p.arrivals)]
    ow_gaps: list[float | None] = []
    for r in runs:
        arr = r.get("arrivals_wall") or []
        ow_gaps += [b - a for a, b in pairwise(arr)]
    return [
        ("plain Codex: model request -> next model request", median_of(plain_gaps)),
        ("openwham: model request -> next model request", median_of(ow_gaps)),
        ("  of which: model request -> at the model (gateway hop)", median_of(req_path)),
        ("  of which: at the model -> next request at the gateway", median_of(back)),
        ("work-log writes per attempt (sum, on the sandbox's reader thread)", median_of(recorder)),
    ]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=20, help="measured runs per series (20)")
    p.add_argument("--files", type=int, default=5000, help="files in the generated repo (5000)")
    p.add_argument(
        "--loose-objects",
        action="store_true",
        help="leave the generated repo's objects loose (as in a local working repo never "
        "gc'ed); default: packed, as in a repo cloned from a server",
    )
    p.add_argument(
        "--breakdown-runs",
        type=int,
        default=8,
        help="runs of the traced server and of each microbenchmark (8)",
    )
    p.add_argument("--no-breakdown", action="store_true", help="only (a) and (b)")
    p.add_argument("--only", choices=["a", "b"], help="run only (a) or only (b)")
    p.add_argument(
        "--workdir",
        type=Path,
        help="for the repo, data dirs and clones (default: a new dir in /var/tmp, removed after)",
    )
    p.add_argument(
        "--tmpfs",
        action="store_true",
        help="put the work directory (repo, wham data dir with its mirrors and workspaces, "
        "plain clones) on /dev/shm instead of /var/tmp",
    )
    p.add_argument(
        "--server-module",
        help="run the measured server as `python -m MODULE serve …` instead of `wham serve` "
        "(e.g. bench.traced_serve, which adds timing wrappers)",
    )
    p.add_argument(
        "--no-standby",
        action="store_true",
        help="run the measured server with WHAM_STANDBY_SANDBOXES=0 (every attempt starts cold)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, help="also write every measurement to this file")
    args = p.parse_args(argv)

    # Not under /tmp: Codex skips its helper binaries when CODEX_HOME is there (plain runs).
    parent = "/dev/shm" if args.tmpfs else "/var/tmp"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="openwham-bench-", dir=parent))
    work.mkdir(parents=True, exist_ok=True)
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True, text=True)
    args.fs = f"on {fs.stdout.strip() or '?'} ({work})"
    model, clock = h.start_model()
    servers: list[h.WhamServer] = []
    counter = Counter()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        log(f"bench: work directory {work}")
        t = time.perf_counter()
        repo = generate(work / "repo", files=args.files, loose=args.loose_objects)
        results["repo"] = describe(repo)
        log(f"bench: generated {results['repo']} in {time.perf_counter() - t:.1f} s")

        srv = h.WhamServer.start(
            work / "data",
            model.url,
            log_path=work / "serve.log",
            module=args.server_module,
            extra_env={
                "BENCH_TRACE": str(work / "trace-main.jsonl"),
                **({"WHAM_STANDBY_SANDBOXES": "0"} if args.no_standby else {}),
            },
        )
        servers.append(srv)
        env_id = srv.create_env(repo)
        model.script = h.task_script()
        log("bench: warm-up task (clones the mirror)")
        run_openwham_task(srv, env_id, clock, counter.next(), stream_at_once=True)

        a_runs: list[dict[str, Any]] = []
        if args.only in (None, "a"):
            model.script = []  # the agent answers at once: (a) only needs the first request
            log(f"bench: (a) {args.runs} runs")
            for _ in range(args.runs):
                a_runs.append(
                    run_openwham_task(srv, env_id, clock, counter.next(), stream_at_once=False)
                )
                time.sleep(0.2)
            results["a"] = a_runs

        b_ow: list[dict[str, Any]] = []
        b_plain: list[h.PlainRun] = []
        if args.only in (None, "b"):
            model.script = h.task_script()
            log(f"bench: (b) {args.runs} x (openwham, plain codex exec), interleaved")
            plain_home = work / "plain-codex-home"
            # Warm-up: plain Codex creates its state in the kept CODEX_HOME (not counted).
            h.run_plain_codex(repo, work / "plain", plain_home, model.url, clock, counter.next())
            for i in range(args.runs):
                b_ow.append(
                    run_openwham_task(srv, env_id, clock, counter.next(), stream_at_once=True)
                )
                time.sleep(0.2)
                plain = h.run_plain_codex(
                    repo, work / "plain", plain_home, model.url, clock, counter.next()
                )
                if not plain.completed:
                    raise RuntimeError(f"plain codex exec run {i}: exit {plain.exit_code}")
                b_plain.append(plain)
                time.sleep(0.2)
            results["b"] = {"openwham": b_ow, "plain": [vars(x) for x in b_plain]}
        srv.stop()
        servers.remove(srv)

        traced: list[dict[str, Any]] = []
        micro: dict[str, list[float]] = {}
        trace = work / "trace.jsonl"
        if not args.no_breakdown and args.breakdown_runs > 0:
            log(f"bench: breakdown: traced server, {args.breakdown_runs} runs")
            tsrv = h.WhamServer.start(
                work / "data-traced",
                model.url,
                log_path=work / "serve-traced.log",
                module="bench.traced_serve",
                extra_env={"BENCH_TRACE": str(trace)},
            )
            servers.append(tsrv)
            tenv = tsrv.create_env(repo)
            model.script = h.task_script()
            run_openwham_task(tsrv, tenv, clock, counter.next(), stream_at_once=True)
            for _ in range(args.breakdown_runs):
                traced.append(
                    run_openwham_task(tsrv, tenv, clock, counter.next(), stream_at_once=True)
                )
                time.sleep(0.2)
            tsrv.stop()
            servers.remove(tsrv)
            log(f"bench: breakdown: microbenchmarks, {args.breakdown_runs} runs each")
            micro.update(phases.host_steps(repo, work / "micro", args.breakdown_runs))
            model.script = []
            micro.update(
                phases.sandbox_steps(repo, work / "micro-sb", model.url, clock, args.breakdown_runs)
            )
            results["traced"] = traced
            results["micro"] = micro

        report(args, results["repo"], a_runs, b_ow, b_plain, traced, trace, micro)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        return 0
    finally:
        for s in servers:
            s.stop()
        model.stop()
        if args.keep or args.workdir is not None:
            log(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _rows(rows: list[Row], indent: str = "    ") -> None:
    for name, value in rows:
        print(f"{indent}{ms(value)} ms  {name}")


def report(
    args: argparse.Namespace,
    repo: str,
    a_runs: list[dict[str, Any]],
    b_ow: list[dict[str, Any]],
    b_plain: list[h.PlainRun],
    traced: list[dict[str, Any]],
    trace: Path,
    micro: dict[str, list[float]],
) -> None:
    load = os.getloadavg()
    print()
    print(
        f"openwham bench: {repo}; {args.runs} runs; {os.cpu_count()} CPUs; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"work dir {args.fs}"
    )
    if args.server_module:
        print(f"server: python -m {args.server_module} serve (not the plain `wham serve`)")
    print(
        "standby sandboxes: "
        + (
            "off (WHAM_STANDBY_SANDBOXES=0): every attempt clones and starts Codex"
            if args.no_standby
            else "on (default): each run waits until the server is idle with a standby ready"
        )
    )
    if a_runs:
        first = [r["first_request"] for r in a_runs]
        p50, p95 = statistics.median(first), pct(first, 95)
        verdict = "meets" if p50 * 1000 <= TARGET_A_MS else "MISSES"
        print()
        print("(a) POST tasks -> first model request (warm mirror)")
        print(
            f"    p50 {ms(p50)} ms   p95 {ms(p95)} ms   min {ms(min(first))} ms   "
            f"max {ms(max(first))} ms   (target p50 <= {TARGET_A_MS:.0f} ms: {verdict})"
        )
        post = statistics.median(r["post_response"] for r in a_runs)
        print(f"    POST tasks answered in {ms(post).strip()} ms (p50); medians by SSE events:")
        _rows(marks_breakdown(a_runs), "      ")
    if b_ow and b_plain:
        ow = [r["wall"] for r in b_ow]
        pl = [r.wall for r in b_plain]
        ratio = statistics.median(ow) / statistics.median(pl)
        with_clone = statistics.median(ow) / statistics.median([r.wall + r.clone for r in b_plain])
        verdict = "meets" if ratio <= TARGET_B_RATIO else "MISSES"
        print()
        print("(b) scripted task (5 shell commands, 1 apply_patch edit, final message), wall time")
        print(
            f"    openwham   POST -> terminal SSE event   p50 {ms(statistics.median(ow))} ms   "
            f"p95 {ms(pct(ow, 95))} ms"
        )
        print(
            f"    plain      codex exec (fresh clone)     p50 {ms(statistics.median(pl))} ms   "
            f"p95 {ms(pct(pl, 95))} ms"
        )
        print(f"    ratio of the p50s {ratio:.2f}   (target <= {TARGET_B_RATIO:.2f}: {verdict})")
        clone = statistics.median(r.clone for r in b_plain)
        print(
            f"    (the plain run's own `git clone` beforehand, p50 {ms(clone).strip()} ms, is "
            f"not counted; counting it the ratio is {with_clone:.2f})"
        )
        med: Callable[[list[float | None]], str] = lambda v: ms(median_of(v))  # noqa: E731
        print("    where the time goes (p50)               openwham      plain")
        print(
            f"      start -> first model request          {med([r['first_request'] for r in b_ow])}"
            f" ms   {med([r.first_request for r in b_plain])} ms"
        )
        print(
            "      first -> last model request (agent)   "
            f"{med([_between(r['first_request'], r['last_request']) for r in b_ow])} ms   "
            f"{med([_between(r.first_request, r.last_request) for r in b_plain])} ms"
        )
        print(
            "      last model request -> done            "
            f"{med([_between(r['last_request'], r['wall']) for r in b_ow])} ms   "
            f"{med([_between(r.last_request, r.wall) for r in b_plain])} ms"
        )
    if traced:
        print()
        print(
            f"Start-up by phase (traced `wham serve`, {len(traced)} runs of the (b) task, "
            "medians of each phase)"
        )
        _rows(traced_breakdown(trace, traced))
        print("  agent loop, per model round trip:")
        _rows(loop_breakdown(trace, traced, b_plain))
        print("  after the agent's last model request:")
        _rows(after_breakdown(trace, traced))
    if micro:
        print()
        print("Microbenchmarks (each step alone, same repo): median, min in ms")
        for name, med_, low, n in phases.summarize(micro):
            print(f"    {med_:6.0f} {low:6.0f}  {name}  (n={n})")


if __name__ == "__main__":
    sys.exit(main())
