"""Helpers shared by commands: settings with CLI overrides, one-line errors.

Every ``wham`` start imports the command modules to parse its arguments, so they import at
module level only what parsing needs (typer, the standard library): the SDK, the wire models,
settings and the server's packages are imported inside the commands that use them
(tests/test_cli_imports.py holds that line, docs/benchmarks.md "CLI start-up" says why).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

if TYPE_CHECKING:
    from openwham.config import Settings


def settings_for(data_dir: Path | None) -> Settings:
    """``--data-dir`` wins over ``WHAM_DATA_DIR``, which wins over the default."""
    from openwham.config import Settings

    return Settings(data_dir=data_dir) if data_dir is not None else Settings()


def fail(message: str, code: int = 1, hint: str | None = None) -> NoReturn:
    """One line on stderr (and the fix, when there is one); never a traceback."""
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


DataDirOption = typer.Option(
    None, "--data-dir", help="Data directory (default: $WHAM_DATA_DIR or ~/.local/share/openwham)"
)
