"""The egress proxy (sandbox/egress.py) on its own: policies, the address guard, and real
requests through a session's socket to a test host in its own network namespace and to
services on this host's loopback (which it must refuse)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
