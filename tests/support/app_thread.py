"""An ASGI app served by uvicorn on 127.0.0.1 at a free port, in a daemon thread: the test
stand-ins (scripted model, issuer, recording proxy) all run this way."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class AppThread:
    """``start(app)`` returns ``http://127.0.0.1:PORT`` once the server accepts requests;
    ``config``: more ``uvicorn.Config`` options (``http="h11"``)."""

    def __init__(self) -> None:
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, app: Any, **config: Any) -> str:
        # IPPROTO_TCP spelled out: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
        # proto says TCP, and ``socket.socket()`` has proto 0. With Nagle on, every streamed
        # event after the first waited ~40 ms for the client's delayed ACK on a kept-alive
        # connection, which real servers do not do.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
