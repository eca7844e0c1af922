"""The host side of the diff: what the in-sandbox script left is read without trusting it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from openwham.engine.diff import MAX_DIFF_BYTES, DiffError, read_result, script


def test_a_finished_script_gives_its_diff(tmp_path: Path) -> None:
    (tmp_path / "diff").write_text("diff --git a/x b/x\n")
    (tmp_path / "status").write_text("0\n")
    assert read_result(tmp_path).text == "diff --git a/x b/x\n"


def test_links_fifos_failures_and_oversize_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("HOST SECRET")
    out = tmp_path / "out"
    out.mkdir()
    (out / "status").write_text("0\n")
    (out / "diff").symlink_to(secret)
    with pytest.raises(DiffError) as err:
        read_result(out)
    assert "HOST SECRET" not in str(err.value)

    (out / "diff").unlink()
    os.mkfifo(out / "diff")  # must not block the server
    with pytest.raises(DiffError):
        read_result(out)

    (out / "diff").unlink()
    (out / "diff").write_text("partial")
    (out / "status").write_text("128\n")
    (out / "error").write_text("fatal: bad object\n")
    with pytest.raises(DiffError, match="bad object"):
        read_result(out)

    (out / "diff").write_bytes(b"x" * (MAX_DIFF_BYTES + 1))
    (out / "status").write_text("141\n")
    with pytest.raises(DiffError, match="larger than 20 MiB"):
        read_result(out)


def test_the_script_takes_only_a_commit_sha() -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert sha in script(sha)
    for bad in ("HEAD", "main; rm -rf /", "$(id)", "0123"):
        with pytest.raises(ValueError):
            script(bad)
