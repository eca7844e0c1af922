"""Terminal output the way git does it: colour only where someone reads it, long output
through a pager.

Colour (``--color auto``) needs stdout to be a terminal, ``NO_COLOR`` unset or empty
(https://no-color.org) and ``TERM`` other than ``dumb``; ``--color always`` / ``never``
override. The pager runs only when stdout is a terminal: ``$WHAM_PAGER``, else ``$PAGER``,
else ``less -FRX`` (quit when the text fits one screen, pass colours, leave the text on the
screen); an empty value or ``cat`` means no pager. Like git, the command runs through the
shell, ``LESS=FRX`` is set for less when ``LESS`` is not, and a pager that cannot be found
is skipped rather than losing the output.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from typing import Literal, TextIO

ColorChoice = Literal["auto", "always", "never"]
COLOR_CHOICES: tuple[ColorChoice, ...] = ("auto", "always", "never")
DEFAULT_PAGER = "less -FRX"


def wants_color(choice: str, stream: TextIO | None = None) -> bool:
    """Whether to colour what goes to ``stream`` (stdout by default)."""
    if choice == "always":
        return True
    if choice == "never":
        return False
    stream = stream or sys.stdout
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def pager_command() -> str | None:
    """The pager to run on a terminal, or ``None`` for none."""
    for name in ("WHAM_PAGER", "PAGER"):
        value = os.environ.get(name)
        if value is not None:
            value = value.strip()
            return value if value and value != "cat" else None
    return DEFAULT_PAGER


def _runnable(command: str) -> bool:
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    # `VAR=value cmd` and shell syntax are the shell's business; a bare program must exist.
    return bool(words) and ("=" in words[0] or shutil.which(words[0]) is not None)


def show(text: str, *, page: bool = True) -> None:
    """Write ``text`` to stdout, through the pager when ``page`` and stdout is a terminal."""
    command = pager_command() if page and sys.stdout.isatty() else None
    if command is None or not _runnable(command):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    env = dict(os.environ)
    env.setdefault("LESS", "FRX")
    env.setdefault("LV", "-c")
    sys.stdout.flush()
    pager = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, env=env)
    # Ctrl-C is for the pager (less uses it); wham waits for it to end, as git does.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if pager.stdin is not None:
            try:
                pager.stdin.write(text.encode(sys.stdout.encoding or "utf-8", "replace"))
                pager.stdin.close()
            except BrokenPipeError:  # the reader quit before the end
                pass
        pager.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
