"""An interactive terminal program driven through tmux, as a user at a terminal drives it.

Each :class:`Tmux` has a server of its own (``tmux -L <unique socket>``), so tests never see
nor touch anyone else's tmux sessions, and :meth:`Tmux.kill` ends exactly that server (and the
program in it). Screens are read with ``capture-pane -p``; :meth:`Tmux.wait_for` polls them
until a condition holds, within a bounded time.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Tmux:
    """One tmux server with one window of ``width`` by ``height`` cells."""

    width: int = 200
    height: int = 50
    socket: str = field(default_factory=lambda: f"wham-test-{uuid.uuid4().hex[:12]}")
    session: str = "main"
    started: bool = False

    def _tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=10,
        )

    def start(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str]) -> Tmux:
        """Run ``argv`` in a fresh detached session with exactly ``env`` (plus ``TERM``)."""
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # `env -i`: the tmux server's own environment (the test's) does not leak in.
        command = f"exec env -i TERM=xterm-256color {exports} {shlex.join(argv)}"
        self._tmux(
            "new-session",
            "-d",
            "-s",
            self.session,
            "-x",
            str(self.width),
            "-y",
            str(self.height),
            "-c",
            str(cwd),
            command,
        )
        self.started = True
        # Keep the pane when the program exits, so that its last screen can still be read.
        self._tmux("set-option", "-t", self.session, "remain-on-exit", "on")
        return self

    def keys(self, *keys: str) -> None:
        """``send-keys``: tmux key names (``Enter``, ``Tab``, ``Escape``, ``Down``, ``q``)."""
        self._tmux("send-keys", "-t", self.session, *keys)

    def press(
        self,
        key: str,
        until: str | re.Pattern[str] | Callable[[str], bool],
        *,
        unchanged: str,
        timeout: float = 30,
        retry_after: float = 5,
    ) -> str:
        """Send ``key`` and wait for ``until``. A program busy redrawing can miss a key (seen
        with the Codex TUI's Tab on a loaded machine): when the screen still shows
        ``unchanged`` (what the key changes) after ``retry_after`` seconds, the key is sent
        again. Only for keys whose effect ``unchanged`` tells, so a retry never doubles one."""
        deadline = time.monotonic() + timeout
        while True:
            self.keys(key)
            try:
                return self.wait_for(until, timeout=retry_after)
            except AssertionError:
                if time.monotonic() > deadline or unchanged not in self.screen():
                    return self.wait_for(until, timeout=max(0.0, deadline - time.monotonic()))

    def screen(self) -> str:
        """The visible screen as text (``capture-pane -p``), trailing blanks removed."""
        out = self._tmux("capture-pane", "-p", "-t", self.session).stdout
        return "\n".join(line.rstrip() for line in out.splitlines()).rstrip("\n")

    def wait_for(
        self,
        condition: str | re.Pattern[str] | Callable[[str], bool],
        timeout: float = 30,
        interval: float = 0.1,
    ) -> str:
        """Poll the screen until it contains ``condition`` (a text, a pattern to search, or a
        predicate that holds) and return it; fail with the last screen after ``timeout``
        seconds."""
        test: Callable[[str], bool]
        if isinstance(condition, str):
            test = lambda s: condition in s  # noqa: E731
        elif isinstance(condition, re.Pattern):
            test = lambda s: condition.search(s) is not None  # noqa: E731
        else:
            test = condition
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if test(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never showed {condition!r}:\n{text}")
            time.sleep(interval)

    def kill(self) -> None:
        """End this tmux server and the program running in it, and remove its socket."""
        if self.started:
            socket = self._tmux("display-message", "-p", "#{socket_path}", check=False)
            self._tmux("kill-server", check=False)
            self.started = False
            if socket.returncode == 0 and socket.stdout.strip():
                Path(socket.stdout.strip()).unlink(missing_ok=True)
