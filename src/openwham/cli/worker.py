"""``wham worker``: run attempts from the queue of a PostgreSQL database (``WHAM_EXECUTOR=queue``).

A worker needs the database (``WHAM_DATABASE_URL``), the repositories, the model upstream
and the serving nodes' keys (copy their ``keys/`` directory into its data directory); its data
directory holds only what is local to it: mirrors, attempts' workspaces and standbys.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import typer

from .common import DataDirOption, fail, settings_for


def worker(
    data_dir: Path | None = DataDirOption,
    concurrency: int | None = typer.Option(
        None,
        "--concurrency",
        min=1,
        help="Attempts run at once (default: $WHAM_EXECUTOR_CONCURRENCY, else the cores)",
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error"),
) -> None:
    """Run attempts from the job queue until stopped (SIGTERM hands running attempts back)."""
    from openwham.commands import open_runner
    from openwham.server.malloc import fix_mmap_threshold, limit_arenas, start_trimming
    from openwham.service.artifacts import check_store, open_store
    from openwham.service.keys import KeysMismatch, check_fingerprint, secrets_key, signing_key
    from openwham.store import jobs
    from openwham.store.artifacts import ArtifactError
    from openwham.store.db import Database
    from openwham.store.pgbus import event_bus

    limit_arenas()  # as `wham serve`: many short-lived threads per attempt
    fix_mmap_threshold()  # big transient blocks go back to the system at free
    start_trimming()
    settings = settings_for(data_dir).model_copy(update={"executor": "queue"})
    if concurrency is not None:
        settings = settings.model_copy(update={"executor_concurrency": concurrency})
    elif settings.executor_concurrency == 0:
        fail("WHAM_EXECUTOR_CONCURRENCY=0 leaves a worker nothing to do", hint="unset it")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for noisy in ("procrastinate", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not settings.database_url:
        fail(
            "wham worker needs the deployment's PostgreSQL database",
            hint="set WHAM_DATABASE_URL=postgresql+psycopg://USER@HOST/DB",
        )
    data = settings.resolved_data_dir
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    db = Database(settings.sqlalchemy_url, request_pool=1)
    try:
        jobs.check_database(db)
        db.migrate()
        jobs.apply_schema(db)
        with db.session() as s:
            check_fingerprint(s, settings, signing_key(settings), secrets_key(settings))
        check_store(open_store(settings, db))
    except (jobs.QueueConfigError, KeysMismatch, ArtifactError) as exc:
        fail(str(exc))
    bus = event_bus(db)
    runner = open_runner(settings, db, bus).start()
    if runner.problem or runner.executor is None:
        bus.close()
        fail(runner.problem or "this node cannot run attempts")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo(
        f"openwham worker: {settings.concurrency} attempt(s) at a time, data directory {data}",
        err=True,
    )
    while not stop.wait(1.0):
        pass
    typer.echo("openwham worker: stopping, handing running attempts back", err=True)
    runner.stop()
    bus.close()
    db.dispose()
