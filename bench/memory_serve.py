"""``python -m bench.memory_serve serve …``: ``wham serve`` that dumps tracemalloc snapshots.

Only used by ``python -m bench.memory --tracemalloc``: with ``BENCH_SNAPSHOTS`` set, tracing
starts before openwham is imported and each ``SIGUSR1`` writes ``snap-<n>.pickle`` there
(after a ``gc.collect()``), so the bench can diff what the server holds between rounds.
"""

from __future__ import annotations

import gc
import os
import signal
import tracemalloc
from pathlib import Path
from types import FrameType

_dir = os.environ.get("BENCH_SNAPSHOTS", "")
_count = 0


def _dump(signum: int, frame: FrameType | None) -> None:
    global _count
    gc.collect()
    _count += 1
    tracemalloc.take_snapshot().dump(str(Path(_dir) / f"snap-{_count}.pickle"))
    (Path(_dir) / f"snap-{_count}.done").touch()


def main() -> None:
    if _dir:
        tracemalloc.start(12)
        signal.signal(signal.SIGUSR1, _dump)
    from openwham.cli.main import main as wham_main

    wham_main()


if __name__ == "__main__":
    main()
