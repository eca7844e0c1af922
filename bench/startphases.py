"""``python -m bench.startphases``: where an idle start goes, phase by phase (issue 20).

One ``wham serve`` under ``bench.traced_serve`` (its ``src`` from ``--tree``, default this
tree) with Codex's own log on (``BENCH_CODEX_RUST_LOG``), a small generated repository and
the scripted model. Each run waits until the standby is prepared and settled, posts one task
and takes, from that one run's timestamps (the server's spans and Codex's log lines, one
clock: the same machine), the time between consecutive marks on the way from ``POST tasks``
to the scripted model's first request:

- the API: the ``POST`` handled and committed, the executor's submit;
- the claim (a write transaction), the standby taken and the prompt written to it;
- Codex, from its log: reading the prompt and loading its config; the in-process
  app-server's ``initialize`` (``os_info``, which runs ``lsb_release -a`` twice);
  ``thread/start`` (session, rollout file, git information); the turn submitted; the turn's
  set-up (``git status`` and friends, the skills catalogue) up to its skill selection; the
  prompt and tools built; the HTTP client (system root certificates) to its connect;
- the forwarder to the gateway, the gateway to the scripted model.

Alongside (not on the path unless it ends last): the mirror fetch and branch check that
let the gateway release a standby's held request. Prints min / median / max per phase.
With ``--back-to-back`` each task is posted the moment the previous one ended (its
workspace removed), as ``bench.backtoback`` does, instead of once the standby waits for its
prompt: the take then may wait for the standby's fill (``take_standby``, alongside).
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import harness as h
from .backtoback import start_ms
from .repo import generate

CODEX_LOG = "info,codex_skills_extension=debug,reqwest=debug,codex_core::exec_policy=debug"

Record = dict[str, Any]


def _codex(text: str) -> Callable[[Record], bool]:
    return lambda r: r["name"] == "codex_log" and text in r.get("msg", "")


def _named(name: str) -> Callable[[Record], bool]:
    return lambda r: r["name"] == name


# (phase ending at the mark, the mark, whether the mark is a span's end)
MARKS: list[tuple[str, Callable[[Record], bool], bool]] = [
    ("POST handled, committed -> executor submit", _named("submit"), False),
    ("claim (write transaction)", _named("claim"), True),
    ("standby taken, prompt written", _named("prompt_sent"), False),
    ("Codex reads the prompt, loads its config", _codex("exec_policy: loaded rules"), False),
    ("initialize (os_info: lsb_release -a twice)", _codex("notification: Initialized"), False),
    ("thread/start (session, rollout, git info)", _codex("thread_start_total"), False),
    ("turn submitted", _codex("Sent prompt"), False),
    ("turn set-up (git status, skills)", _codex("shadow skill selection"), False),
    ("prompt and tools built", _codex("custom_ca"), False),
    ("HTTP client (root certificates) to connect", _codex("starting new connection"), False),
    ("forwarder -> gateway", _named("gateway_request"), False),
]


# done before the prompt in app-server mode (a standby's driver runs them at its start)
BEFORE_PROMPT_IN_APP_SERVER = {
    "Codex reads the prompt, loads its config",
    "initialize (os_info: lsb_release -a twice)",
    "thread/start (session, rollout, git info)",
}


APP_SERVER_TURN = _codex("app_server_tracing: close")


def phases(
    records: list[Record], turn: str, posted: float, first: float, mode: str = ""
) -> dict[str, float]:
    """Milliseconds per phase of one start (``turn``'s records; ``posted``/``first``: the
    POST and the scripted model's first request, ``time.time()``; ``mode``: Codex's)."""
    mine = sorted(
        (r for r in records if r.get("turn") == turn and posted <= r["t0"] <= first + 0.01),
        key=lambda r: r["t0"],
    )
    out: dict[str, float] = {}
    prev = posted
    for name, match, at_end in MARKS:
        if mode == "app-server" and name in BEFORE_PROMPT_IN_APP_SERVER:
            continue
        if mode == "app-server" and name == "turn submitted":  # exec's client logs "Sent prompt"
            name, match = "turn/start handled (driver -> app-server)", APP_SERVER_TURN
        hit = next((r for r in mine if match(r) and r["t0"] >= prev - 0.0005), None)
        if hit is None:
            after = [r.get("msg", r["name"])[:100] for r in mine if r["t0"] >= prev - 0.0005]
            raise RuntimeError(
                f"{turn}: no mark for {name!r} (a renamed function or log line?); "
                f"records after the last mark: {after[:40]}"
            )
        at = hit["t1"] if at_end else hit["t0"]
        out[name] = (at - prev) * 1000
        prev = at
    out["gateway -> scripted model"] = (first - prev) * 1000
    out["total: POST -> first model request"] = (first - posted) * 1000
    for r in mine:
        if r["name"] in ("mirror_ensure", "branch_head") and r.get("t1"):
            out[f"  alongside: {r['name']}"] = (r["t1"] - r["t0"]) * 1000
        elif r["name"] == "take_standby" and r.get("t1"):
            out["  alongside: take_standby (a fill under way)"] = (r["t1"] - r["t0"]) * 1000
        elif r["name"] == "gateway_release":
            out["  alongside: held request released, after POST"] = (r["t0"] - posted) * 1000
            # the standby's request waits in the gateway until the branch check is done
            out["  of which the request waited for that release"] = max(0.0, r["t0"] - prev) * 1000
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.startphases", description=__doc__)
    ap.add_argument("--tree", type=Path, default=h.ROOT, help="source tree (this one)")
    ap.add_argument("--runs", type=int, default=6, help="idle starts (6)")
    ap.add_argument("--files", type=int, default=50, help="files in the generated repository")
    ap.add_argument("--mode", default="", choices=["", "exec", "app-server"], help="Codex's")
    ap.add_argument(
        "--back-to-back",
        action="store_true",
        help="post each task as the previous one ended, not once the standby waits",
    )
    args = ap.parse_args(argv)
    tree = args.tree.resolve()
    work = Path(tempfile.mkdtemp(prefix="wham-bench-phases-", dir="/var/tmp"))
    trace = work / "trace.jsonl"
    model, clock = h.start_model()
    model.script = [h.Shell("echo hi"), h.Say("Hi.")]
    srv = None
    starts: list[tuple[str, float, str]] = []
    try:
        repo = generate(work / "repo", args.files)
        srv = h.WhamServer.start(
            work / "data",
            model.url,
            log_path=work / "serve.log",
            module="bench.traced_serve",
            extra_env={
                "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{h.ROOT}",
                "BENCH_TRACE": str(trace),
                "BENCH_CODEX_RUST_LOG": CODEX_LOG,
                **({"WHAM_CODEX_MODE": args.mode} if args.mode else {}),
            },
        )
        env_id = srv.create_env(repo)
        start_ms(srv, clock, env_id, "970000")  # cold; leaves a standby
        for n in range(args.runs):
            deadline = time.monotonic() + 30
            while not args.back_to_back and not (
                srv._standby_settled() and h.standby_waiting(srv.process.pid)
            ):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if not args.back_to_back:
                time.sleep(0.5)
            tag = f"97{n + 1:02d}00"
            posted = time.time()
            start_ms(srv, clock, env_id, tag)
            starts.append((tag, posted, ""))
    finally:
        if srv is not None:
            srv.stop()
        model.stop()
    load = os.getloadavg()
    records = list(h.iter_trace(trace))
    submits = sorted((r for r in records if r["name"] == "submit"), key=lambda r: r["t0"])
    table: dict[str, list[float]] = {}
    for tag, posted, _ in starts:
        turn = next(r["turn"] for r in submits if r["t0"] >= posted)
        for name, ms in phases(records, turn, posted, clock.first[tag][1], args.mode).items():
            table.setdefault(name, []).append(ms)
    shutil.rmtree(work, ignore_errors=True)
    mode = args.mode or "default"
    kind = "back-to-back" if args.back_to_back else "idle"
    print(f"{kind} start phases, ms min / median / max (n={len(starts)}; tree {tree}; {mode})")
    for name, values in table.items():
        print(
            f"  {name:<56} {min(values):6.0f} {statistics.median(values):6.0f} {max(values):6.0f}"
        )
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
