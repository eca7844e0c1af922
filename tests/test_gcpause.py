"""``wham serve`` moves what start-up made out of the collector's way (server/gcpause.py).

Run in a child process: freezing the test process's own heap would keep every later test's
garbage cycles that reference it alive."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import gc, sys
from openwham.config import Settings
from openwham.server.app import create_app
from openwham.server.gcpause import freeze_startup

create_app(Settings(data_dir=sys.argv[1], executor="none"))
before = len(gc.get_objects())
frozen = freeze_startup()
after = len(gc.get_objects())
print(before, frozen, after)
"""


def test_a_full_collection_after_start_up_walks_almost_nothing(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "data")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.split()
    before, frozen, after = (int(x) for x in out)
    assert before > 50_000  # the app's routes, validators, mappers: what full collections walked
    assert frozen >= before * 0.9
    assert after < before // 20
