"""What scripts/setup.sh installs is there and works: the pinned Codex CLI and bubblewrap."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from openwham.runtimes.codex_cli import native_binary, pinned_version


@pytest.mark.sandbox
def test_pinned_codex_cli_is_installed_and_runs() -> None:
    out = subprocess.run(
        [str(native_binary()), "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"codex-cli {pinned_version()}"
    assert pinned_version() >= "0.169.0"


@pytest.mark.sandbox
def test_bubblewrap_isolates_a_command() -> None:
    bwrap = shutil.which("bwrap")
    assert bwrap, "bubblewrap missing: scripts/setup.sh installs it"
    out = subprocess.run(
        [
            bwrap,
            "--ro-bind",
            "/",
            "/",
            "--unshare-all",
            "--uid",
            "65534",
            "--die-with-parent",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "sh",
            "-c",
            "id -u; cat /proc/self/status | grep CapEff; tail -n +3 /proc/net/dev | cut -d: -f1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    uid, caps, nets = out.stdout.split("\n", 2)
    assert uid == "65534"
    assert caps.split()[-1] == "0000000000000000"  # no capabilities
    assert nets.split() == ["lo"]  # own network namespace: loopback only
