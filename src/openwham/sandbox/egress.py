"""The egress proxy: the one way out of a sandbox's network namespace.

A sandbox has its own network namespace with nothing but loopback. When a phase may use the
network (an environment's setup script; later, the agent under an allowlist), the engine opens
an *egress session*: a UNIX socket of its own (``DATA_DIR/run/egress/<random>.sock``),
bind-mounted into that sandbox only, where the stdlib forwarder (``gateway/forwarder.py
--pass-socket``) listens on ``127.0.0.1:PORT`` (``http_proxy`` / ``https_proxy`` point there)
and hands every connection to this proxy over the socket (a NUL byte with the connection's
descriptor, SCM_RIGHTS; :func:`_receive_first` takes one stream socket and closes anything
else), so the proxy serves the sandbox's client directly; requests written on the socket
itself are served too. Holding the socket is the capability: a sandbox without it has no
way out, and closing the session closes it.

This side speaks HTTP proxy: ``CONNECT host:port`` tunnels (HTTPS, git over HTTPS, anything
TLS) and absolute-form ``http://`` requests (sent on as one request with ``Connection:
close``). Every request is decided twice:

1. by the session's :class:`EgressPolicy` (domains and methods; setup allows everything, the
   agent's allowlist will narrow it), and
2. by the :class:`AddressGuard` on the addresses the name resolves to, *after* resolving (a
   name that resolves to a forbidden address is refused; the connection goes to the checked
   address, so a second lookup cannot swap it): loopback, link-local (cloud metadata at
   169.254.169.254), unspecified, multicast and reserved addresses, every address of this host
   (an address the host can bind to is its own: the database, the API server, anything
   listening on 0.0.0.0), and private networks (RFC 1918, CGNAT, IPv6 ULA) unless the
   operator lists them in ``WHAM_EGRESS_ALLOW_NETWORKS``.

Each request becomes a :class:`ProxyEvent` (the shape of a turn's ``proxy_events``). The
proxy reads and decides request heads on an event loop in a thread of its own; once a
request is allowed, its bytes move by splice(2) in two threads of the connection's own, so a
download costs no Python per chunk (``python -m bench.proxy``).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import datetime as dt
import fcntl
import ipaddress
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

CHUNK = 1024 * 1024  # bytes per splice(2) (and the pipe's size between the sockets)
HEAD_LIMIT = 64 * 1024
HEAD_SECONDS = 30.0
CONNECT_SECONDS = 10.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",  # carrier-grade NAT
        "fc00::/7",  # unique local
    )
)
_HOP_HEADERS = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization"}


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class EgressPolicy:
    """Which requests a session lets out. ``domains``: ``None`` lets any name out; otherwise a
    name must equal an entry, or be a subdomain (at any depth) of an entry ``*.example.com``
    (which does not match ``example.com`` itself). ``methods``: ``None`` lets any method out.
    A CONNECT tunnel is judged by its host name, and under a method rule as the methods it
    may carry: what travels inside TLS is not visible here (docs/security.md)."""

    domains: frozenset[str] | None = None
    methods: frozenset[str] | None = None

    def refusal(self, method: str, host: str) -> str | None:
        """Why this request may not leave, or ``None``."""
        verb = method.upper()
        if self.methods is not None and verb != "CONNECT" and verb not in self.methods:
            return f"method {method} is not allowed"
        if self.domains is not None and not domain_allowed(self.domains, host):
            return f"{host} is not on the allowlist"
        return None


def common_dependencies() -> list[str]:
    """Codex cloud's "Common dependencies" preset (``common_dependencies.txt``: its source
    and date are in the file)."""
    text = (Path(__file__).parent / "common_dependencies.txt").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def agent_policy(preset: str, domains: Iterable[str], safe_methods_only: bool) -> EgressPolicy:
    """The agent phase's policy (``agent_network_access`` turned on): ``preset`` ``all``
    lets any name out, ``common_dependencies`` adds the preset's zones (each name and its
    subdomains) to ``domains``, ``none`` only ``domains``; ``safe_methods_only`` keeps
    GET, HEAD and OPTIONS. The address guard applies whatever the policy says."""
    allowed: frozenset[str] | None = None
    if preset != "all":
        entries = set(domains)
        if preset == "common_dependencies":
            for zone in common_dependencies():
                entries |= {zone, f"*.{zone}"}
        allowed = frozenset(entries)
    return EgressPolicy(domains=allowed, methods=SAFE_METHODS if safe_methods_only else None)


def domain_allowed(entries: Iterable[str], host: str) -> bool:
    """Whether ``host`` matches an allowlist entry: exact, or ``*.zone`` for its subdomains."""
    name = host.lower().rstrip(".")
    for entry in entries:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if name.endswith(entry[1:]):
                return True
        elif name == entry:
            return True
    return False


class AddressGuard:
    """Refuses addresses that belong to this host or its private networks (see the module)."""

    def __init__(self, allow_networks: Iterable[str] = ()) -> None:
        self.allowed = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in allow_networks)

    @classmethod
    def from_setting(cls, value: str) -> AddressGuard:
        """From ``WHAM_EGRESS_ALLOW_NETWORKS``: comma-separated CIDRs (ValueError if bad)."""
        return cls([n for n in value.split(",") if n.strip()])

    def refusal(self, address: str) -> str | None:
        """Why a connection to ``address`` is refused, or ``None``.

        An IPv6 address that carries IPv4 addresses (IPv4-mapped and -compatible, 6to4,
        Teredo, NAT64) is judged by each of them as well: a relay or translator on the way
        would deliver it to that IPv4 address, so a loopback or metadata address must not
        pass in an IPv6 disguise.
        """
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address):
            embedded = embedded_ipv4(ip)
            if ip.ipv4_mapped is not None:
                return self._judge(ip.ipv4_mapped)
            if embedded:
                # the v6 rules first (``::1`` is loopback, not 0.0.0.1), except "reserved":
                # ::/96 and 64:ff9b::/96 are inside ::/8, whose embedded address decides
                if (reason := self._judge(ip, reserved_ok=True)) is not None:
                    return reason
                for v4 in embedded:
                    if (reason := self._judge(v4)) is not None:
                        return f"{reason} (embedded in {ip})"
                return None
        return self._judge(ip)

    def _judge(self, ip: IPAddress, *, reserved_ok: bool = False) -> str | None:
        if ip.is_loopback:
            return "loopback addresses are host services"
        if ip.is_link_local:
            return "link-local addresses (cloud metadata) are not reachable"
        if (
            ip.is_unspecified
            or ip.is_multicast
            or (ip.is_reserved and not reserved_ok)
            or ip in _THIS_NETWORK
        ):
            return f"{ip} is not a routable destination"
        if _is_own(ip):
            return f"{ip} is an address of this host"
        if any(ip in net for net in PRIVATE_NETWORKS) and not any(
            ip.version == net.version and ip in net for net in self.allowed
        ):
            return f"{ip} is in a private network (see WHAM_EGRESS_ALLOW_NETWORKS)"
        return None


_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
# RFC 6052 layouts of an IPv4 address in a NAT64 prefix of length /48, /56 and /64: the byte
# positions of the IPv4 address, then the first byte of the suffix (which must be zero, as
# must byte 8, the "u" octet). /96 (bytes 12-15) is read separately.
_RFC6052_LAYOUTS = (((6, 7, 9, 10), 11), ((7, 9, 10, 11), 12), ((9, 10, 11, 12), 13))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address ``ip`` carries that a relay or translator might deliver to.

    IPv4-mapped (``::ffff:0:0/96``), IPv4-compatible (``::/96``, deprecated), 6to4
    (``2002::/16``), Teredo (``2001::/32``: the server and the client, whose bits are
    inverted) and NAT64 (``64:ff9b::/96``; the local-use ``64:ff9b:1::/48``, whose prefix
    length the operator chooses, is read in every RFC 6052 layout the address fits).
    """
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in _IPV4_COMPATIBLE or ip in _NAT64_WELL_KNOWN:
        found.append(ipaddress.IPv4Address(ip.packed[12:]))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64_LOCAL:
        raw = ip.packed
        readings = [ipaddress.IPv4Address(raw[12:])]
        if raw[8] == 0:
            for positions, suffix in _RFC6052_LAYOUTS:
                if not any(raw[suffix:]):
                    readings.append(ipaddress.IPv4Address(bytes(raw[i] for i in positions)))
        # an all-zero reading is the padding of another layout, not a destination
        found.extend([r for r in readings if int(r)] or readings)
    return found


def _is_own(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address of this host: only those can be bound to."""
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((str(ip), 0))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class ProxyEvent:
    """One request through the proxy, as a turn's ``proxy_events`` entry shows it."""

    timestamp: str
    decision: str  # "allow" or "deny"
    reason: str
    method: str
    domain: str
    protocol: str
    size: int
    path: str | None
    port: int | None = None
    duration_ms: int = 0  # from the request's head to the end of its connection

    def wire(self) -> dict[str, object]:
        return dict(self.__dict__)


EventSink = Callable[[ProxyEvent], None]


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class EgressSession:
    """One sandbox's way out: a socket of its own, a policy and an event sink."""

    def __init__(
        self, proxy: EgressProxy, path: Path, policy: EgressPolicy, on_event: EventSink | None
    ) -> None:
        self.proxy, self.socket, self.policy, self.on_event = proxy, path, policy, on_event
        self.listener: socket.socket | None = None
        self.accepting: asyncio.Task[None] | None = None
        self.connections: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        """Stop listening and cut every open connection (the phase is over)."""
        self.proxy._close(self)

    def __enter__(self) -> EgressSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EgressProxy:
    """Host side of sandbox egress; ``open`` a session per sandbox phase that may go out."""

    def __init__(self, directory: Path, guard: AddressGuard | None = None) -> None:
        self.directory = directory
        self.guard = guard or AddressGuard()
        # names answered here before DNS, like an /etc/hosts of the proxy's own (the tests'
        # stand-in for public names); the guard judges these addresses like any other
        self.hosts: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                os.chmod(self.directory, 0o700)
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="egress-proxy", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def open(self, policy: EgressPolicy, on_event: EventSink | None = None) -> EgressSession:
        """A new session listening on a fresh socket (0600) in ``directory``."""
        loop = self._ensure_loop()
        path = self.directory / f"{secrets.token_hex(8)}.sock"
        session = EgressSession(self, path, policy, on_event)

        async def listen() -> None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.setblocking(False)
            listener.bind(str(path))
            os.chmod(path, 0o600)
            listener.listen(128)
            session.listener = listener
            session.accepting = asyncio.ensure_future(self._accept_loop(session, listener))

        asyncio.run_coroutine_threadsafe(listen(), loop).result(10)
        return session

    def _close(self, session: EgressSession) -> None:
        loop = self._loop
        if loop is None or session.listener is None:
            return

        async def stop() -> None:
            if session.accepting is not None:
                session.accepting.cancel()
            if session.listener is not None:
                session.listener.close()
            for task in list(session.connections):
                task.cancel()
            await asyncio.gather(*session.connections, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        session.listener = session.accepting = None
        session.socket.unlink(missing_ok=True)

    def stop(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
            thread, self._thread = self._thread, None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not thread.is_alive():
                loop.close()

    # -- one connection --

    async def _accept_loop(self, session: EgressSession, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError:  # out of descriptors for a moment, or the listener closed
                if listener.fileno() < 0:
                    return
                await asyncio.sleep(0.05)
                continue
            task = asyncio.ensure_future(self._serve(session, conn))
            session.connections.add(task)
            task.add_done_callback(session.connections.discard)

    async def _serve(self, session: EgressSession, conn: socket.socket) -> None:
        """One connection on the session's socket: HTTP proxy requests on it, or (from the
        in-sandbox forwarder) a NUL byte carrying the sandbox's client socket (SCM_RIGHTS),
        which is then served directly, so the forwarder is not on the data path."""
        loop = asyncio.get_running_loop()
        try:
            try:
                first, client = await asyncio.wait_for(_receive_first(loop, conn), HEAD_SECONDS)
            except (OSError, TimeoutError):
                conn.close()
                return
            if client is not None:
                conn.close()
                conn, first = client, b""
            reader = asyncio.StreamReader(limit=HEAD_LIMIT)
            if first:
                reader.feed_data(first)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
        except BaseException:
            conn.close()
            raise
        await self._handle(session, reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def _handle(
        self, session: EgressSession, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        method, domain, protocol, path = "", "", "", None
        port: int | None = None
        started = time.monotonic()
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_SECONDS)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            line, _, headers = head.partition(b"\r\n")
            parts = line.decode("latin-1").split(" ")
            if len(parts) != 3:
                raise _Refused(400, "not an HTTP proxy request")
            method, target, protocol = parts
            host, port, path = _target(method, target)
            domain = host
            started = time.monotonic()
            refusal = session.policy.refusal(method, host)
            if refusal is not None:
                raise _Refused(403, refusal)
            upstream = await self._connect(host, port)
            moved = [0]
            try:
                loop = asyncio.get_running_loop()
                if method == "CONNECT":
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await writer.drain()
                else:
                    request = _origin_request(method, path or "/", protocol, headers)
                    await loop.sock_sendall(upstream, request)
                client, early = _detach(reader, writer)
                if early:  # what the client sent after the head (a body, a TLS hello)
                    await loop.sock_sendall(upstream, early)
                    moved[0] += len(early)
                await _splice(client, upstream, moved)
            finally:  # also when the session closes under it
                self._record(
                    session,
                    ProxyEvent(
                        _now(),
                        "allow",
                        "checks passed",
                        method,
                        domain,
                        protocol,
                        moved[0],
                        path,
                        port,
                        _ms(started),
                    ),
                )
                upstream.close()
        except _Refused as refused:
            if method:
                event = ProxyEvent(
                    _now(), "deny", refused.reason, method, domain, protocol, 0, path, port
                )
                self._record(session, dataclasses.replace(event, duration_ms=_ms(started)))
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(_error(refused.status, refused.reason))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            await _close(writer)

    async def _connect(self, host: str, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        fixed = self.hosts.get(host.lower().rstrip("."))
        try:
            infos = [] if fixed else await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise _Refused(502, f"cannot resolve {host}: {exc}") from exc
        addresses = [fixed] if fixed else list(dict.fromkeys(str(i[4][0]) for i in infos))
        refusals = {a: self.guard.refusal(a) for a in addresses}
        allowed = [a for a in addresses if refusals[a] is None]
        if not allowed:
            raise _Refused(403, next(iter(refusals.values())) or f"{host} has no address")
        error: Exception | None = None
        for address in allowed:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            sock = socket.socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (address, port)), CONNECT_SECONDS)
                return sock
            except (OSError, TimeoutError) as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise _Refused(502, f"cannot connect to {host}:{port}: {error or 'no address'}")

    def _record(self, session: EgressSession, event: ProxyEvent) -> None:
        if session.on_event is None:
            return
        with contextlib.suppress(Exception):
            session.on_event(event)


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat()


def _ms(since: float) -> int:
    return int((time.monotonic() - since) * 1000)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


def _target(method: str, target: str) -> tuple[str, int, str | None]:
    """Host, port and path of a request target (authority form for CONNECT)."""
    if method == "CONNECT":
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise _Refused(400, f"bad CONNECT target {target!r}")
        return host.strip("[]"), int(port), None
    url = urlsplit(target)
    if url.scheme != "http" or not url.hostname:
        raise _Refused(400, "a proxy request needs an absolute http:// URL (or CONNECT)")
    try:
        number = url.port or 80
    except ValueError as exc:
        raise _Refused(400, f"bad port in {target!r}") from exc
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    return url.hostname, number, path


def _origin_request(method: str, path: str, protocol: str, headers: bytes) -> bytes:
    """The request as the origin server takes it: origin-form target, no proxy headers,
    one request per connection."""
    kept = [
        h
        for h in headers.split(b"\r\n")
        if h and h.split(b":", 1)[0].strip().lower() not in _HOP_HEADERS
    ]
    first = f"{method} {path} {protocol}".encode("latin-1")
    return b"\r\n".join([first, *kept, b"Connection: close", b"", b""])


def _error(status: int, reason: str) -> bytes:
    text = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(status, "Error")
    body = f"openwham egress proxy: {reason}\n".encode()
    return (
        f"HTTP/1.1 {status} {text}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


_FD = array.array("i", [0]).itemsize


async def _receive_first(
    loop: asyncio.AbstractEventLoop, conn: socket.socket
) -> tuple[bytes, socket.socket | None]:
    """The first bytes on a session connection, or ``b""`` and the socket the forwarder
    sent: its NUL byte with one descriptor (SCM_RIGHTS) of a stream socket. Any other
    descriptor is closed unused; a NUL byte without a stream socket ends the connection."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())
    data, ancillary, _, _ = conn.recvmsg(HEAD_LIMIT, socket.CMSG_SPACE(_FD))
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _FD])
    client: socket.socket | None = None
    if data == b"\0" and len(fds) == 1:
        client = _stream_socket(fds.pop())
    for fd in fds:
        os.close(fd)
    if data.startswith(b"\0") and client is None:
        raise ConnectionError("a NUL byte without a stream socket")
    return (b"" if client is not None else data), client


def _stream_socket(fd: int) -> socket.socket | None:
    """``fd`` as a stream socket, or ``None`` (closed) when it is anything else."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError("not a socket")
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def _detach(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[socket.socket, bytes]:
    """The client's socket taken from asyncio (a blocking duplicate; the transport is closed,
    the connection stays open) and the bytes its reader had already read past the head."""
    transport = writer.transport
    transport.pause_reading()  # type: ignore[attr-defined]
    early = bytes(getattr(reader, "_buffer", b""))  # asyncio keeps no public way to get these
    raw = transport.get_extra_info("socket")
    client = socket.socket(fileno=os.dup(raw.fileno()))
    client.setblocking(True)
    transport.abort()  # closes asyncio's descriptor only: the duplicate keeps the connection
    return client, early


def _copy(src: socket.socket, dst: socket.socket) -> int:
    """Move bytes from ``src`` to ``dst`` until EOF with splice(2) through a pipe (no copy
    into Python, no event-loop wake-up per chunk), then half-close ``dst``; the count moved.
    Runs in a thread of its own; a shutdown of either socket ends it."""
    moved = 0
    out, into = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(into, fcntl.F_SETPIPE_SZ, CHUNK)
        with contextlib.suppress(OSError):
            while n := os.splice(src.fileno(), into, CHUNK):
                moved += n
                while n:
                    n -= os.splice(out, dst.fileno(), n)
            dst.shutdown(socket.SHUT_WR)
    finally:
        os.close(out)
        os.close(into)
    return moved


def _in_thread(src: socket.socket, dst: socket.socket) -> asyncio.Future[int]:
    """:func:`_copy` in a thread of its own (not the loop's executor: a long download must
    not hold one of its few workers), as a future of the running loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def settle(n: int) -> None:
        if not done.done():
            done.set_result(n)

    def run() -> None:
        n = 0
        try:
            n = _copy(src, dst)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone (the proxy stopped)
                loop.call_soon_threadsafe(settle, n)

    threading.Thread(target=run, name="egress-splice", daemon=True).start()
    return done


async def _splice(client: socket.socket, upstream: socket.socket, moved: list[int]) -> None:
    """Both directions until the server's side is done (``moved`` counts the bytes); a
    cancelled task (the session closed) shuts both sockets, which ends the threads."""
    upstream.setblocking(True)  # splice(2) waits in the threads, not in the loop
    up = _in_thread(client, upstream)
    down = _in_thread(upstream, client)
    try:
        await asyncio.wait({down})  # the server's answer ends it (or the tunnel closing)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(up), 1.0)
    finally:
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        try:
            await asyncio.gather(asyncio.shield(up), asyncio.shield(down))
        finally:
            moved[0] += (up.result() if up.done() else 0) + (down.result() if down.done() else 0)
            client.close()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
