"""Where the pinned Codex CLI is: the native binary from ``tools/codex`` (npm lockfile).

The npm package's ``bin/codex`` is a Node launcher for a static native binary; the runtime
runs that binary directly, so the sandbox needs no Node.js.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

_TRIPLES = {
    ("Linux", "x86_64"): ("linux-x64", "x86_64-unknown-linux-musl"),
    ("Linux", "aarch64"): ("linux-arm64", "aarch64-unknown-linux-musl"),
}


def tools_dir() -> Path:
    """``tools/codex`` of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[3] / "tools" / "codex"


def pinned_version(directory: Path | None = None) -> str:
    """The version the committed lockfile pins."""
    lock = json.loads(((directory or tools_dir()) / "package-lock.json").read_text())
    return str(lock["packages"]["node_modules/@openai/codex"]["version"])


class CodexNotInstalled(RuntimeError):
    pass


def native_binary(directory: Path | None = None) -> Path:
    """The native ``codex`` binary: ``WHAM_CODEX_BIN`` if set, else the pinned install."""
    override = os.environ.get("WHAM_CODEX_BIN")
    if override:
        return Path(override)
    key = (platform.system(), platform.machine())
    if key not in _TRIPLES:
        raise CodexNotInstalled(f"no Codex CLI build for {key[0]} {key[1]}")
    package, triple = _TRIPLES[key]
    root = (directory or tools_dir()) / "node_modules" / "@openai" / f"codex-{package}"
    path = root / "vendor" / triple / "bin" / "codex"
    if not path.is_file():
        raise CodexNotInstalled(
            f"the pinned Codex CLI is not installed at {path}: run scripts/setup.sh"
        )
    return path
