"""``wham serve``: API, web UI and executor with embedded defaults."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import typer

from .common import DataDirOption, settings_for


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on"),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0 picks a free one)"),
    data_dir: Path | None = DataDirOption,
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error"),
    as_json: bool = typer.Option(
        False, "--json", help="Print the addresses as one JSON line instead of text"
    ),
    processes: int = typer.Option(
        1,
        "--processes",
        min=1,
        max=64,
        help="API processes on the port (more than one uses more cores for requests; "
        "PostgreSQL with WHAM_EXECUTOR=queue only; the first also runs the executor)",
    ),
    listen_fd: int | None = typer.Option(
        None, "--listen-fd", hidden=True, help="Serve on this inherited listening socket"
    ),
) -> None:
    """Start openwham and print its base URL."""
    import uvicorn

    from openwham.server import processes as api_processes
    from openwham.server.app import create_app
    from openwham.server.gcpause import freeze_startup
    from openwham.server.malloc import fix_mmap_threshold, limit_arenas, start_trimming
    from openwham.service.keys import KeysMismatch
    from openwham.store.artifacts import ArtifactError
    from openwham.store.jobs import QueueConfigError

    limit_arenas()  # before any thread: many short-lived ones fragment per-thread arenas
    fix_mmap_threshold()  # big transient blocks go back to the system at free
    start_trimming()  # freed memory between blocks in use back to the system, every 10 s
    settings = settings_for(data_dir)
    problem = api_processes.problem(settings, processes)
    if problem is not None:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations are routine on start
    try:
        app = create_app(settings)
    except (KeysMismatch, ArtifactError, QueueConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    freeze_startup()  # the app's objects live as long as the process: full collections skip them
    if listen_fd is not None:  # one of the extra API processes of a `--processes` server
        sock = socket.socket(fileno=listen_fd)
        _run(uvicorn, app, log_level, sock)
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror}", err=True)
        raise typer.Exit(1) from exc
    sock.listen(1024 if processes > 1 else 128)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{actual}"
    if as_json:
        info = {
            "url": url,
            "data_dir": str(settings.resolved_data_dir),
            "api": [f"{url}/backend-api/wham", f"{url}/api/codex"],
        }
        typer.echo(json.dumps(info))
    else:
        typer.echo(f"openwham {url}", err=False)
        typer.echo(f"  data directory: {settings.resolved_data_dir}")
        typer.echo(f"  API: {url}/backend-api/wham  and  {url}/api/codex")
        typer.echo(f"  token: wham token create --data-dir {settings.resolved_data_dir}")
    extra = None
    if processes > 1:
        extra = api_processes.ApiProcesses(
            sock, processes - 1, settings.resolved_data_dir, log_level
        ).start()
    try:
        _run(uvicorn, app, log_level, sock, extra)
    finally:
        if extra is not None:  # uvicorn returned without a signal (it re-raises one it got)
            extra.stop()


def _run(uvicorn: Any, app: Any, log_level: str, sock: socket.socket, extra: Any = None) -> None:
    # open event streams must not hold a stopping server: they are cut after 5 s
    config = uvicorn.Config(
        app, log_level=log_level.lower(), access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    if extra is not None:
        server = _with_processes(uvicorn, config, extra)
    server.run(sockets=[sock])


def _with_processes(uvicorn: Any, config: Any, extra: Any) -> Any:
    """A uvicorn server that stops the extra API processes as it shuts down (uvicorn raises a
    signal it caught again once it stopped, which ends the process before any ``finally``)."""
    import asyncio

    class Server(uvicorn.Server):  # type: ignore[misc]
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            stopping = asyncio.get_running_loop().run_in_executor(None, extra.stop)
            await super().shutdown(sockets)
            await stopping

    return Server(config)
