"""openwham: an open, self-hostable Codex cloud."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One source of truth: the version in pyproject.toml, as installed.
    __version__ = version("openwham")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
