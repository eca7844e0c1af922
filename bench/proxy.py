"""Egress proxy overhead (issue 19): a 10 MB download through the agent's egress path vs direct.

    python -m bench.proxy [--runs N] [--mb N] [--rate R] [--tree DIR ...]

The test host is an HTTP server in a network namespace of its own (tests/support/nethost.py,
as the tests use; needs root and iproute2). *Direct* is curl to its address. *Proxied* is the
agent's whole path out: curl with ``http_proxy`` at the forwarder (``gateway/forwarder.py``,
which runs inside the sandbox and here on loopback), the forwarder to the session's UNIX
socket, the egress proxy (``sandbox/egress.py``, policy ``all`` and the address guard) to the
test host. Both plain HTTP (the proxy parses and forwards the request) and a CONNECT tunnel
(how HTTPS goes) are measured. Target: proxied at most 1.2 times direct (median).

*Bare relay* is the floor of any proxy on this machine: one more TCP hop and nothing else (a
loopback listener that connects to the test host and moves both directions with the proxy's
own splice loop, no proxy protocol, no policy, no forwarder). What the proxy costs above it is
what its design controls; what the relay costs above direct is the hop itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openwham.gateway import forwarder
from openwham.sandbox import egress

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from support import nethost  # noqa: E402


def fetch(url: str, *flags: str) -> float:
    """Seconds for one curl download of ``url`` (the body thrown away, its size checked)."""
    started = time.perf_counter()
    out = subprocess.run(
        [
            *("curl", "-sS", "--fail", "--noproxy", "", "-o", "/dev/null"),
            *("-w", "%{size_download}", *flags, url),
        ],
        check=True,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
    )
    elapsed = time.perf_counter() - started
    fetch.size = int(out.stdout)  # type: ignore[attr-defined]
    return elapsed


def cpu(forwarder: int | None) -> float:
    """CPU seconds so far of this process (where the proxies run: one download at a time, so
    a download's share is the difference) and of ``forwarder`` (clock ticks, summed over the
    runs)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    if forwarder is not None:
        fields = Path(f"/proc/{forwarder}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def summary(name: str, times: list[float], size: int) -> str:
    med = statistics.median(times)
    return (
        f"{name:<22} min {min(times) * 1000:7.1f} ms  median {med * 1000:7.1f} ms  "
        f"max {max(times) * 1000:7.1f} ms  ({size / med / 1e6:6.0f} MB/s)"
    )


@dataclass
class Path_:
    """One tree's way out: its egress proxy with a session and its forwarder in front."""

    label: str
    proxy: Any
    session: Any
    forwarder: subprocess.Popen[str]
    via: str


class BareRelay:
    """One relay hop and nothing else: accept on loopback, connect to ``target``, splice both
    ways with the egress proxy's ``_copy`` in two threads, close both once both are done."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, name="bare-relay", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _relay(client: socket.socket, upstream: socket.socket) -> None:
        up = threading.Thread(target=egress._copy, args=(client, upstream), daemon=True)
        up.start()
        egress._copy(upstream, client)
        up.join(timeout=5)
        client.close()
        upstream.close()

    def close(self) -> None:
        self.listener.close()


def _egress_of(tree: Path | None) -> Any:
    """The egress module of ``tree`` (``None``: this one), loaded under a name of its own."""
    if tree is None:
        return egress
    name = f"_bench_egress_{abs(hash(str(tree)))}"
    spec = importlib.util.spec_from_file_location(
        name, tree / "src" / "openwham" / "sandbox" / "egress.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def open_path(tree: Path | None, tmp: Path, events: list[Any]) -> Path_:
    module = _egress_of(tree)
    script = (
        Path(forwarder.__file__)
        if tree is None
        else tree / "src" / "openwham" / "gateway" / "forwarder.py"
    )
    directory = tmp / f"egress-{len(list(tmp.iterdir()))}"
    proxy = module.EgressProxy(directory, module.AddressGuard())
    session = proxy.open(module.agent_policy("all", [], False), events.append)
    passing = ["--pass-socket"] if "--pass-socket" in script.read_text() else []
    fwd = subprocess.Popen(
        [
            *(sys.executable, "-I", str(script), "--listen", "127.0.0.1:0"),
            *("--unix", str(session.socket), *passing),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert fwd.stdout is not None
    listen = fwd.stdout.readline().split()[1]
    label = "" if tree is None else f" {tree.name}"
    return Path_(label, proxy, session, fwd, f"http://{listen}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mb", type=int, default=10)
    parser.add_argument(
        "--rate",
        help="shape the test host's link (tc tbf rate, e.g. 1gbit, 100mbit): an internet-like "
        "link instead of veth speed",
    )
    parser.add_argument(
        "--tree",
        action="append",
        type=Path,
        default=[],
        help="a source tree whose egress proxy and forwarder to measure (repeatable; "
        "interleaved with the others; default: this one)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wham-bench-proxy-") as tmp:
        root = Path(tmp) / "www"
        root.mkdir()
        (root / "big.bin").write_bytes(os.urandom(args.mb * 1024 * 1024))
        host = nethost.start(root)
        if args.rate:  # on the test host's side of the pair: what it sends, the download
            peer = host.veth.replace("owh", "owp", 1)
            subprocess.run(
                [
                    *("ip", "netns", "exec", host.name, "tc", "qdisc", "add", "dev", peer),
                    *("root", "tbf", "rate", args.rate, "burst", "1mb", "latency", "100ms"),
                ],
                check=True,
            )
        events: list[Any] = []
        paths: list[Path_] = []
        relay: BareRelay | None = None
        try:
            for tree in args.tree or [None]:
                paths.append(open_path(tree, Path(tmp), events))
            url = host.url("big.bin")
            parts = urllib.parse.urlsplit(url)
            assert parts.hostname is not None and parts.port is not None
            relay = BareRelay((parts.hostname, parts.port))
            relayed = f"http://127.0.0.1:{relay.port}{parts.path}"
            flags: dict[str, tuple[str, ...]] = {"direct": (), "bare relay": ()}
            for p in paths:
                flags[f"proxy (HTTP){p.label}"] = ("-x", p.via)
                flags[f"proxy (CONNECT){p.label}"] = ("-p", "-x", p.via)
            series: dict[str, list[float]] = {name: [] for name in flags}
            spent = dict.fromkeys(flags, 0.0)  # CPU seconds of the proxy and its forwarder
            owner = {
                name: p.forwarder.pid for p in paths for name in flags if name.endswith(p.label)
            }
            for name in series:  # warm-up: page cache, the proxy's loop, the forwarder
                fetch(relayed if name == "bare relay" else url, *flags[name])
            for _ in range(args.runs):  # interleaved so a slow spell hits every series
                for name in series:
                    before = cpu(owner.get(name))
                    series[name].append(
                        fetch(relayed if name == "bare relay" else url, *flags[name])
                    )
                    spent[name] += cpu(owner.get(name)) - before
            size = fetch.size  # type: ignore[attr-defined]
            assert size == args.mb * 1024 * 1024, size
            link = f", link shaped to {args.rate}" if args.rate else ""
            print(f"{args.mb} MB download, {args.runs} runs each, test host {host.address}{link}")
            print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
            for name, times in series.items():
                print(summary(name, times, size))
            direct = statistics.median(series["direct"])
            base = spent["direct"] / args.runs * 1000  # this process starting curl
            for name in list(series)[1:]:
                ratio = statistics.median(series[name]) / direct
                work = spent[name] / args.runs * 1000 - base
                print(
                    f"ratio {name} / direct (median): {ratio:.2f}; CPU per download in the "
                    f"proxy and the forwarder {work:.1f} ms"
                )
            floor = statistics.median(series["bare relay"])
            for name in list(series)[2:]:
                ratio = statistics.median(series[name]) / floor
                print(f"ratio {name} / bare relay (median): {ratio:.2f}")
            big = [e for e in events if e.decision == "allow"]
            print(f"proxy events: {len(big)} allowed, bytes of the last: {big[-1].size}")
        finally:
            for p in paths:
                p.forwarder.terminate()
                p.forwarder.wait()
                p.session.close()
                p.proxy.stop()
            if relay is not None:
                relay.close()
            nethost.stop(host)


if __name__ == "__main__":
    main()
