"""TCP → UNIX socket forwarder, run inside the sandbox (standard library only).

    python3 -I forwarder.py --listen 127.0.0.1:PORT --unix /run/wham/gateway.sock

The sandbox has its own network namespace with nothing but loopback; the model gateway's
UNIX socket is bind-mounted in. This process listens on loopback TCP (the agent's provider
``base_url`` is ``http://127.0.0.1:PORT/v1``) and pipes every connection to the socket, both
directions streamed, half-close passed on. Once listening it prints one line to stdout,
``ready HOST:PORT`` (the actual port when PORT is 0), and flushes. SIGTERM / SIGINT stop it.

When the gateway socket cannot be reached, the connection gets an HTTP 502 with an
OpenAI-shaped error instead of a bare reset, so the agent's log says what is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys

CHUNK = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Copy until EOF, then half-close the other side; False when a side broke."""
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        return False
    try:
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        return False
    return True


def _unavailable(path: str, error: OSError) -> bytes:
    message = (
        f"the openwham model gateway at {path} is not reachable from the sandbox "
        f"({error.strerror or error}): is `wham serve` running?"
    )
    body = json.dumps(
        {"error": {"message": message, "type": "server_error", "code": "gateway_unavailable"}}
    ).encode()
    head = (
        "HTTP/1.1 502 Bad Gateway\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


async def _handle(
    unix_path: str, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(unix_path)
    except OSError as error:
        with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
            # Let the client finish its request head first, then answer and close.
            await asyncio.wait_for(client_reader.readuntil(b"\r\n\r\n"), 5)
            client_writer.write(_unavailable(unix_path, error))
            await client_writer.drain()
        await _close(client_writer)
        return
    up = asyncio.ensure_future(_pipe(client_reader, upstream_writer))
    down = asyncio.ensure_future(_pipe(upstream_reader, client_writer))
    try:
        pending: set[asyncio.Future[bool]] = {up, down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not task.result() for task in done):
                break  # one side reset: tear both down
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        await _close(upstream_writer)
        await _close(client_writer)


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _main(listen: tuple[str, int], unix_path: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(unix_path, reader, writer)

    server = await asyncio.start_server(handle, listen[0], listen[1], reuse_address=True)
    host, port = server.sockets[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(f"ready {shown}:{port}\n")
    sys.stdout.flush()
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, type=_parse_listen, help="HOST:PORT")
    parser.add_argument("--unix", required=True, help="the gateway's UNIX socket")
    args = parser.parse_args(argv)
    asyncio.run(_main(args.listen, args.unix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
