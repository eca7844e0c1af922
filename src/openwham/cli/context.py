"""What every client command shares: the chosen profile, a client for it, one-line errors and
the documented exit codes."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console

from openwham.client import (
    AuthError,
    Conflict,
    NotFound,
    NotLoggedIn,
    RateLimited,
    WhamClient,
    WhamError,
)
from openwham.client.profiles import Profile, ProfileStore, client_kwargs

from .common import fail

# Exit codes (README, "Exit codes").
OK = 0
FAILED = 1  # an error, a failed/cancelled task, a partial or failed apply
USAGE = 2  # bad arguments
PENDING = 3  # the task is still running (not ready yet)
AUTH = 4  # not logged in, or credentials refused

P = ParamSpec("P")
R = TypeVar("R")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def profile_name(ctx: typer.Context) -> str | None:
    root = ctx.find_root()
    obj = root.obj if isinstance(root.obj, dict) else {}
    name = obj.get("profile")
    return name if isinstance(name, str) else None


def selected_profile(ctx: typer.Context) -> Profile:
    return ProfileStore().select(profile_name(ctx))


def open_client(ctx: typer.Context) -> WhamClient:
    """A client for the chosen profile. With no profile at all and no chatgpt.com sign-in,
    ``NotLoggedIn`` whose hint names both ways in (an openwham server, chatgpt.com)."""
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
    if profile_name(ctx) or os.environ.get("WHAM_PROFILE") or os.environ.get("WHAM_URL"):
        return True
    return ProfileStore().default_name() is not None


die = fail  # one way to end a command with an error line (cli.common)


def _code_for(e: WhamError) -> int:
    if isinstance(e, AuthError):
        return AUTH
    if isinstance(e, Conflict) and "still running" in str(e):
        return PENDING
    return FAILED


def _hint_for(e: WhamError) -> str | None:
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
        except WhamError as e:
            die(str(e), _code_for(e), _hint_for(e))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


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
