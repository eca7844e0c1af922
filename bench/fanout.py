"""``python -m bench.fanout`` (or ``./bench/fanout``): one turn's stream fanned out to many
clients while the API is probed.

Against a real ``wham serve`` (the scripted model, a small local repository), for each
subscriber count (default 1, 100, 500, 1,000):

1. ``POST tasks`` with a script of ``--steps`` shell commands; the model holds the agent's
   first request until every client is connected;
2. a client process opens N streams of that turn (raw asyncio sockets, a few at a time,
   retrying a ``503`` after its ``Retry-After``; a stream that ends before the terminal event
   reconnects with ``Last-Event-ID``, as the SDK and browsers do) and records, for every
   event, when it arrived (``time.time()``) against the event's own ``timestamp`` (the
   server's ``time.time()`` when the recorder wrote it; same host, same clock);
3. a probe process asks ``GET tasks/{id}`` (task details) every ``--probe-interval``
   seconds, one request at a time, for as long as the streams run;
4. the model lets the agent go; the turn runs to its end.

Prints, per N: events per stream, whether every stream got every event once and in order,
reconnects, event latency (arrival - timestamp, every event of every stream written after
the release) and probe latency, each as min / p50 / p90 / p99 / max, against issue 20's
targets (event p99 <= 100 ms, other requests p99 <= 50 ms). Loopback only; each N bounded by
``--timeout``. See bench/README.md ("Fan-out").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from . import harness as h

TARGET_EVENT_P99_MS = 100.0
TARGET_PROBE_P99_MS = 50.0
TERMINAL = re.compile(
    rb'"item_type":"task_turn_event".*"turn_status":"(completed|failed|cancelled)"'
)
STAMP = re.compile(rb'"timestamp":([0-9.e+-]+)')


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return " / ".join(
        f"{v * 1000:.1f}"
        for v in (min(values), pct(values, 50), pct(values, 90), pct(values, 99), max(values))
    )


# --------------------------------------------------------------------------- stream clients


class Stream:
    """One SSE client on a raw socket: HTTP/1.1, chunked body read line by line (a chunk-size
    line never falls inside a frame: the server sends whole frames per chunk)."""

    def __init__(self, host: str, port: int, path: str, token: str) -> None:
        self.host, self.port, self.path, self.token = host, port, path, token
        self.ids: list[int] = []
        self.latencies: list[float] = []
        self.stamps: list[float] = []
        self.reconnects = 0
        self.refused = 0
        self.done = False

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect until the server answers 200 (503: wait its Retry-After, then again)."""
        while True:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            last = f"Last-Event-ID: {self.ids[-1]}\r\n" if self.ids else ""
            writer.write(
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Authorization: Bearer {self.token}\r\nAccept: text/event-stream\r\n"
                f"{last}\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status == 200:
                return reader, writer
            writer.close()
            if status != 503:
                raise RuntimeError(f"stream answered {status}: {head[:200]!r}")
            self.refused += 1
            match = re.search(rb"(?i)retry-after: *(\d+)", head)
            await asyncio.sleep(float(match.group(1)) if match else 1.0)

    async def follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not self.done:
            try:
                await self._read(reader)
            finally:
                writer.close()
            if not self.done:
                self.reconnects += 1
                reader, writer = await self.connect()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        pending = b""
        while True:
            data = await reader.read(1 << 16)
            if not data:
                return
            now = time.time()
            pending += data
            lines = pending.split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line.startswith(b"id: "):
                    self.ids.append(int(line[4:]))
                elif line.startswith(b"data: "):
                    found = STAMP.search(line, 0, 200)
                    if found:
                        stamp = float(found.group(1))
                        self.stamps.append(stamp)
                        self.latencies.append(now - stamp)
                    if TERMINAL.search(line):
                        self.done = True
                        return


async def run_clients(args: argparse.Namespace) -> dict[str, Any]:
    host, port = args.url.removeprefix("http://").rsplit(":", 1)
    path = f"{h.PREFIX}/tasks/{args.task}/turns/{args.turn}/stream"
    streams = [Stream(host, int(port), path, args.token) for _ in range(args.n)]
    gate = asyncio.Semaphore(32)  # connect a few at a time, as clients arrive

    async def connect(s: Stream) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with gate:
            return await s.connect()

    conns = await asyncio.gather(*(connect(s) for s in streams))
    Path(args.ready).write_text("ready")
    cpu = time.process_time()
    followers = [
        asyncio.ensure_future(s.follow(r, w)) for s, (r, w) in zip(streams, conns, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*followers), args.timeout)
    return {
        "client_cpu_s": time.process_time() - cpu,
        "ids": [s.ids for s in streams],
        "stamps": [s.stamps for s in streams],
        "latencies": [s.latencies for s in streams],
        "reconnects": sum(s.reconnects for s in streams),
        "refused": sum(s.refused for s in streams),
    }


class RawStreams:
    """N SSE clients in one process for little CPU (``--client epoll``, the default): plain
    non-blocking sockets on one ``epoll``; a wake-up costs one ``recvmsg`` and one append of
    the bytes with two times, and the bytes are parsed only after the run. Each chunk's
    times are when the client read it (``time.time()``) and when the kernel queued it on the
    socket (``SO_TIMESTAMPNS``, the last segment the read returned): the second does not
    include the client's own waiting for a core, so it is what the server delivered.

    A stream the server ends before the terminal event reconnects with ``Last-Event-ID``
    (parsed then: it is rare)."""

    TIMESTAMP_SIZE = struct.calcsize("@ll")
    # Linux's value (asm-generic/socket.h, SO_TIMESTAMPNS_OLD), absent from Python < 3.13
    SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)

    def __init__(self, host: str, port: int, path: str, token: str, n: int) -> None:
        self.host, self.port, self.path, self.token, self.n = host, port, path, token, n
        self.chunks: list[list[tuple[float, float, bytes]]] = [[] for _ in range(n)]
        self.reconnects = 0
        self.refused = 0

    def _request(self, stream: int) -> socket.socket:
        """A connected socket whose answer was 200 (503: wait its Retry-After, then again);
        the bytes after the head are the stream's first chunk."""
        while True:
            sock = socket.create_connection((self.host, self.port))
            sock.setsockopt(socket.SOL_SOCKET, self.SO_TIMESTAMPNS, 1)
            ids = parse_stream(self.chunks[stream])[0]
            last = f"Last-Event-ID: {ids[-1]}\r\n" if ids else ""
            sock.sendall(
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Authorization: Bearer {self.token}\r\nAccept: text/event-stream\r\n"
                f"{last}\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(1 << 16)
                if not data:
                    raise RuntimeError(f"stream closed before its head: {head[:200]!r}")
                head += data
            head, rest = head.split(b"\r\n\r\n", 1)
            status = int(head.split(b" ", 2)[1])
            if status == 200:
                if rest:
                    now = time.time()
                    self.chunks[stream].append((now, now, rest))
                sock.setblocking(False)
                return sock
            sock.close()
            if status != 503:
                raise RuntimeError(f"stream answered {status}: {head[:200]!r}")
            self.refused += 1
            match = re.search(rb"(?i)retry-after: *(\d+)", head)
            time.sleep(float(match.group(1)) if match else 1.0)

    def connect(self) -> None:
        self.socks: dict[int, tuple[int, socket.socket]] = {}
        for i in range(self.n):
            sock = self._request(i)
            self.socks[sock.fileno()] = (i, sock)

    def follow(self, timeout: float) -> None:
        ep = select.epoll()
        for fd in self.socks:
            ep.register(fd, select.EPOLLIN)
        space = socket.CMSG_SPACE(self.TIMESTAMP_SIZE)
        deadline = time.monotonic() + timeout
        chunks = self.chunks
        while self.socks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.socks)} stream(s) still open after {timeout} s")
            for fd, _ in ep.poll(1.0):
                stream, sock = self.socks[fd]
                try:
                    data, ancillary, _, _ = sock.recvmsg(1 << 16, space)
                except BlockingIOError:
                    continue
                now = time.time()
                if data:
                    kernel = now
                    for level, kind, value in ancillary:
                        if level == socket.SOL_SOCKET and kind == self.SO_TIMESTAMPNS:
                            sec, nsec = struct.unpack("@ll", value[: self.TIMESTAMP_SIZE])
                            kernel = sec + nsec / 1e9
                    chunks[stream].append((now, kernel, data))
                    if not data.endswith(b"0\r\n\r\n"):  # not the body's last chunk
                        continue
                ep.unregister(fd)
                del self.socks[fd]
                sock.close()
                if not parse_stream(chunks[stream])[3]:  # ended before the end: again
                    self.reconnects += 1
                    again = self._request(stream)
                    self.socks[again.fileno()] = (stream, again)
                    ep.register(again.fileno(), select.EPOLLIN)
        ep.close()

    def result(self) -> dict[str, Any]:
        parsed = [parse_stream(c) for c in self.chunks]
        return {
            "ids": [p[0] for p in parsed],
            "stamps": [p[1] for p in parsed],
            "latencies": [p[2] for p in parsed],
            "kernel_latencies": [p[4] for p in parsed],
            "reconnects": self.reconnects,
            "refused": self.refused,
        }


def parse_stream(
    chunks: list[tuple[float, float, bytes]],
) -> tuple[list[int], list[float], list[float], bool, list[float]]:
    """A stream's event ids, their timestamps, their latencies (read by the client) and
    whether the terminal event came, and the latencies by the kernel's time, from its
    chunks. A line's time is that of the chunk that completed it; a chunk-size line of the
    chunked encoding is neither an ``id:`` nor a ``data:`` line."""
    ids: list[int] = []
    stamps: list[float] = []
    latencies: list[float] = []
    kernel: list[float] = []
    pending = b""
    for now, at, data in chunks:
        pending += data
        lines = pending.split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line.startswith(b"id: "):
                ids.append(int(line[4:]))
            elif line.startswith(b"data: "):
                found = STAMP.search(line, 0, 200)
                if found:
                    stamp = float(found.group(1))
                    stamps.append(stamp)
                    latencies.append(now - stamp)
                    kernel.append(at - stamp)
                if TERMINAL.search(line):
                    return ids, stamps, latencies, True, kernel
    return ids, stamps, latencies, False, kernel


def run_raw_clients(args: argparse.Namespace) -> dict[str, Any]:
    host, port = args.url.removeprefix("http://").rsplit(":", 1)
    path = f"{h.PREFIX}/tasks/{args.task}/turns/{args.turn}/stream"
    streams = RawStreams(host, int(port), path, args.token, args.n)
    streams.connect()
    Path(args.ready).write_text("ready")
    cpu = time.process_time()
    streams.follow(args.timeout)
    cpu = time.process_time() - cpu
    return {**streams.result(), "client_cpu_s": cpu}


# --------------------------------------------------------------------------- probe


def run_probe(args: argparse.Namespace) -> list[float]:
    import httpx

    out: list[float] = []
    stop = Path(args.stop)
    url = f"{args.url}{h.PREFIX}/tasks/{args.task}"
    with httpx.Client(headers={"Authorization": f"Bearer {args.token}"}, timeout=30) as client:
        client.get(url).raise_for_status()  # connected (not counted)
        Path(args.ready).write_text("ready")
        while not stop.exists():
            t0 = time.perf_counter()
            r = client.get(url)
            out.append(time.perf_counter() - t0)
            if r.status_code != 200:
                out[-1] = float("inf")
            time.sleep(args.interval)
    return out


# --------------------------------------------------------------------------- orchestration


def _small_repo(dest: Path) -> Path:
    from .repo import git

    dest.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=dest)
    (dest / "README.md").write_text("# fan-out benchmark\n")
    git("add", "-A", cwd=dest)
    git("commit", "-q", "-m", "init", cwd=dest)
    return dest


class Gate:
    """Holds the agent's first model request of the current run until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.arrived = threading.Event()

    def on_request(self, body: dict[str, Any]) -> None:
        if "fanout-run" in json.dumps(body.get("input") or []):
            self.arrived.set()
            self.release.wait(120)


def one(
    server: h.WhamServer,
    model: Any,
    env_id: str,
    gate: Gate,
    n: int,
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    from support.scripted_model import Say, Shell

    gate.release.clear()
    gate.arrived.clear()
    model.script = [Shell(f"echo step {i}") for i in range(args.steps)] + [Say("Done.")]
    task_id, turn_id = server.create_task(env_id, f"fanout-run {n}: echo a few steps")
    stop, probing = work / f"stop-{n}", work / f"probing-{n}"
    common = ["--url", server.url, "--token", server.token, "--task", task_id]
    procs = max(1, min(args.client_processes, n))
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    readies = [work / f"ready-{n}-{i}" for i in range(procs)]
    outs = [work / f"clients-{n}-{i}.json" for i in range(procs)]
    clients = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.fanout", "clients", *common, "--turn", turn_id),
                *("--n", str(share), "--ready", str(ready), "--out", str(out)),
                *("--timeout", str(args.timeout), "--client", args.client),
            ],
            cwd=h.ROOT,
        )
        for share, ready, out in zip(shares, readies, outs, strict=True)
    ]
    deadline = time.monotonic() + args.timeout
    while not all(ready.exists() for ready in readies):
        failed = [c.poll() for c in clients if c.poll() is not None]
        if failed or time.monotonic() > deadline:
            raise RuntimeError(f"the clients did not connect (exit {failed})")
        time.sleep(0.05)
    probe = subprocess.Popen(
        [
            *(sys.executable, "-m", "bench.fanout", "probe", *common),
            *("--stop", str(stop), "--interval", str(args.probe_interval)),
            *("--ready", str(probing)),
        ],
        cwd=h.ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    while not probing.exists():
        if probe.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the probe did not start (exit {probe.poll()})")
        time.sleep(0.05)
    time.sleep(0.5)  # the probe's first requests see the connected, idle streams
    gate.arrived.wait(60)
    released = time.time()
    cpu0, machine0 = process_cpu(server.process.pid), machine_cpu()
    gate.release.set()
    try:
        for c in clients:
            c.wait(max(1.0, deadline - time.monotonic()))
        cpu1, machine1 = process_cpu(server.process.pid), machine_cpu()
    finally:
        stop.write_text("stop")
        probe_out, _ = probe.communicate(timeout=60)
        for c in clients:
            if c.poll() is None:
                c.kill()
    if any(c.returncode != 0 for c in clients):
        raise RuntimeError(f"the clients failed (exit {[c.returncode for c in clients]})")
    result: dict[str, Any] = {}
    for out in outs:
        part = json.loads(out.read_text())
        for key, value in part.items():
            result[key] = result.get(key, [] if isinstance(value, list) else 0) + value
    result["probe"] = json.loads(probe_out)
    result["released"] = released
    window = time.time() - released
    result["cpu"] = {
        "window_s": window,
        "server_s": cpu1 - cpu0,
        "machine_busy_cores": (machine1[0] - machine0[0]) / window,
    }
    return result


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """CPU seconds every core spent busy and idle so far (``/proc/stat``)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values[:8]) - idle) / tick, idle / tick


def report(n: int, r: dict[str, Any]) -> dict[str, Any]:
    ids: list[list[int]] = r["ids"]
    first = ids[0]
    same = all(i == first for i in ids)
    ordered = all(a < b for a, b in pairwise(first))
    lat = [
        x
        for stamps, lats in zip(r["stamps"], r["latencies"], strict=True)
        for s, x in zip(stamps, lats, strict=True)
        if s >= r["released"]
    ]
    kernel = [
        x
        for stamps, lats in zip(r["stamps"], r.get("kernel_latencies", []), strict=False)
        for s, x in zip(stamps, lats, strict=True)
        if s >= r["released"]
    ]
    probe = r["probe"]
    ev99 = pct(lat, 99) * 1000 if lat else math.inf
    pr99 = pct(probe, 99) * 1000 if probe else math.inf
    print(f"\n{n} subscriber(s): {len(first)} events per stream; every stream got every event")
    print(f"  once and in order: {'yes' if same and ordered else 'NO'}; reconnects (dropped):")
    print(f"  {r['reconnects']}; 503 on connect: {r['refused']}")
    print(
        f"  event latency, ms (min / p50 / p90 / p99 / max, {len(lat)} deliveries): {spread(lat)}"
    )
    if kernel:
        print(f"  the same by the kernel's arrival time (SO_TIMESTAMPNS), ms: {spread(kernel)}")
    print(f"  task details meanwhile, ms ({len(probe)} requests): {spread(probe)}")
    print(
        f"  event p99 / target: {ev99:.1f} / {TARGET_EVENT_P99_MS:.0f} ms = "
        f"{ev99 / TARGET_EVENT_P99_MS:.2f}; details p99 / target: {pr99:.1f} / "
        f"{TARGET_PROBE_P99_MS:.0f} ms = {pr99 / TARGET_PROBE_P99_MS:.2f}"
    )
    cpu = r["cpu"]
    cpu["clients_s"] = r.get("client_cpu_s")
    print(
        f"  from release to the last event ({cpu['window_s']:.1f} s): the server used "
        f"{cpu['server_s']:.1f} s of CPU ({cpu['server_s'] / cpu['window_s']:.2f} cores); "
        f"the machine's {os.cpu_count()} cores were busy {cpu['machine_busy_cores']:.2f} on average"
    )
    if cpu["clients_s"] is not None:
        print(
            f"  the stream clients used {cpu['clients_s']:.1f} s of CPU following the streams "
            f"({cpu['clients_s'] / cpu['window_s']:.2f} cores over that time)"
        )
    return {
        "cpu": cpu,
        "subscribers": n,
        "events": len(first),
        "complete": same and ordered,
        "reconnects": r["reconnects"],
        "event_ms": {"p50": pct(lat, 50) * 1000, "p99": ev99} if lat else None,
        "event_kernel_ms": (
            {"p50": pct(kernel, 50) * 1000, "p99": pct(kernel, 99) * 1000} if kernel else None
        ),
        "details_ms": {"p50": pct(probe, 50) * 1000, "p99": pr99} if probe else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench.fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--subscribers", default="1,100,500,1000", help="comma-separated counts")
    p.add_argument("--steps", type=int, default=40, help="shell commands in the task's script")
    p.add_argument("--probe-interval", type=float, default=0.02)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per count, at most")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    p.add_argument("--server-module", default=None, help="run `python -m M serve` instead of wham")
    p.add_argument(
        "--client",
        choices=("epoll", "asyncio"),
        default="epoll",
        help="the streams' client: raw sockets on epoll, parsed after the run (cheap), or "
        "asyncio streams parsing as they read (the client before 2026-12-05 night)",
    )
    p.add_argument("--client-processes", type=int, default=1, help="processes sharing the streams")
    sub = p.add_subparsers(dest="role")
    for role in ("clients", "probe"):
        q = sub.add_parser(role)
        for name in ("--url", "--token", "--task"):
            q.add_argument(name, required=True)
        if role == "clients":
            q.add_argument("--turn", required=True)
            q.add_argument("--n", type=int, required=True)
            q.add_argument("--ready", required=True)
            q.add_argument("--out", required=True)
            q.add_argument("--timeout", type=float, default=180.0)
            q.add_argument("--client", choices=("epoll", "asyncio"), default="epoll")
        else:
            q.add_argument("--stop", required=True)
            q.add_argument("--ready", required=True)
            q.add_argument("--interval", type=float, default=0.02)
    args = p.parse_args(argv)
    if args.role == "clients" and args.client == "epoll":
        Path(args.out).write_text(json.dumps(run_raw_clients(args)))
        return 0
    if args.role == "clients":
        try:  # uvicorn's event loop, when installed: the clients cost the machine less
            import uvloop

            result = uvloop.run(run_clients(args))
        except ImportError:
            result = asyncio.run(run_clients(args))
        Path(args.out).write_text(json.dumps(result))
        return 0
    if args.role == "probe":
        print(json.dumps(run_probe(args)))
        return 0

    from support.scripted_model import Say

    counts = [int(x) for x in args.subscribers.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="wham-fanout-", dir=args.workdir or "/var/tmp"))
    gate = Gate()
    model, _ = h.start_model()
    model.on_request = gate.on_request
    server = None
    summary = []
    try:
        repo = _small_repo(work / "repo")
        server = h.WhamServer.start(
            work / "data", model.url, log_path=work / "serve.log", module=args.server_module
        )
        env_id = server.create_env(repo)
        model.script = [Say("warm")]
        task_id, turn_id = server.create_task(env_id, "warm up the mirror")
        server.stream(task_id, turn_id)
        print(f"load average {os.getloadavg()[0]:.2f}; {args.steps} steps per task")
        for n in counts:
            log(f"fan-out to {n} subscriber(s)")
            summary.append(report(n, one(server, model, env_id, gate, n, args, work)))
    finally:
        gate.release.set()
        if server is not None:
            server.stop()
        model.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if all(s["complete"] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
