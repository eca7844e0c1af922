"""Private git remotes on loopback for the git credential tests: git's smart-HTTP server
(``git http-backend``) behind a small HTTP server that demands Basic auth, and OpenSSH's
sshd on a free port with a test key (Debian's openssh-server, installed by
``scripts/setup.sh --with-postgres``)."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class SmartHttpGit:
    """``http://127.0.0.1:PORT/<path under root>``: every request needs Basic
    ``user:token``; a wrong or missing one is a 401 with ``WWW-Authenticate``."""

    def __init__(self, root: Path, user: str, token: str) -> None:
        self.root, self.user, self.token = root, user, token
        self.seen_auth: list[str] = []  # the Authorization headers received
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer._serve(self)

            def do_POST(self) -> None:
                outer._serve(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> SmartHttpGit:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _serve(self, req: BaseHTTPRequestHandler) -> None:
        header = req.headers.get("Authorization") or ""
        self.seen_auth.append(header)
        self.paths.append(req.path)
        want = "Basic " + base64.b64encode(f"{self.user}:{self.token}".encode()).decode()
        if header != want:
            req.send_response(401)
            req.send_header("WWW-Authenticate", 'Basic realm="git"')
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        path, _, query = req.path.partition("?")
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        if req.headers.get("Transfer-Encoding") == "chunked":
            body = _read_chunked(req)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REMOTE_USER": self.user,
            "REMOTE_ADDR": "127.0.0.1",
            "REQUEST_METHOD": req.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": req.headers.get("Content-Type") or "",
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_CONTENT_ENCODING": req.headers.get("Content-Encoding") or "",
            "HTTP_GIT_PROTOCOL": req.headers.get("Git-Protocol") or "",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": str(self.root),
        }
        proc = subprocess.run(
            ["git", "-c", "http.receivepack=true", "http-backend"],
            input=body,
            env=env,
            capture_output=True,
            check=False,
        )
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = proc.stdout.partition(b"\n\n")
        status = 200
        headers: list[tuple[str, str]] = []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        req.send_response(status)
        for name, value in headers:
            req.send_header(name, value)
        req.send_header("Content-Length", str(len(payload)))
        req.end_headers()
        req.wfile.write(payload)


def _read_chunked(req: BaseHTTPRequestHandler) -> bytes:
    out = b""
    while True:
        size = int(req.rfile.readline().strip().split(b";")[0], 16)
        if size == 0:
            req.rfile.readline()
            return out
        out += req.rfile.read(size)
        req.rfile.readline()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SSHD = "/usr/sbin/sshd"


def keygen(path: Path) -> str:
    """A new ed25519 key at ``path``; its public line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "wham-test", "-f", str(path)],
        check=True,
    )
    return (
        path.with_suffix(".pub").read_text().strip()
        if path.suffix
        else Path(f"{path}.pub").read_text().strip()
    )


class SshGit:
    """sshd on 127.0.0.1:PORT that lets ``client_pub`` in as the current user (git's
    ``git-upload-pack`` / ``git-receive-pack`` then serve paths on this machine)."""

    def __init__(self, directory: Path, client_pub: str) -> None:
        if not os.path.exists(SSHD):
            raise RuntimeError(f"{SSHD} is missing: run scripts/setup.sh --with-postgres")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.host_key = directory / "host_ed25519"
        keygen(self.host_key)
        (directory / "authorized_keys").write_text(client_pub + "\n")
        os.chmod(directory / "authorized_keys", 0o600)
        self.port = free_port()
        self.user = (
            os.environ.get("USER")
            or subprocess.run(
                ["id", "-un"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        config = directory / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {directory / 'authorized_keys'}\n"
            f"PidFile {directory / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "PermitRootLogin prohibit-password\nStrictModes no\n"
            f"SetEnv PATH={os.environ.get('PATH', '/usr/bin:/bin')}\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def known_hosts(self) -> str:
        """The known_hosts line for this server (``[127.0.0.1]:PORT keytype key``)."""
        kind, key = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {key}"

    def url(self, path: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def start(self) -> SshGit:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation dir
        self._proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "sshd.log", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self._proc.poll() is not None:
                raise RuntimeError((self.dir / "sshd.log").read_text())
            time.sleep(0.05)
        raise RuntimeError("sshd did not listen")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)


def bare_copy(source: Path, dest: Path) -> Path:
    """A bare clone of ``source`` at ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(source), str(dest)], check=True)
    shutil.rmtree(dest / "hooks", ignore_errors=True)
    return dest
