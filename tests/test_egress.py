"""The egress proxy (sandbox/egress.py) on its own: policies, the address guard, and real
requests through a session's socket to a test host in its own network namespace and to
services on this host's loopback (which it must refuse)."""

from __future__ import annotations

import array
import ipaddress
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openwham.gateway import forwarder_path
from openwham.sandbox.egress import AddressGuard, EgressPolicy, EgressProxy, ProxyEvent


class Listener:
    """A TCP server on this host that counts connections and answers one HTTP 200."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.sock = socket.create_server((address, 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[EgressProxy]:
    p = EgressProxy(tmp_path / "egress")
    yield p
    p.stop()


def ask(session_socket: Path, request: bytes, then: bytes = b"") -> bytes:
    """Send ``request`` to the proxy, then (after a tunnel is up) ``then``; all it answers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(session_socket))
        s.sendall(request)
        if then:
            head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 200"), head
            s.sendall(then)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def test_policies_allow_by_domain_and_method() -> None:
    anything = EgressPolicy()
    assert anything.refusal("POST", "example.com") is None
    narrow = EgressPolicy(
        domains=frozenset({"pypi.org", "*.npmjs.org"}), methods=frozenset({"GET", "HEAD"})
    )
    assert narrow.refusal("GET", "pypi.org") is None
    assert narrow.refusal("GET", "registry.npmjs.org") is None
    assert (
        narrow.refusal("GET", "npmjs.org.evil.com") == "npmjs.org.evil.com is not on the allowlist"
    )
    assert narrow.refusal("GET", "notpypi.org") is not None
    assert narrow.refusal("POST", "pypi.org") == "method POST is not allowed"


def test_the_guard_refuses_host_loopback_link_local_and_private_addresses(net_host: Any) -> None:
    guard = AddressGuard()
    for address in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
        assert guard.refusal(address) == "loopback addresses are host services", address
    assert "link-local" in (guard.refusal("169.254.169.254") or "")
    assert "link-local" in (guard.refusal("fe80::1") or "")
    assert guard.refusal("0.0.0.0") is not None
    assert guard.refusal("224.0.0.1") is not None
    # this machine's own (non-loopback) address: where a server bound to 0.0.0.0 listens
    assert guard.refusal(net_host.host_side) == f"{net_host.host_side} is an address of this host"
    for private in ("10.1.2.3", "172.20.0.1", "192.168.1.1", "100.64.0.1", "fd00::1"):
        assert "private network" in (guard.refusal(private) or ""), private
    assert guard.refusal(net_host.address) is None
    assert guard.refusal("93.184.215.14") is None
    opened = AddressGuard.from_setting("10.1.2.0/24, fd00::/8")
    assert opened.refusal("10.1.2.3") is None
    assert opened.refusal("fd00::1") is None
    assert opened.refusal("10.1.3.1") is not None
    assert AddressGuard(["127.0.0.0/8"]).refusal("127.0.0.1") is not None  # never loopback
    with pytest.raises(ValueError):
        AddressGuard.from_setting("not-a-network")


def _v4_in(form: str, v4: str) -> str:
    """``v4`` written in one of the IPv6 forms that carry an IPv4 address."""
    n = int(ipaddress.IPv4Address(v4))
    base = {
        "mapped": int(ipaddress.IPv6Address("::ffff:0:0")) | n,
        "compatible": n,
        "6to4": int(ipaddress.IPv6Address("2002::")) | (n << 80) | 1,
        # Teredo: the server is bits 32-63; the client (here a public one) is inverted
        "teredo-server": int(ipaddress.IPv6Address("2001::"))
        | (n << 64)
        | (int(ipaddress.IPv4Address("93.184.215.14")) ^ 0xFFFFFFFF),
        "teredo-client": int(ipaddress.IPv6Address("2001::"))
        | (int(ipaddress.IPv4Address("93.184.215.14")) << 64)
        | (n ^ 0xFFFFFFFF),
        "nat64": int(ipaddress.IPv6Address("64:ff9b::")) | n,
        "nat64-local-96": int(ipaddress.IPv6Address("64:ff9b:1::")) | n,
        # RFC 6052 /48 layout: 16 bits, the zero u octet, 16 bits
        "nat64-local-48": int(ipaddress.IPv6Address("64:ff9b:1::"))
        | ((n >> 16) << 64)
        | ((n & 0xFFFF) << 40),
    }[form]
    return str(ipaddress.IPv6Address(base))


IPV6_FORMS = (
    "mapped",
    "compatible",
    "6to4",
    "teredo-server",
    "teredo-client",
    "nat64",
    "nat64-local-96",
    "nat64-local-48",
)


@pytest.mark.parametrize("form", IPV6_FORMS)
def test_the_guard_judges_ipv4_addresses_inside_ipv6_addresses(form: str, net_host: Any) -> None:
    """A relay (6to4, Teredo) or translator (NAT64) delivers to the embedded IPv4 address:
    loopback, metadata, private and this host's own addresses must not pass in disguise."""
    guard = AddressGuard()
    assert "loopback" in (guard.refusal(_v4_in(form, "127.0.0.1")) or ""), form
    assert "loopback" in (guard.refusal(_v4_in(form, "127.53.0.9")) or ""), form
    metadata = _v4_in(form, "169.254.169.254")
    assert "link-local" in (guard.refusal(metadata) or ""), metadata
    for private in ("10.1.2.3", "172.20.0.1", "192.168.1.1", "100.64.0.1"):
        assert "private network" in (guard.refusal(_v4_in(form, private)) or ""), private
    own = _v4_in(form, net_host.host_side)
    assert f"{net_host.host_side} is an address of this host" in (guard.refusal(own) or ""), own
    assert guard.refusal(_v4_in(form, "0.0.0.0")) is not None
    publics = ["93.184.215.14", "8.8.8.8"]
    if form != "nat64-local-48":
        # The local-use prefix is read in every RFC 6052 layout and refused when any reading
        # is (see the next test): the test host's random 198.51.100.x can read as 100.x.0.0,
        # a private address, in another layout. Fixed addresses that read public in all do.
        publics.append(net_host.address)
    for public in publics:
        assert guard.refusal(_v4_in(form, public)) is None, (form, public)
    # an operator's allowed network is allowed in any form
    assert AddressGuard(["10.1.2.0/24"]).refusal(_v4_in(form, "10.1.2.3")) is None


def test_the_guard_reads_every_layout_of_a_local_nat64_prefix() -> None:
    """64:ff9b:1::/48's prefix length is the operator's choice: an address that fits the /96
    layout with a private address and another layout with a public one is refused."""
    guard = AddressGuard()
    assert "private network" in (guard.refusal("64:ff9b:1:5db8:d7:e00:a00:1") or "")
    assert guard.refusal("64:ff9b:1:5db8:d7:e00::") is None  # /48 of 93.184.215.14
    assert "loopback" in (guard.refusal("64:ff9b:1:0:7f:0:100::") or "")  # /64 of 127.0.0.1
    # the IPv6 rules still apply first: ::1 is loopback, :: unspecified
    assert guard.refusal("::1") == "loopback addresses are host services"
    assert guard.refusal("::") is not None


def test_requests_reach_an_outside_host_and_are_recorded(proxy: EgressProxy, net_host: Any) -> None:
    seen: list[ProxyEvent] = []
    with proxy.open(EgressPolicy(), on_event=seen.append) as session:
        assert session.socket.stat().st_mode & 0o777 == 0o600
        plain = ask(
            session.socket,
            f"GET {net_host.url('hello.txt')} HTTP/1.1\r\nHost: {net_host.address}\r\n"
            "Proxy-Connection: keep-alive\r\n\r\n".encode(),
        )
        assert plain.startswith(b"HTTP/1.0 200") and plain.endswith(b"hello from the test host\n")
        tunnel = ask(
            session.socket,
            f"CONNECT {net_host.address}:{net_host.port} HTTP/1.1\r\n\r\n".encode(),
            then=f"GET /hello.txt HTTP/1.0\r\nHost: {net_host.address}\r\n\r\n".encode(),
        )
        assert tunnel.endswith(b"hello from the test host\n")
    assert [(e.decision, e.method, e.domain, e.path) for e in seen] == [
        ("allow", "GET", net_host.address, "/hello.txt"),
        ("allow", "CONNECT", net_host.address, None),
    ]
    assert all(e.size > 25 and e.reason == "checks passed" for e in seen)
    assert not session.socket.exists()  # closed with the session


def test_host_services_are_refused_whatever_the_request_looks_like(
    proxy: EgressProxy, net_host: Any
) -> None:
    loopback = Listener("127.0.0.1")
    on_host = Listener(net_host.host_side)  # this host's address on the test network
    seen: list[ProxyEvent] = []
    try:
        with proxy.open(EgressPolicy(), on_event=seen.append) as session:
            attempts = [
                f"GET http://127.0.0.1:{loopback.port}/ HTTP/1.1\r\n\r\n",
                f"CONNECT 127.0.0.1:{loopback.port} HTTP/1.1\r\n\r\n",
                f"CONNECT [::ffff:127.0.0.1]:{loopback.port} HTTP/1.1\r\n\r\n",
                f"GET http://localhost:{loopback.port}/ HTTP/1.1\r\n\r\n",
                f"GET http://{net_host.host_side}:{on_host.port}/ HTTP/1.1\r\n\r\n",
                f"CONNECT {socket.gethostname()}:{loopback.port} HTTP/1.1\r\n\r\n",
            ]
            for request in attempts:
                answer = ask(session.socket, request.encode())
                assert answer.startswith(b"HTTP/1.1 403 Forbidden"), (request, answer)
                assert b"openwham egress proxy:" in answer and b"secret" not in answer
            # not a proxy request at all
            assert ask(session.socket, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
            assert ask(session.socket, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")
    finally:
        loopback.close()
        on_host.close()
    assert loopback.connections == 0 and on_host.connections == 0
    assert [e.decision for e in seen] == ["deny"] * 7  # the nonsense line is no request
    assert seen[0].reason == "loopback addresses are host services"
    assert "absolute http:// URL" in seen[-1].reason


def test_a_policy_refusal_never_connects(proxy: EgressProxy, net_host: Any) -> None:
    seen: list[ProxyEvent] = []
    policy = EgressPolicy(domains=frozenset({"pypi.org"}), methods=frozenset({"GET"}))
    with proxy.open(policy, on_event=seen.append) as session:
        answer = ask(session.socket, f"GET {net_host.url('hello.txt')} HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403") and b"not on the allowlist" in answer
    assert [(e.decision, e.reason) for e in seen] == [
        ("deny", f"{net_host.address} is not on the allowlist")
    ]


def splicing() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "egress-splice"}


def test_bytes_sent_with_the_head_go_through_and_closing_the_session_cuts_tunnels(
    proxy: EgressProxy, net_host: Any
) -> None:
    """The data path hands the sockets to splice(2) threads: what the client sent in the same
    write as the head (already read by the proxy) must still reach the host, the bytes are
    counted, and a tunnel left open ends when its session closes (its threads with it)."""
    seen: list[ProxyEvent] = []
    get = f"GET /hello.txt HTTP/1.0\r\nHost: {net_host.address}\r\n\r\n".encode()
    with proxy.open(EgressPolicy(), on_event=seen.append) as session:
        eager = ask(
            session.socket,
            f"CONNECT {net_host.address}:{net_host.port} HTTP/1.1\r\n\r\n".encode() + get,
        )
        assert eager.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.0 200")
        assert eager.endswith(b"hello from the test host\n")
        idle = socket.socket(socket.AF_UNIX)
        idle.settimeout(10)
        idle.connect(str(session.socket))
        idle.sendall(f"CONNECT {net_host.address}:{net_host.port} HTTP/1.1\r\n\r\n".encode())
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 5
        while len(threads := splicing()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the threads start just after the 200
        assert len(threads) >= 2  # the idle tunnel's two (the first one's may be ending)
    started = time.monotonic()
    assert idle.recv(4096) == b""  # cut by the session's close
    assert time.monotonic() - started < 5
    idle.close()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert [(e.decision, e.method) for e in seen] == [("allow", "CONNECT")] * 2
    answer = eager.split(b"\r\n\r\n", 1)[1]
    assert seen[0].size == len(get) + len(answer)  # both directions, the early bytes too


def forwarder(session_socket: Path) -> tuple[subprocess.Popen[str], str]:
    """The in-sandbox forwarder in front of ``session_socket`` as the launchers start it
    for egress (``--pass-socket``), here on this host's loopback; and its address."""
    fwd = subprocess.Popen(
        [
            *(sys.executable, "-I", str(forwarder_path()), "--listen", "127.0.0.1:0"),
            *("--unix", str(session_socket), "--pass-socket"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert fwd.stdout is not None
    return fwd, fwd.stdout.readline().split()[1]


def fetch(via: str, url: str, *flags: str) -> str:
    out = subprocess.run(
        ["curl", "-sS", "-m", "10", "--noproxy", "", "-x", f"http://{via}", *flags, url],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
    )
    return out.stdout + out.stderr


def test_the_forwarder_hands_connections_over_and_the_proxy_decides_them_as_before(
    proxy: EgressProxy, net_host: Any
) -> None:
    """``--pass-socket``: the forwarder sends each client connection to the proxy
    (SCM_RIGHTS) and keeps nothing of it, so no byte of a download passes through it; the
    proxy decides and records those requests exactly like ones on its socket."""
    loopback = Listener("127.0.0.1")
    seen: list[ProxyEvent] = []
    policy = EgressPolicy(
        domains=frozenset({net_host.address, "127.0.0.1"}), methods=frozenset({"GET"})
    )
    try:
        with proxy.open(policy, on_event=seen.append) as session:
            fwd, via = forwarder(session.socket)
            try:
                url = net_host.url("hello.txt")
                assert fetch(via, url) == "hello from the test host\n"
                assert fetch(via, url, "-p") == "hello from the test host\n"  # CONNECT
                assert "method POST is not allowed" in fetch(via, url, "-d", "x")
                host_service = f"http://127.0.0.1:{loopback.port}/"
                assert "loopback addresses are host services" in fetch(via, host_service)
                # one thread: the forwarder runs no copying threads, it holds no connection
                assert len(os.listdir(f"/proc/{fwd.pid}/task")) == 1
            finally:
                fwd.terminate()
                fwd.wait(10)
    finally:
        loopback.close()
    assert loopback.connections == 0
    assert [(e.decision, e.method) for e in seen] == [
        ("allow", "GET"),
        ("allow", "CONNECT"),
        ("deny", "POST"),
        ("deny", "GET"),
    ]
    assert seen[0].size > 25 and seen[1].size > 25


def hand_over(session_socket: Path, fds: list[int], first: bytes = b"\0") -> bytes:
    """Send ``first`` with ``fds`` (SCM_RIGHTS) on a session connection; what comes back."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(session_socket))
        s.sendmsg([first], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        return s.recv(4096)


def test_descriptors_other_than_one_stream_socket_are_closed_unused(proxy: EgressProxy) -> None:
    """What a sandbox sends on its session socket is untrusted: a pipe, a datagram socket or
    several descriptors end the connection unanswered and are closed (their other ends see
    EOF), and descriptors sent with an HTTP request are dropped, the request decided."""
    seen: list[ProxyEvent] = []
    with proxy.open(EgressPolicy(), on_event=seen.append) as session:
        read_end, write_end = os.pipe()
        assert hand_over(session.socket, [write_end]) == b""
        os.close(write_end)
        assert select.select([read_end], [], [], 10)[0] and os.read(read_end, 1) == b""
        os.close(read_end)
        datagram = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        assert hand_over(session.socket, [datagram[0].fileno()]) == b""
        for s in datagram:
            s.close()
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        with a, b, c, d:
            assert hand_over(session.socket, [a.fileno(), c.fileno()]) == b""
            a.close()
            c.close()
            b.settimeout(10)
            d.settimeout(10)
            assert b.recv(1) == b"" and d.recv(1) == b""  # both closed by the proxy
        e, f = socket.socketpair()
        with e, f:
            answer = hand_over(session.socket, [e.fileno()], b"GET / HTTP/1.1\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400")
            e.close()
            f.settimeout(10)
            assert f.recv(1) == b""
    # nothing was a request but the last, refused as no proxy request
    assert [(e.decision, e.method) for e in seen] == [("deny", "GET")]


def test_stop_ends_the_proxys_thread_and_closes_its_sessions(tmp_path: Path) -> None:
    """An engine's close stops its proxy: its loop's thread ends (it was never recorded, so
    every engine stopped in a process left one running) and a session's socket is gone."""
    p = EgressProxy(tmp_path / "egress")
    session = p.open(EgressPolicy())
    threads = [t for t in threading.enumerate() if t is p._thread]
    assert len(threads) == 1 and threads[0].is_alive()
    session.close()
    p.stop()
    assert not threads[0].is_alive()
    assert not session.socket.exists()
    p.stop()  # twice is fine


def test_the_forwarder_answers_502_when_the_session_is_gone(tmp_path: Path) -> None:
    fwd, via = forwarder(tmp_path / "gone.sock")
    try:
        assert "openwham egress" not in (answer := fetch(via, "http://example.com/", "-i"))
        assert answer.startswith("HTTP/1.1 502") and "is not reachable" in answer
    finally:
        fwd.terminate()
        fwd.wait(10)
