"""``python -m bench.disk``: what the disk budget's monitor costs on a 5,000-file checkout.

Times, each ``--runs`` times (min / median / max):

- ``walk``: one measure of the checkout (``disk.Meter.measure``: every entry's ``lstat``),
  the cost of the budget's first measure at attempt start and of every later measure;
- ``signals``: the cheap signs of growth read twice a second between measures
  (``disk.signals``: ``/proc/PID/io`` of a sandbox's processes, ``fstatvfs``);
- ``freeze+thaw``: freezing a running sandbox's cgroup and thawing it again, which every
  measure of a running sandbox adds (only where the host has a cgroup freezer);
- ``sandbox``: ``sleep 3`` in a sandbox with and without a budget on the checkout, and how
  many measures the monitor made (a quiet sandbox: one, at its end).

Ratios are to the walk's median. Prints the load average: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from openwham.sandbox import bwrap, disk
from openwham.sandbox.bwrap import Limits, SandboxSpec

from .repo import describe, generate


def _times(fn: Callable[[], object], runs: int) -> list[float]:
    out: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _row(name: str, ms: list[float], base: float | None) -> str:
    med = statistics.median(ms)
    ratio = f"  = {med / base:.3f} of a walk" if base else ""
    return f"{name:<14} min {min(ms):8.2f}  median {med:8.2f}  max {max(ms):8.2f} ms{ratio}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.disk", description=__doc__)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="wham-bench-disk-", dir=args.workdir))
    try:
        repo = generate(work / "repo", files=args.files)
        print(f"checkout: {describe(repo)}; load average {os.getloadavg()[0]:.2f}")
        with disk.Meter([repo]) as meter:
            usage = meter.measure()
            print(f"measured: {usage.entries} entries, {usage.bytes / 2**20:.1f} MB charged")
            walk = _times(meter.measure, args.runs)
            base = statistics.median(walk)
            print(_row("walk", walk, None))
            pids = [os.getpid()] * 10  # a sandbox has a handful of processes
            print(_row("signals", _times(lambda: disk.signals(meter.fd, pids), args.runs), base))

        limits = Limits(wall_clock_seconds=60)
        proc = bwrap.start(SandboxSpec(workspace=repo, limits=limits), ["sleep", "60"])
        group = proc.cgroup
        if group is not None and group.freeze():
            group.thaw()

            def freeze_thaw() -> None:
                group.freeze()
                group.thaw()

            print(_row("freeze+thaw", _times(freeze_thaw, args.runs), base))
        else:
            print("freeze+thaw    (no cgroup freezer on this host: measures run unfrozen)")
        proc.kill()

        counted: list[int] = []
        real = disk.Meter.measure

        def counting(self: disk.Meter, *a: object, **kw: object) -> disk.Usage:
            counted.append(1)
            return real(self, *a, **kw)  # type: ignore[arg-type]

        for label, budget in (("sandbox", None), ("sandbox+budget", 10 << 30)):
            spec = SandboxSpec(
                workspace=repo,
                limits=limits,
                disk=disk.DiskBudget(paths=(repo,), max_bytes=budget) if budget else None,
            )
            disk.Meter.measure = counting  # type: ignore[method-assign]
            try:
                ms = _times(lambda spec=spec: bwrap.run(spec, ["sleep", "3"]), 3)  # type: ignore[misc]
            finally:
                disk.Meter.measure = real  # type: ignore[method-assign]
            print(_row(label, ms, None) + f"  ({len(counted) / 3:.0f} measures a run)")
            counted.clear()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
