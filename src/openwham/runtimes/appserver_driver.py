"""The in-sandbox driver of ``codex app-server`` (``WHAM_CODEX_MODE=app-server``).

Standalone (standard library only): bound read-only into the sandbox and run by the
launcher as ``/usr/bin/python3 -I <this file> …`` in place of ``codex exec``. The sandbox
writes the prompt to its stdin once and closes it, so the driver holds the app-server's own
stdin open for the turn:

1. starts ``<codex> app-server --strict-config`` (stdio, its stderr passed through);
2. ``initialize`` (deltas and other unused notifications opted out), ``initialized`` and
   ``thread/start`` (or ``thread/resume`` of ``--resume`` with the model and effort of
   ``$CODEX_HOME/config.toml``: resume would otherwise keep the thread's persisted ones),
   **all before the prompt**; the thread's id goes out as a ``thread/started`` line, and
   ``--ready-marker`` on stderr (the launcher leaves it to the driver: the agent waits for
   its prompt only from then on);
3. reads its stdin to EOF (the prompt) and sends ``turn/start``;
4. relays the notifications ``runtimes.appserver`` translates, one JSON line each, with
   ``turn.items`` and file diffs dropped and long strings capped (one line stays well under
   the sandbox's line limit), until that turn's ``turn/completed``;
5. answers every request of the server at once (approvals and elicitations declined,
   anything else a JSON-RPC error), so a turn never waits for a client;
6. then closes the app-server's stdin (it writes its session files and exits), waits up to
   :data:`CLOSE_SECONDS`, kills it after that, and exits 0 for a completed turn, 1 otherwise.

:data:`INTERRUPT_SIGNAL` (the launcher passes on the host's cancel) sends ``turn/interrupt``
for the turn, at once or as soon as ``turn/start`` answered: Codex stops the agent's commands
and ends the turn ``interrupted`` (step 6 follows, exit 1).

A JSON-RPC error to one of its requests, or the app-server's stdout ending first, is
reported on stderr as ``openwham: …`` and the driver exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

CLOSE_SECONDS = 10.0
MAX_STRING = 512 * 1024  # per string field relayed; head and tail kept
CLIENT_NAME = "codex_exec"  # the upstream sees exec's originator and User-Agent

#: notifications the runtime does not use, switched off per connection
OPT_OUT = [
    "item/agentMessage/delta",
    "item/plan/delta",
    "item/reasoning/summaryTextDelta",
    "item/reasoning/summaryPartAdded",
    "item/reasoning/textDelta",
    "item/commandExecution/outputDelta",
    "item/commandExecution/terminalInteraction",
    "item/fileChange/outputDelta",
    "item/mcpToolCall/progress",
    "turn/diff/updated",
    "thread/status/changed",
    "account/rateLimits/updated",
    "remoteControl/status/changed",
]

#: notifications relayed to the host (``runtimes.appserver`` maps them to exec's events)
RELAYED = frozenset(
    {
        "turn/started",
        "item/started",
        "item/completed",
        "item/fileChange/patchUpdated",
        "turn/plan/updated",
        "thread/tokenUsage/updated",
        "turn/completed",
        "error",
        "warning",
        "configWarning",
        "deprecationNotice",
        "model/rerouted",
    }
)

#: the signal that cancels the turn (``runtimes.appserver``'s ``interrupt_signal``)
INTERRUPT_SIGNAL = signal.SIGUSR2

_INIT, _THREAD, _TURN, _INTERRUPT = 1, 2, 3, 4


def cap(value: Any) -> Any:
    """``value`` with every string longer than :data:`MAX_STRING` cut to its head and tail,
    and file changes' ``diff`` texts dropped (the diff is the launcher's ``after`` script's)."""
    if isinstance(value, str):
        if len(value) <= MAX_STRING:
            return value
        half = MAX_STRING // 2
        return f"{value[:half]}\n… {len(value) - 2 * half} characters omitted …\n{value[-half:]}"
    if isinstance(value, list):
        return [cap(v) for v in value]
    if isinstance(value, dict):
        return {k: cap(v) for k, v in value.items() if k != "diff"}
    return value


def answer_request(method: str) -> dict[str, Any]:
    """The answer to a server request: no one is there to approve or fill in anything."""
    if method == "mcpServer/elicitation/request":
        return {"result": {"action": "decline", "content": None}}
    if method in ("item/commandExecution/requestApproval", "item/fileChange/requestApproval"):
        return {"result": {"decision": "decline"}}
    if method in ("applyPatchApproval", "execCommandApproval"):
        rejection = "no one is there to approve it: openwham runs Codex without approvals"
        return {"result": {"decision": {"denied": {"rejection": rejection}}}}
    return {"error": {"code": -32601, "message": f"openwham does not answer {method}"}}


def resume_settings(codex_home: Path) -> dict[str, Any]:
    """``model`` and ``config.model_reasoning_effort`` from the attempt's ``config.toml``."""
    try:
        config = tomllib.loads((codex_home / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    out: dict[str, Any] = {}
    if isinstance(config.get("model"), str):
        out["model"] = config["model"]
    if isinstance(config.get("model_reasoning_effort"), str):
        out["config"] = {"model_reasoning_effort": config["model_reasoning_effort"]}
    return out


class Driver:
    """One app-server, one thread, one turn."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.answers: dict[int, dict[str, Any]] = {}
        self.completed: dict[str, str] = {}  # turn id -> status
        self.thread_id: str | None = None
        self.turn_id: str | None = None  # once turn/start answered
        self.ended = False
        self.interrupting = threading.Event()  # set by INTERRUPT_SIGNAL's handler
        self.cond = threading.Condition()
        self.out_lock = threading.Lock()  # our stdout
        self.in_lock = threading.Lock()  # the app-server's stdin

    # -------------------------------------------------------------- output

    def emit(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
        with self.out_lock:
            sys.stdout.buffer.write(data + b"\n")
            sys.stdout.buffer.flush()

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        data = json.dumps(message, ensure_ascii=False).encode() + b"\n"
        with self.in_lock:  # one writer at a time: the reader answers requests
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    # -------------------------------------------------------------- reading

    def read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if isinstance(message, dict):
                self.handle(message)
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def handle(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        if "id" in message and method is None:  # an answer to one of ours
            if message["id"] == _THREAD and isinstance(message.get("result"), dict):
                thread = message["result"].get("thread") or {}
                self.emit(
                    {"method": "thread/started", "params": {"thread": {"id": thread.get("id")}}}
                )
            with self.cond:
                self.answers[int(message["id"])] = message
                if message["id"] == _TURN and isinstance(message.get("result"), dict):
                    self.turn_id = str((message["result"].get("turn") or {}).get("id"))
                self.cond.notify_all()
            return
        if not isinstance(method, str):
            return
        if "id" in message:  # a request of the server
            with contextlib.suppress(OSError):  # the app-server is gone: stdout ends too
                self.send({"id": message["id"], **answer_request(method)})
            self.emit({"method": "warning", "params": {"message": f"openwham declined {method}"}})
            return
        if method not in RELAYED:
            return
        params = message.get("params")
        if method == "turn/completed" and isinstance(params, dict):
            turn = params.get("turn")
            if isinstance(turn, dict):
                turn.pop("items", None)
                with self.cond:
                    self.completed[str(turn.get("id"))] = str(turn.get("status"))
                    self.cond.notify_all()
        self.emit({"method": method, "params": cap(params)})

    # -------------------------------------------------------------- requests

    def call(self, request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        with contextlib.suppress(OSError):  # the app-server is gone: its stdout ends too
            self.send({"id": request_id, "method": method, "params": params})
        with self.cond:
            self.cond.wait_for(lambda: request_id in self.answers or self.ended)
            answer = self.answers.get(request_id)
        if answer is None:
            raise Failed(f"codex app-server ended before answering {method}")
        if "error" in answer or not isinstance(answer.get("result"), dict):
            error = answer.get("error") or {}
            text = error.get("message") if isinstance(error, dict) else error
            raise Failed(f"codex app-server: {method} failed: {text}")
        result: dict[str, Any] = answer["result"]
        return result

    def wait_turn(self, turn_id: str) -> str | None:
        with self.cond:
            self.cond.wait_for(lambda: turn_id in self.completed or self.ended)
            return self.completed.get(turn_id)

    def interrupt_when_asked(self) -> None:
        """Once :attr:`interrupting` is set, ``turn/interrupt`` the turn as soon as it has an
        id (not if it completed or the app-server ended first); runs in a thread of its own,
        as the signal handler may not write (it may interrupt a write holding the lock)."""
        self.interrupting.wait()
        with self.cond:
            self.cond.wait_for(lambda: self.turn_id is not None or self.ended)
            turn_id = self.turn_id
            if turn_id is None or turn_id in self.completed:
                return
        params = {"threadId": self.thread_id, "turnId": turn_id}
        with contextlib.suppress(OSError):  # the app-server is gone: the turn ends anyway
            self.send({"id": _INTERRUPT, "method": "turn/interrupt", "params": params})

    def close(self) -> int:
        """Close the app-server's stdin and wait for it (bounded); its exit status."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(CLOSE_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Failed(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="appserver_driver")
    ap.add_argument("--codex", required=True)
    ap.add_argument("--cwd", required=True)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--developer-instructions", default=None)
    ap.add_argument("--client-version", default="0")
    ap.add_argument("--ready-marker", default=None, help="printed on stderr once ready")
    args = ap.parse_args(argv)
    proc = subprocess.Popen(
        [args.codex, "app-server", "--strict-config"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=args.cwd,
    )
    driver = Driver(proc)
    threading.Thread(target=driver.read, daemon=True).start()
    threading.Thread(target=driver.interrupt_when_asked, daemon=True).start()
    signal.signal(INTERRUPT_SIGNAL, lambda *_: driver.interrupting.set())
    status: str | None = None
    try:
        driver.call(
            _INIT,
            "initialize",
            {
                "clientInfo": {"name": CLIENT_NAME, "version": args.client_version},
                "capabilities": {"optOutNotificationMethods": OPT_OUT},
            },
        )
        driver.send({"method": "initialized"})
        params: dict[str, Any] = {
            "cwd": args.cwd,
            "approvalPolicy": "never",
            "sandbox": "danger-full-access",
        }
        if args.developer_instructions is not None:
            params["developerInstructions"] = args.developer_instructions
        if args.resume:
            home = Path(os.environ.get("CODEX_HOME") or Path.home() / ".codex")
            params = {
                "threadId": args.resume,
                "excludeTurns": True,  # not needed; without it a deprecation notice comes
                **params,
                **resume_settings(home),
            }
            thread = driver.call(_THREAD, "thread/resume", params)
        else:
            thread = driver.call(_THREAD, "thread/start", params)
        thread_id = driver.thread_id = str((thread.get("thread") or {}).get("id"))
        if args.ready_marker:  # the sandbox is a standby from now on (runtime.ready_marker)
            print(args.ready_marker, file=sys.stderr, flush=True)
        prompt = sys.stdin.buffer.read().decode("utf-8", "replace")
        if not prompt.strip():
            raise Failed("no prompt")
        turn = driver.call(
            _TURN,
            "turn/start",
            {
                "threadId": thread_id,
                "input": [{"type": "text", "text": prompt, "text_elements": []}],
            },
        )
        status = driver.wait_turn(str((turn.get("turn") or {}).get("id")))
        if status is None:
            raise Failed("codex app-server ended before finishing its turn")
    except Failed as exc:
        code = driver.close()
        print(f"openwham: {exc} (status {code})", file=sys.stderr, flush=True)
        return code or 1
    driver.close()
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
