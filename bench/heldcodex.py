"""``python -m bench.heldcodex``: a held Codex, ``exec`` against ``app-server`` (issue 20).

What a standby could save of Codex's own start: the pinned Codex, no sandbox and no server,
its ``CODEX_HOME`` from ``codex_home_files`` with the provider pointed straight at the
scripted model, in a clone of a small generated repository, started and left 1.5 s before
the prompt is given (as a standby's is), then the time until the scripted model has the
first request:

- ``exec``: ``codex exec --json … -`` (the runtime's argv) with the prompt written to its
  stdin: it reads the prompt first and does its config, ``initialize`` and ``thread/start``
  after;
- ``app-server``: ``codex app-server`` sent ``initialize`` and ``thread/start`` (cwd the clone,
  approvals never, no Codex sandbox, as ``exec`` runs) before the wait, and the prompt as
  ``turn/start``.

The two alternate ``--runs`` times. Prints min / median / max each. Loopback only; every wait
is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import harness as h
from .repo import generate

HELD_SECONDS = 1.5


class AppServer:
    """``codex app-server`` on pipes: JSON-RPC requests and their answers."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        self._answers: dict[int, dict[str, Any]] = {}
        self._methods: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            with self._cond:
                if "id" in message and ("result" in message or "error" in message):
                    self._answers[message["id"]] = message
                else:
                    self._methods.append(str(message.get("method")))
                self._cond.notify_all()

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def call(self, request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.send({"id": request_id, "method": method, "params": params})
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self._answers, 30):
                raise RuntimeError(f"app-server: no answer to {method}")
        answer = self._answers[request_id]
        if "error" in answer:
            raise RuntimeError(f"app-server: {method}: {answer['error']}")
        return dict(answer["result"])

    def wait_for(self, method: str, timeout: float = 60) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: method in self._methods, timeout):
                raise RuntimeError(f"app-server: no {method}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    from openwham.runtimes import codex
    from openwham.runtimes.codex_cli import native_binary

    ap = argparse.ArgumentParser(prog="python -m bench.heldcodex", description=__doc__)
    ap.add_argument("--runs", type=int, default=6, help="runs of each (6)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="wham-bench-held-", dir="/var/tmp"))
    model, clock = h.start_model()
    results: dict[str, list[float]] = {"exec": [], "app-server": []}
    try:
        repo = generate(work / "repo", 50)
        clone = work / "work"
        subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)

        def env_for(name: str) -> dict[str, str]:
            home = work / name
            home.mkdir(mode=0o700)
            for file, text in codex.codex_home_files(base_url=model.url, model=h.MODEL).items():
                (home / file).write_text(text)
            return {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": str(work),
                "LANG": "C.UTF-8",
                "TERM": "dumb",
                "CODEX_HOME": str(home),
                codex.TOKEN_ENV: "sk-bench-anything",
            }

        def first_request(run: str, t0: float) -> float:
            if not clock.expect(run).wait(60):
                raise RuntimeError(f"{run}: no model request")
            return (clock.first[run][0] - t0) * 1000

        for n in range(args.runs):
            run = f"{41000 + n}"
            model.script = [h.Say("Hi.")]
            cmd = codex.command(h.prompt(run), workdir=str(clone), executable=str(native_binary()))
            proc = subprocess.Popen(
                cmd.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env_for(f"exec{n}"),
            )
            time.sleep(HELD_SECONDS)
            assert proc.stdin is not None and proc.stdout is not None
            t0 = time.perf_counter()
            proc.stdin.write(cmd.stdin)
            proc.stdin.close()
            results["exec"].append(first_request(run, t0))
            proc.stdout.read()
            proc.wait(60)

            run = f"{42000 + n}"
            model.script = [h.Say("Hi.")]
            server = AppServer([str(native_binary()), "app-server"], env_for(f"as{n}"), clone)
            try:
                server.call(1, "initialize", {"clientInfo": {"name": "openwham", "version": "0"}})
                server.send({"method": "initialized"})
                thread = server.call(
                    2,
                    "thread/start",
                    {
                        "cwd": str(clone),
                        "approvalPolicy": "never",
                        "sandbox": "danger-full-access",
                    },
                )
                time.sleep(HELD_SECONDS)
                t0 = time.perf_counter()
                server.call(
                    3,
                    "turn/start",
                    {
                        "threadId": thread["thread"]["id"],
                        "input": [{"type": "text", "text": h.prompt(run)}],
                    },
                )
                results["app-server"].append(first_request(run, t0))
                server.wait_for("turn/completed")
            finally:
                server.close()
    finally:
        model.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("held Codex, prompt -> first model request, ms: min / median / max")
    for name, values in results.items():
        print(
            f"  {name:>10}: {min(values):6.0f} {statistics.median(values):6.0f} "
            f"{max(values):6.0f}  (n={len(values)})"
        )
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
