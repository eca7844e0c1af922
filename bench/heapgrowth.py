"""``python -m bench.heapgrowth RAW --from N``: where a process's native heap grew after a mark.

For ``python -m bench.memory --heaptrack``: the server runs with heaptrack's preload library
(every ``malloc``/``free`` with its native backtrace, ``RAW``) and, at each round's snapshot,
allocates and frees one block of ``MARK + n`` bytes (``bench.memory_serve``): a mark in the
trace. It is killed (no exit-time frees) after the last round's snapshot. This reads the trace
(through heaptrack's own ``heaptrack_interpret``) and sums, per allocation site (backtrace),
the bytes allocated less the bytes freed after round N's mark: what each site added to the
heap since then, Python's allocations included (through ``libpython``'s frames; their Python
callers are tracemalloc's business) and native libraries' (SQLite, OpenSSL, libffi, the
dynamic loader, extension modules) which tracemalloc does not see.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

MARK = 3 << 20  # a mapping of its own: no effect on the heap's layout
INTERPRET = "/usr/lib/heaptrack/libexec/heaptrack_interpret"
PRELOAD = "/usr/lib/heaptrack/libheaptrack_preload.so"
PROBE = "_PyErr_CheckSignalsTstate"  # the snapshot runs in a signal handler
SKIP = ("libheaptrack", "heaptrack", "malloc", "calloc", "realloc", "PyMem_Raw", "_PyMem_")


class Trace:
    def __init__(self) -> None:
        self.strings = [""]
        self.ips: list[list[str]] = [[]]  # index -> frames "function (module)" (inlined first)
        self.modules = [""]  # index -> the module of the instruction
        self.parents = [(0, 0)]  # trace index -> (ip index, parent trace index)
        self.allocs: list[tuple[int, int]] = []  # allocation info -> (size, trace index)
        self.net: Counter[int] = Counter()  # allocation info -> bytes since the mark
        self.count: Counter[int] = Counter()
        self.pending: Counter[int] = Counter()  # since the last mark
        self.pending_count: Counter[int] = Counter()
        self.marks: list[int] = []  # round numbers seen, in order
        self.rounds: list[int] = []  # net bytes between consecutive marks (after ``start``)

    def ip(self, fields: list[str]) -> list[str]:
        module = Path(self.strings[int(fields[1], 16)]).name
        frames = []
        rest = fields[2:]  # function [file line], then (function file line) per inlined frame
        for i in range(0, len(rest), 3):
            func = self.strings[int(rest[i], 16)] or fields[0]
            if i + 2 < len(rest):
                where = Path(self.strings[int(rest[i + 1], 16)]).name
                frames.append(f"{func} ({where}:{int(rest[i + 2], 16)}, {module})")
            else:
                frames.append(f"{func} ({module})")
        return frames or [f"{fields[0]} ({module})"]

    def read(self, lines: object, start: int) -> None:
        counting = False
        for line in lines:  # type: ignore[attr-defined]
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "+" or kind == "-":
                idx = int(rest, 16)
                size = self.allocs[idx][0]
                if MARK < size < MARK + 10_000:  # a mark (and its free)
                    if kind == "+":
                        self.marks.append(size - MARK)
                        if size - MARK >= start:
                            counting = True
                            # what came after the last mark is the last snapshot's own
                            # work (and cut short by the kill): only whole rounds count
                            if self.marks[-1] > start:
                                self.rounds.append(sum(self.pending.values()))
                            self.net.update(self.pending)
                            self.count.update(self.pending_count)
                            self.pending.clear()
                            self.pending_count.clear()
                    continue
                if counting:
                    sign = 1 if kind == "+" else -1
                    self.pending[idx] += sign * size
                    self.pending_count[idx] += sign
            elif kind == "a":
                size, trace = rest.split()
                self.allocs.append((int(size, 16), int(trace, 16)))
            elif kind == "t":
                ip, parent = rest.split()
                self.parents.append((int(ip, 16), int(parent, 16)))
            elif kind == "i":
                fields = rest.split()
                self.ips.append(self.ip(fields))
                self.modules.append(Path(self.strings[int(fields[1], 16)]).name)
            elif kind == "s":
                self.strings.append(rest.partition(" ")[2])

    def frames(self, trace: int, depth: int) -> list[str]:
        out: list[str] = []
        while trace and len(out) < depth:
            ip, trace = self.parents[trace]
            out += [f for f in self.ips[ip] if not any(s in f for s in SKIP)]
        return out[:depth]

    def module(self, trace: int) -> str:
        """The module of the nearest frame that is not the allocator's."""
        while trace:
            ip, trace = self.parents[trace]
            if any(not any(s in f for s in SKIP) for f in self.ips[ip]):
                return self.modules[ip]
        return "?"

    def probe(self, trace: int) -> bool:
        """Whether ``trace`` runs in a signal handler: ``bench.memory_serve``'s snapshot."""
        while trace:
            ip, trace = self.parents[trace]
            if any(PROBE in f for f in self.ips[ip]):
                return True
        return False

    def report(self, top: int, depth: int, rounds: int) -> None:
        by_trace: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        probe = 0
        for idx, n in self.net.items():
            if self.probe(self.allocs[idx][1]):
                probe += n
                continue
            row = by_trace[self.allocs[idx][1]]
            row[0] += n
            row[1] += self.count[idx]
        by_module: dict[str, int] = defaultdict(int)
        for trace, (n, _) in by_trace.items():
            by_module[self.module(trace)] += n
        total = sum(n for n, _ in by_trace.values()) + probe
        print(
            f"heaptrack: net heap growth from mark {rounds} to the last: {total / 1024:+.1f} KB "
            f"(marks seen: {' '.join(map(str, self.marks))}); by the allocating module:"
        )
        steps = " ".join(f"{n / 1024:+.1f}" for n in self.rounds)
        print(f"  mark to mark (KB, the snapshots' own work included): {steps}")
        print(f"  of it in the snapshots (signal handler): {probe / 1024:+.1f} KB; the rest:")
        for module, n in sorted(by_module.items(), key=lambda x: -abs(x[1]))[:top]:
            print(f"  {n / 1024:+9.1f} KB  {module}")
        print(f"the {top} sites that grew most:")
        for trace, (n, count) in sorted(by_trace.items(), key=lambda x: -x[1][0])[:top]:
            print(f"  {n / 1024:+9.1f} KB in {count:+d} blocks")
            for frame in self.frames(trace, depth):
                print(f"      {frame}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.heapgrowth", description=__doc__)
    ap.add_argument("raw", type=Path, help="heaptrack's raw output (DUMP_HEAPTRACK_OUTPUT)")
    ap.add_argument("--from", dest="start", type=int, default=2, help="count after this mark")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--depth", type=int, default=12)
    args = ap.parse_args(argv)
    trace = Trace()
    with (
        open(args.raw) as raw,
        subprocess.Popen(
            [INTERPRET],
            stdin=raw,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            errors="replace",
        ) as proc,
    ):
        assert proc.stdout is not None
        trace.read(proc.stdout, args.start)
    trace.report(args.top, args.depth, args.start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
