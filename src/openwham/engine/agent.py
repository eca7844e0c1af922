"""The agent's side of an attempt: its output, held back by an :class:`OutputGate` while a
standby's checkout is checked against the branch head."""

from __future__ import annotations

import threading
from collections.abc import Callable

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
