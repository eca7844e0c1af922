"""Serving the gateway on a host UNIX socket (bind-mounted into each sandbox).

The socket is ``DATA_DIR/run/gateway.sock``: mode 0666 inside a 0711 directory, so a
sandbox's unprivileged uid can connect to it (and needs an attempt token to get anywhere)
while nobody can list the directory. Inside the sandbox ``forwarder.py`` turns it into
``http://127.0.0.1:PORT/v1`` for the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from openwham.config import Settings
from openwham.gateway.app import Gateway

# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def default_socket_path(settings: Settings) -> Path:
    return settings.resolved_data_dir / "run" / "gateway.sock"


def forwarder_path() -> Path:
    """The stdlib-only forwarder script to run inside the sandbox (``python3 -I <path>``)."""
    return Path(__file__).resolve().with_name("forwarder.py")


def bind_unix_socket(path: Path) -> socket.socket:
    """A listening socket at ``path`` (0666, directory 0711); a stale socket is replaced."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"gateway socket path is too long for a UNIX socket: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o711)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left behind by a gateway that is gone
        else:
            raise OSError(f"another model gateway is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o666)
        sock.listen(256)
    except BaseException:
        sock.close()
        raise
    return sock


class GatewayServer:
    """uvicorn serving ``gateway.app()`` on a UNIX socket, in a thread or in a running loop."""

    def __init__(self, gateway: Gateway, socket_path: Path) -> None:
        self.gateway = gateway
        self.socket_path = socket_path
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._inode: int | None = None

    def _bind(self) -> socket.socket:
        sock = bind_unix_socket(self.socket_path)
        self._inode = self.socket_path.stat().st_ino
        return sock

    def _unlink(self) -> None:
        """Remove our socket file (not one a newer gateway has put in its place)."""
        with contextlib.suppress(FileNotFoundError):
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()

    def _app(self) -> ASGIApp:
        gateway = self.gateway
        inner = gateway.app()

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            try:
                yield
            finally:
                await gateway.aclose()

        wrapper = Starlette(lifespan=lifespan)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                await wrapper(scope, receive, send)
            else:
                await inner(scope, receive, send)

        return app

    def _make_server(self) -> uvicorn.Server:
        config = uvicorn.Config(
            self._app(),
            lifespan="on",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=75,
            timeout_graceful_shutdown=2,
        )
        return uvicorn.Server(config)

    async def serve(self) -> None:
        """Serve in the current event loop until :meth:`stop` (or cancellation)."""
        sock = self._bind()
        self._server = self._make_server()
        try:
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()
            self._unlink()

    def start(self, timeout: float = 10.0) -> GatewayServer:
        """Serve from a daemon thread with its own event loop; returns once listening."""
        sock = self._bind()
        server = self._server = self._make_server()

        def run() -> None:
            try:
                # uvicorn's choice of loop (uvloop when installed), as `wham serve` gets it
                with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
                    runner.run(server.serve(sockets=[sock]))
            except BaseException as exc:  # reported by start() / stop()
                self._error = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name="openwham-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the model gateway did not start: {self._error!r}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._unlink()
