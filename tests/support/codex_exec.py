"""Run the pinned Codex CLI directly (no sandbox) against a Responses endpoint, for tests."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openwham.runtimes.codex_cli import native_binary


@dataclass
class CodexRun:
    events: list[dict[str, Any]]
    stdout: str
    stderr: str


def run_codex_exec(
    home: Path, workdir: Path, *, base_url: str, slug: str, key: str, prompt: str
) -> CodexRun:
    """``codex exec --json`` with a custom provider at ``base_url``; it must exit 0."""
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{slug}"\nmodel_provider = "scripted"\n\n'
        "[model_providers.scripted]\n"
        f'name = "scripted"\nbase_url = "{base_url}"\nwire_api = "responses"\n'
        'env_key = "SCRIPTED_KEY"\n'
    )
    proc = subprocess.run(
        [
            str(native_binary()),
            "exec",
            "--json",
            "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox",
            "-C",
            str(workdir),
            prompt,
        ],
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "CODEX_HOME": str(home),
            "SCRIPTED_KEY": key,
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return CodexRun(events, proc.stdout, proc.stderr)
