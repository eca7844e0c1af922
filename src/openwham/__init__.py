"""openwham: an open, self-hostable Codex cloud."""

__version__ = "0.1.0"
