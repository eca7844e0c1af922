"""openwham: an open, self-hostable Codex cloud."""

from __future__ import annotations

from functools import cache


@cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        # One source of truth: the version in pyproject.toml, as installed.
        return version("openwham")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> str:
    """``__version__`` on first use: importlib.metadata is ~35 ms of every ``wham`` start."""
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'openwham' has no attribute {name!r}")
