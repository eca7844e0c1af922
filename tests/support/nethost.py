"""A test host on its own network: an HTTP server in a network namespace of its own.

The namespace is joined to the host by a veth pair on a /30 of TEST-NET-2 (198.51.100.0/24,
an address range that is neither loopback nor private, so it stands for "a host on the
internet"). The host side of the pair is an address of this machine, which the egress proxy
must refuse like any other host address. Needs root and iproute2 (scripts/setup.sh installs
it); the test suite runs as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class NetHost:
    name: str  # the namespace
    address: str  # the test host's address (inside the namespace)
    host_side: str  # this machine's address on the veth pair
    port: int
    root: Path  # what the server serves
    server: subprocess.Popen[bytes]
    veth: str

    def url(self, path: str) -> str:
        return f"http://{self.address}:{self.port}/{path.lstrip('/')}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _free_slot(pid: int) -> int:
    """A /30 of the 64 in TEST-NET-2 that no interface of this machine has an address in,
    starting from one the pid picks: another test run (or session) on the machine may have a
    test host of its own, and two veth pairs on one /30 would route one run's requests to the
    other's server."""
    shown = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], check=True, capture_output=True, text=True
    ).stdout
    used = {
        int(word.split("/")[0].rsplit(".", 1)[1]) // 4
        for word in shown.split()
        if word.startswith("198.51.100.")
    }
    for step in range(64):
        slot = (pid + step) % 64
        if slot not in used:
            return slot
    raise RuntimeError("every /30 of 198.51.100.0/24 is in use on this machine")


def start(root: Path, port: int = 8080) -> NetHost:
    if shutil.which("ip") is None:
        raise RuntimeError("iproute2's `ip` is missing: run scripts/setup.sh")
    pid = os.getpid()
    name = f"owtest-{pid}"
    veth, peer = f"owh{pid % 100000}", f"owp{pid % 100000}"
    base = _free_slot(pid) * 4
    host_side, address = f"198.51.100.{base + 1}", f"198.51.100.{base + 2}"
    _ip("netns", "add", name)
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", name)
        _ip("addr", "add", f"{host_side}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", name, "addr", "add", f"{address}/30", "dev", peer)
        _ip("-n", name, "link", "set", peer, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                name,
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                address,
                "--directory",
                str(root),
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except BaseException:
        stop_namespace(name, veth)
        raise
    host = NetHost(name, address, host_side, port, root, server, veth)
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(host.url("/"), timeout=1).close()
            return host
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                stop(host)
                raise RuntimeError("the test host's HTTP server did not start") from None
            time.sleep(0.05)


def stop(host: NetHost) -> None:
    host.server.kill()
    host.server.wait()
    stop_namespace(host.name, host.veth)


def stop_namespace(name: str, veth: str) -> None:
    subprocess.run(["ip", "link", "del", veth], capture_output=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
