"""The engine reads the files an agent wrote (its diff, its Codex home) with a cap, without
allocating the cap first (engine/files.py; issue 20: a 20 MiB block per diff read, 64 MiB per
file of a Codex home, left ~20 MiB free in the server's heap after each round of tasks)."""

from __future__ import annotations

import io
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from openwham.engine import artifacts as packing
from openwham.engine import files
from openwham.engine.diff import read_result
from openwham.engine.files import read_capped


def _peak(call: Callable[[], Any]) -> int:
    """The most Python held at once (bytes) while ``call`` ran."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_reading_a_small_diff_does_not_allocate_the_cap(tmp_path: Path) -> None:
    (tmp_path / "diff").write_text("diff --git a/x b/x\n" * 100)
    (tmp_path / "status").write_text("0\n")
    assert _peak(lambda: read_result(tmp_path)) < 1 << 20  # was 20 MiB
    (tmp_path / "diff").write_text("")  # no change: the block was freed whole
    assert _peak(lambda: read_result(tmp_path)) < 1 << 20


def test_packing_a_codex_home_does_not_allocate_the_cap_per_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "sessions").mkdir(parents=True)
    for n in range(5):
        (home / "sessions" / f"rollout-{n}.jsonl").write_bytes(b'{"x": 1}\n' * 1000)
    (home / "config.toml").write_text("")
    assert _peak(lambda: packing.pack(home, 64 << 20)) < 2 << 20  # was 64 MiB


def test_read_capped_reads_up_to_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    with path.open("rb") as f:
        assert read_capped(f, 2 << 20) == data[: 2 << 20]
    with path.open("rb") as f:
        assert read_capped(f, 4 << 20) == data
    with path.open("rb") as f:
        assert read_capped(f, 0) == b""
    with path.open("rb") as f:
        f.read(10)
        assert read_capped(f, 5) == data[10:15]
        assert read_capped(f, 8 << 20) == data[15:]


def test_a_file_that_grew_since_it_was_looked_at_is_read_on_to_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    data = os.urandom((2 << 20) + 7)
    path.write_bytes(data)
    real = os.fstat

    class Shrunk:
        def __init__(self, st: os.stat_result) -> None:
            self.st_size, self.st_mode = 10, st.st_mode

    monkeypatch.setattr(files.os, "fstat", lambda fd: Shrunk(real(fd)))
    with path.open("rb") as f:
        assert read_capped(f, 8 << 20) == data
    with path.open("rb") as f:
        assert read_capped(f, (1 << 20) + 3) == data[: (1 << 20) + 3]
    assert read_capped(io.BufferedReader(io.FileIO(path)), 11) == data[:11]
