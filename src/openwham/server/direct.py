"""A turn stream's chunks written straight to the connection, past the ASGI ``send`` path.

With 1,000 streams on one turn, every event is 1,000 deliveries, and through ASGI each one
woke the stream's task, resumed its generator and passed the chunk through every
middleware's ``send`` wrapper (Starlette's error and exception layers, the admission gate)
to uvicorn's ``send``, which frames it and writes it to the socket: ~17 µs of the server's
CPU per delivery, ~17 ms per event at 1,000 streams, on the event loop the API shares
(docs/benchmarks.md, "Turn-stream fan-out"). A ``Sink`` lets the turn's tail write the
chunk itself, framed once for every stream at the same place in the turn, with no task
woken: one ``transport.write`` per delivery.

Only where that is safe: the server is uvicorn with its ``httptools`` protocol (what
``wham serve`` runs: uvicorn's ``auto`` picks it, ``httptools`` is a dependency), the
response's head went out through ASGI (so the middleware saw it: the admission gate gives
its slot back on it) and uvicorn chose chunked framing for the body. The stream's last
chunk (``0\\r\\n\\r\\n``) goes through ASGI ``send`` again, so uvicorn finishes the response
as its own (keep-alive, the next pipelined request). Anything else (h11, a test client,
another server, a uvicorn whose internals are not the ones checked here, HEAD) gets
``None`` from ``find`` and streams through ASGI ``send`` as before.

The server's own ``send`` reaches the response as ``scope[SERVER_SEND]``, put there by the
app before any middleware wraps it (``server/app.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import Scope


def _uvicorn_cycle() -> type | None:
    """uvicorn's httptools request cycle, for the uvicorn versions whose internals this
    module was written against and tested with (0.30 up to 1.0: ``tests/test_direct.py``
    runs the streams on the installed one); ``None`` otherwise."""
    try:
        import uvicorn
        from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
    except ImportError:  # pragma: no cover - httptools is a dependency
        return None
    try:
        version = tuple(int(part) for part in uvicorn.__version__.split(".")[:2])
    except ValueError:
        return None
    return RequestResponseCycle if (0, 30) <= version < (1, 0) else None


CYCLE = _uvicorn_cycle()

SERVER_SEND = "openwham.server_send"


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of HTTP/1.1's chunked transfer coding (``data`` not empty: an
    empty chunk ends the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class Sink:
    """Writes framed chunks to one response's transport; ``buffered``: bytes the transport
    holds unsent (the client is that far behind, beyond the kernel's socket buffers)."""

    __slots__ = ("_cycle", "buffered", "closing", "write")

    def __init__(self, cycle: Any) -> None:
        transport = cycle.transport
        self._cycle = cycle
        self.write: Callable[[bytes], None] = transport.write
        self.buffered: Callable[[], int] = transport.get_write_buffer_size
        self.closing: Callable[[], bool] = transport.is_closing

    def started(self) -> bool:
        """After the head went out through ASGI: the body is chunked and still open."""
        c = self._cycle
        return (
            c.response_started is True
            and c.chunked_encoding is True
            and c.response_complete is False
            and c.disconnected is False
        )


# What ``find`` reads of uvicorn's cycle (the class is checked too: a look-alike is refused).
_CYCLE_ATTRIBUTES = (
    "transport",
    "scope",
    "response_started",
    "response_complete",
    "chunked_encoding",
    "disconnected",
)
_TRANSPORT_METHODS = ("write", "get_write_buffer_size", "is_closing")


def find(scope: Scope) -> Sink | None:
    """The response's sink, when its server is uvicorn's httptools protocol as checked here
    and the response has not started; ``None``: stream through ASGI ``send``."""
    send = scope.get(SERVER_SEND)
    if CYCLE is None or type(getattr(send, "__self__", None)) is not CYCLE:
        return None
    cycle: Any = getattr(send, "__self__", None)
    if not all(hasattr(cycle, name) for name in _CYCLE_ATTRIBUTES):
        return None
    transport = cycle.transport
    if not all(callable(getattr(transport, name, None)) for name in _TRANSPORT_METHODS):
        return None
    if cycle.scope is not scope and cycle.scope.get(SERVER_SEND) is not send:
        return None  # not this request's cycle
    if scope.get("method") == "HEAD" or cycle.response_started or cycle.disconnected:
        return None
    return Sink(cycle)
