"""TCP → UNIX socket forwarder, run inside the sandbox (standard library only).

    python3 -I forwarder.py --listen 127.0.0.1:PORT --unix /run/wham/gateway.sock

The sandbox has its own network namespace with nothing but loopback; the model gateway's
UNIX socket is bind-mounted in. This process listens on loopback TCP (the agent's provider
``base_url`` is ``http://127.0.0.1:PORT/v1``) and pipes every connection to the socket, both
directions streamed by splice(2) in threads (no Python per chunk), half-close passed on.
With ``--pass-socket`` (the egress proxy's forwarder) it copies nothing: each connection
is sent to the socket's server (a NUL byte with its descriptor, SCM_RIGHTS), which serves it.
Once listening it prints one line to stdout, ``ready HOST:PORT`` (the actual port when PORT
is 0), and flushes. SIGTERM / SIGINT stop it.

When the gateway socket cannot be reached, the connection gets an HTTP 502 with an
OpenAI-shaped error instead of a bare reset, so the agent's log says what is wrong.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import threading

CHUNK = 1024 * 1024


def _copy(src: socket.socket, dst: socket.socket) -> bool:
    """Copy until EOF with splice(2) through a pipe (no copy into Python, no event-loop
    wake-up per chunk), then half-close the other side; False when a side broke. Runs in a
    thread of its own; a shutdown of either socket ends it."""
    if not hasattr(os, "splice"):  # Python before 3.10 in the sandbox
        try:
            while data := src.recv(CHUNK):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        return True
    out, into = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(into, fcntl.F_SETPIPE_SZ, CHUNK)
        try:
            while n := os.splice(src.fileno(), into, CHUNK):
                while n:
                    n -= os.splice(out, dst.fileno(), n)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        return True
    finally:
        os.close(out)
        os.close(into)


def _in_thread(src: socket.socket, dst: socket.socket) -> asyncio.Future[bool]:
    """:func:`_copy` in a thread of its own, as a future of the running loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()

    def settle(ok: bool) -> None:
        if not done.done():
            done.set_result(ok)

    def run() -> None:
        ok = False
        try:
            ok = _copy(src, dst)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone (stopping)
                loop.call_soon_threadsafe(settle, ok)

    threading.Thread(target=run, name="forward", daemon=True).start()
    return done


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
    loop = asyncio.get_running_loop()
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    upstream.setblocking(False)
    try:
        await loop.sock_connect(upstream, unix_path)
    except OSError as error:
        upstream.close()
        with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
            # Let the client finish its request head first, then answer and close.
            await asyncio.wait_for(client_reader.readuntil(b"\r\n\r\n"), 5)
            client_writer.write(_unavailable(unix_path, error))
            await client_writer.drain()
        await _close(client_writer)
        return
    # The client's socket taken from asyncio: a blocking duplicate (closing the transport
    # closes asyncio's descriptor only) and what its reader had read already.
    transport = client_writer.transport
    transport.pause_reading()  # type: ignore[attr-defined]
    early = bytes(getattr(client_reader, "_buffer", b""))  # no public way to get these
    client = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    transport.abort()
    pending: set[asyncio.Future[bool]] = set()
    try:
        if early:
            await loop.sock_sendall(upstream, early)
        client.setblocking(True)
        upstream.setblocking(True)  # splice(2) waits in the threads, not in the loop
        pending = {_in_thread(client, upstream), _in_thread(upstream, client)}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not task.result() for task in done):
                break  # one side reset: tear both down
    except (ConnectionError, OSError):
        pass
    finally:
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            await asyncio.gather(*pending)  # the threads end once their sockets are shut
        client.close()
        upstream.close()


async def _hand_over(unix_path: str, conn: socket.socket) -> None:
    """``--pass-socket``: send the client's connection itself to the socket's server (a NUL
    byte with its descriptor, SCM_RIGHTS), which then serves it directly: nothing of the
    connection passes through this process. Unreachable: the 502 as in :func:`_handle`."""
    loop = asyncio.get_running_loop()
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    upstream.setblocking(False)
    try:
        await loop.sock_connect(upstream, unix_path)
        upstream.sendmsg(
            [b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))]
        )
    except OSError as error:
        upstream.close()
        with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
            reader, writer = await asyncio.open_connection(sock=conn)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(_unavailable(unix_path, error))
            await writer.drain()
            await _close(writer)
        conn.close()
        return
    upstream.close()
    conn.close()  # the server holds the connection now


async def _serve_passing(listener: socket.socket, unix_path: str) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    while True:
        try:
            conn, _ = await loop.sock_accept(listener)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        task = asyncio.ensure_future(_hand_over(unix_path, conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _main(listen: tuple[str, int], unix_path: str, pass_socket: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(unix_path, reader, writer)

    if pass_socket:
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        listener = socket.create_server(listen, family=family, backlog=128)
        listener.setblocking(False)
        name = listener.getsockname()
        passing = asyncio.ensure_future(_serve_passing(listener, unix_path))
    else:
        server = await asyncio.start_server(handle, listen[0], listen[1], reuse_address=True)
        name = server.sockets[0].getsockname()
    host, port = name[:2]
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(f"ready {shown}:{port}\n")
    sys.stdout.flush()
    if pass_socket:
        await stop.wait()
        passing.cancel()
        listener.close()
        return
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, type=_parse_listen, help="HOST:PORT")
    parser.add_argument("--unix", required=True, help="the gateway's UNIX socket")
    parser.add_argument(
        "--pass-socket",
        action="store_true",
        help="hand each connection to the socket's server (SCM_RIGHTS; the egress proxy)",
    )
    args = parser.parse_args(argv)
    asyncio.run(_main(args.listen, args.unix, args.pass_socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())
