"""A cheap burst client: plain non-blocking sockets on one ``epoll``, requests written at once.

``bench.load``'s burst measures the server's answer to N requests that arrive together. An
asyncio + httpx client spends ~1 ms of its own CPU per request (connection pool, request
and response objects, header parsing), on the same two cores as the server, and stamps a
response when its coroutine gets to it, behind the others'. Here each request is bytes
built beforehand, written with one ``send``; each wake-up is one ``recv`` into the
connection's buffer; the head is parsed once (status, ``Content-Length`` or chunked) and a
request's latency is taken when the last byte of its body arrives. The client's own CPU
(``time.thread_time``, this thread's user + system: the loopback's kernel work done in its
system calls included) is returned with the figures, so what the client cost is on the page.

Two ways to arrive:

- ``fresh``: every request on a new connection (non-blocking ``connect``, then the request as
  soon as the socket is writable), the latency from the ``connect`` call to the last byte:
  clients that connect for each request, as the httpx client without keep-alive did.
- ``keepalive``: N connections opened and each used once for a ``warm`` request beforehand
  (clients already connected, e.g. a team's CLIs and browsers polling), then the N requests
  written one after the other in a tight loop, each latency from its own ``send``.
"""

from __future__ import annotations

import gc
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class RawBurst:
    """What a burst got: one latency per complete answer, statuses, and the client's cost."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    retry_after_missing: int = 0
    body_bytes: int = 0
    wall_s: float = 0.0
    client_cpu_ms: float = 0.0
    write_ms: float = 0.0  # from the first request's start to the last one's write
    probe_ms: float | None = None  # the ``probe`` request, on a connection of its own
    probe_status: int | None = None
    probe_body: bytes = b""
    server_cpu_ms: float | None = None  # ``server_cpu``'s difference over the burst


def request(path: str, headers: dict[str, str], host: str, *, close: bool) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _Answer:
    """One response being read: the head parsed once, then the body counted (or the chunked
    body scanned for its last chunk) until complete."""

    __slots__ = ("buf", "chunked", "done", "head_end", "length", "retry_after", "status")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.length: int | None = None
        self.chunked = False
        self.head_end = -1
        self.retry_after = False
        self.done = False

    def feed(self, data: bytes) -> bool:
        """Add what was read; True once the response is complete."""
        self.buf += data
        if self.head_end < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.head_end = end + 4
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    self.length = int(value.strip())
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
                elif name == "retry-after":
                    self.retry_after = True
        if self.length is not None:
            self.done = len(self.buf) - self.head_end >= self.length
        elif self.chunked:
            self.done = _chunked_complete(self.buf, self.head_end)
        return self.done

    def eof(self) -> bool:
        """The peer closed: complete if the body had no declared length (read to the end)."""
        self.done = self.head_end >= 0 and self.length is None and not self.chunked
        return self.done

    def body_size(self) -> int:
        return len(self.buf) - self.head_end if self.head_end >= 0 else 0


def _chunked_complete(buf: bytearray, pos: int) -> bool:
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return False
        size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
        if size == 0:
            return buf.find(b"\r\n", line_end + 2) >= 0  # the (empty) trailer's end
        pos = line_end + 2 + size + 2
        if pos > len(buf):
            return False


class _Conn:
    __slots__ = ("answer", "probe", "request", "sent", "sock", "t0")

    def __init__(self, sock: socket.socket, request: bytes, *, probe: bool = False) -> None:
        self.sock = sock
        self.request = request
        self.t0 = 0.0
        self.answer = _Answer()
        self.sent = False
        self.probe = probe


def burst(
    address: tuple[str, int],
    requests: Sequence[bytes],
    *,
    keepalive: bool,
    warm: bytes | None = None,
    probe: bytes | None = None,
    timeout: float = 90.0,
    server_cpu: Callable[[], float] | None = None,
) -> RawBurst:
    """Send ``requests`` together (see the module's docstring) and read every answer whole.

    ``keepalive``: open one connection per request first, use each once for ``warm`` (which
    must keep the connection open), then write the requests; else a new connection each.
    ``probe`` (e.g. ``/healthz``) goes out right after them on a new connection of its own;
    its answer is kept apart from the burst's figures. ``server_cpu`` (CPU seconds of the
    server so far) is read just before the first request and after the last answer.
    """
    out = RawBurst()
    sel = selectors.DefaultSelector()
    conns: list[_Conn] = []
    if keepalive:
        if warm is None:
            raise ValueError("keepalive needs a warm request (connections that were used)")
        conns = [_Conn(socket.create_connection(address), r) for r in requests]
        for c in conns:
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sock.sendall(warm)
        for c in conns:  # every warm answer read whole: the connections are idle again
            answer = _Answer()
            while not answer.feed(data := c.sock.recv(1 << 16)):
                if not data or answer.status != 200:
                    raise RuntimeError(f"the warm-up request got {answer.status or 'no answer'}")
            c.sock.setblocking(False)
        time.sleep(0.1)
    was_enabled = gc.isenabled()
    gc.disable()  # no collection of the client's inside the measured window
    server0 = server_cpu() if server_cpu is not None else 0.0
    cpu0 = time.thread_time()
    start = time.perf_counter()
    try:
        if keepalive:
            for c in conns:
                c.t0 = time.perf_counter()
                c.sock.send(c.request)  # a few hundred bytes: one segment, never partial here
                c.sent = True
                sel.register(c.sock, selectors.EVENT_READ, c)
        fresh = [] if keepalive else [(r, False) for r in requests]
        if probe is not None:
            fresh.append((probe, True))
        for r, is_probe in fresh:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = _Conn(sock, r, probe=is_probe)
            c.t0 = time.perf_counter()
            sock.connect_ex(address)  # EINPROGRESS; on loopback connected at once
            conns.append(c)
            try:
                sock.send(r)
                c.sent = True
                sel.register(sock, selectors.EVENT_READ, c)
            except OSError:  # not connected yet (a full accept queue): when writable
                sel.register(sock, selectors.EVENT_WRITE, c)
        out.write_ms = (time.perf_counter() - start) * 1000
        pending = len(conns)
        deadline = start + timeout
        while pending and time.perf_counter() < deadline:
            for key, _ in sel.select(timeout=1.0):
                c = key.data
                if not c.sent:
                    if c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        out.errors += 1
                        pending -= 1
                        sel.unregister(c.sock)
                        continue
                    c.sock.send(c.request)
                    c.sent = True
                    sel.modify(c.sock, selectors.EVENT_READ, c)
                    continue
                try:
                    data = c.sock.recv(1 << 18)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                complete = c.answer.feed(data) if data else c.answer.eof()
                if not data and not complete:
                    out.errors += 1
                if complete or not data:
                    now = time.perf_counter()
                    pending -= 1
                    sel.unregister(c.sock)
                    if c.probe or not keepalive:  # as a client without keep-alive does
                        c.sock.close()
                    if complete and c.probe:
                        out.probe_ms = (now - c.t0) * 1000
                        out.probe_status = c.answer.status
                        out.probe_body = bytes(c.answer.buf[c.answer.head_end :])
                    elif complete:
                        _count(out, c.answer, (now - c.t0) * 1000)
        out.errors += pending
        out.wall_s = time.perf_counter() - start
        out.client_cpu_ms = (time.thread_time() - cpu0) * 1000
        if server_cpu is not None:
            out.server_cpu_ms = (server_cpu() - server0) * 1000
    finally:
        if was_enabled:
            gc.enable()
        for c in conns:
            c.sock.close()
        sel.close()
    return out


def _count(out: RawBurst, answer: _Answer, latency_ms: float) -> None:
    out.latencies_ms.append(latency_ms)
    out.statuses[answer.status] = out.statuses.get(answer.status, 0) + 1
    out.body_bytes += answer.body_size()
    if answer.status == 503 and not answer.retry_after:
        out.retry_after_missing += 1
