"""The agent's side of an attempt: :class:`AgentRun`, the state of its run (launch, output,
the early diff, readiness), and its output held back by an :class:`OutputGate` while a
standby's checkout is checked against the branch head."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from openwham.gateway import Gateway
from openwham.runtimes import codex
from openwham.runtimes.agent import Translator
from openwham.sandbox.provider import Sandbox

from .claim import Claim
from .control import Control
from .recorder import TurnRecorder
from .standby import Prepared

OutputSink = Callable[[str, str], None]


class OutputGate:
    """An output sink that holds lines back until :meth:`open` (then passes them on in
    order, and every later line at once); lines of a gate never opened are dropped."""

    def __init__(self, sink: OutputSink) -> None:
        self._sink = sink
        self._held: list[tuple[str, str]] = []
        self._open = False
        self._lock = threading.Lock()

    def __call__(self, stream: str, line: str) -> None:
        with self._lock:
            if not self._open:
                self._held.append((stream, line))
                return
        self._sink(stream, line)

    def open(self) -> None:
        with self._lock:  # the reader waits meanwhile: the order is kept
            for stream, line in self._held:
                self._sink(stream, line)
            self._held.clear()
            self._open = True


def apply_updates(rec: TurnRecorder, updates: list[codex.Update]) -> None:
    """Record the agent's work-log and status changes, in order."""
    for update_ in updates:
        if isinstance(update_, codex.StatusUpdate):
            rec.status(update_.text)
        else:
            rec.message(update_.message)


@dataclass
class AgentRun:
    """One attempt's agent while it runs, fed by its output.

    The diff starts as soon as the agent's last model response goes through the gateway (or,
    failing that, on turn.completed): the launcher kills every process but Codex and runs it
    while Codex finishes its turn (``codex.launcher``, ``after``). Once it is ``written`` and
    Codex reported turn.completed without asking the model again, the result is final: the
    attempt finishes (``ready``) while Codex closes down and the sandbox is torn down.
    ``wake`` is set on that or on the sandbox's end."""

    claim: Claim
    rec: TurnRecorder
    control: Control
    gateway: Gateway
    translator: Translator
    written_marker: str
    run: dict[str, Any] = field(init=False)  # the turn's private ``run`` part
    wake: threading.Event = field(default_factory=threading.Event, init=False)
    written: threading.Event = field(default_factory=threading.Event, init=False)
    ready: threading.Event = field(default_factory=threading.Event, init=False)
    _launched: list[Sandbox] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.run = dict(self.claim.body.get("run") or {})

    def early_diff(self) -> None:
        """Signal the launcher to compute the diff now (once)."""
        try:
            proc = self._launched.pop()
        except IndexError:  # signalled already
            return
        proc.signal_command(signal.SIGUSR1)

    def check_ready(self) -> None:
        if (
            self.written.is_set()
            and self.translator.turn_completed
            and not self.gateway.continued_after_final(self.claim.turn_id)
        ):
            self.ready.set()
            self.wake.set()

    def on_output(self, stream: str, line: str) -> None:
        if stream != "stdout":
            if line == self.written_marker:
                self.written.set()
                self.check_ready()
            return
        apply_updates(self.rec, self.translator.feed(line))
        if self.translator.turn_completed and not self.claim.qa_mode:
            self.early_diff()
            self.check_ready()

    def launch(self, prepared: Prepared, standby: bool, sink: OutputSink) -> bool:
        """Give the prepared agent its prompt; False if its sandbox died meanwhile."""
        self._launched[:] = [prepared.proc]
        if not self.claim.qa_mode:
            self.gateway.on_final_response(self.claim.turn_id, self.early_diff)
        self.run["standby"] = standby  # for operators: did the attempt skip the start-up?
        self.rec.set(base_commit_sha=prepared.base, run=self.run)
        self.control.attach(prepared.proc)
        apply_updates(self.rec, self.translator.take_initial())
        return prepared.proc.send(self.claim.prompt.encode("utf-8", "replace"), sink)
