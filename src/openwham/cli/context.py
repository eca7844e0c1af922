"""What every client command shares: the chosen profile, a client for it, one-line errors and
the documented exit codes."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer

from .common import fail

if TYPE_CHECKING:  # the SDK (httpx, the wire models) loads when a command opens a client
    from rich.console import Console

    from openwham.client import WhamClient, WhamError
    from openwham.client.profiles import Profile

# Exit codes (README, "Exit codes").
OK = 0
FAILED = 1  # an error, a failed/cancelled task, a partial or failed apply
USAGE = 2  # bad arguments
PENDING = 3  # the task is still running (not ready yet)
AUTH = 4  # not logged in, or credentials refused

P = ParamSpec("P")
R = TypeVar("R")


class LazyConsole:
    """A rich ``Console`` made at the first ``print``: importing rich is ~60 ms of a ``wham``
    start, and ``--help`` or a usage error never prints through it."""

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr, highlight=False, soft_wrap=True)
        self._console.print(*objects, **kwargs)


out = LazyConsole()
err = LazyConsole(stderr=True)


def profile_name(ctx: typer.Context) -> str | None:
    root = ctx.find_root()
    obj = root.obj if isinstance(root.obj, dict) else {}
    name = obj.get("profile")
    return name if isinstance(name, str) else None


def selected_profile(ctx: typer.Context) -> Profile:
    from openwham.client.profiles import ProfileStore

    return ProfileStore().select(profile_name(ctx))


def open_client(ctx: typer.Context) -> WhamClient:
    """A client for the chosen profile. With no profile at all and no chatgpt.com sign-in,
    ``NotLoggedIn`` whose hint names both ways in (an openwham server, chatgpt.com)."""
    from openwham.client import NotLoggedIn, WhamClient
    from openwham.client.profiles import client_kwargs

    profile = selected_profile(ctx)
    auth_file = profile.auth_home() / "auth.json"
    if profile.kind == "chatgpt" and not _profile_chosen(ctx) and not auth_file.exists():
        raise NotLoggedIn(
            f"not logged in: no profile, and no chatgpt.com sign-in ({auth_file})",
            hint=NO_PROFILE_HINT,
        )
    return WhamClient(**client_kwargs(profile))


NO_PROFILE_HINT = (
    "log in to an openwham server with `wham login --server URL --token TOKEN` (a token from "
    "`wham token create` on the server), or to chatgpt.com with `wham login`"
)


def _profile_chosen(ctx: typer.Context) -> bool:
    """Whether anything picked a profile (``--profile``, ``$WHAM_PROFILE``, ``$WHAM_URL``, a
    default in the profiles file) rather than the built-in ``chatgpt`` fallback."""
    from openwham.client.profiles import ProfileStore

    if profile_name(ctx) or os.environ.get("WHAM_PROFILE") or os.environ.get("WHAM_URL"):
        return True
    return ProfileStore().default_name() is not None


die = fail  # one way to end a command with an error line (cli.common)


def _code_for(e: WhamError) -> int:
    from openwham.client import AuthError, Conflict

    if isinstance(e, AuthError):
        return AUTH
    if isinstance(e, Conflict) and "still running" in str(e):
        return PENDING
    return FAILED


def _hint_for(e: WhamError) -> str | None:
    from openwham.client import AuthError, NotFound, RateLimited

    if e.hint:
        return e.hint
    if isinstance(e, AuthError):
        return "run `wham login` (chatgpt.com) or `wham login --server URL --token TOKEN`"
    if isinstance(e, NotFound):
        return "check the id (`wham task list`, `wham env list`)"
    if isinstance(e, RateLimited):
        return "see `wham usage` for when the window resets"
    return None


def handles_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """SDK errors become one line on stderr (and a hint), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except Exception as e:
            sdk = _sdk_error(e)
            if sdk is None:
                raise
            die(str(sdk), _code_for(sdk), _hint_for(sdk))

    return wrapper


def _sdk_error(e: Exception) -> WhamError | None:
    """``e`` when it is an SDK error. Before the SDK is loaded none can exist, so a command
    that ends early (a usage error, ``typer.Exit``) does not load it just to ask."""
    if "openwham.client.errors" not in sys.modules:
        return None
    from openwham.client.errors import WhamError

    return e if isinstance(e, WhamError) else None


def read_prompt(prompt: str | None, what: str = "prompt") -> str:
    """The argument, or stdin when it is ``-`` or missing and stdin is not a terminal."""
    if prompt is not None and prompt != "-":
        text = prompt
    elif not sys.stdin.isatty():
        if prompt is None:
            err.print("Reading prompt from stdin...", markup=False)
        text = sys.stdin.read()
    else:
        die(f"give the {what} as an argument or pipe it on stdin", USAGE)
    if not text.strip():
        die(f"the {what} is empty", USAGE)
    return text
