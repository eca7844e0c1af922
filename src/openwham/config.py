"""Settings read from the environment (``WHAM_*``), one object shared by every layer."""

from __future__ import annotations

import enum
import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    """The XDG data home, so a plain ``wham serve`` never writes into the current directory."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "openwham"


class CodexMode(enum.StrEnum):
    """How the agent runtime runs the Codex CLI (``WHAM_CODEX_MODE``)."""

    EXEC = "exec"  # `codex exec --json`, the prompt first
    APP_SERVER = "app-server"  # `codex app-server`, initialize + thread/start before the prompt


class Settings(BaseSettings):
    """Every knob of openwham; names match SPEC.md's stable configuration table."""

    model_config = SettingsConfigDict(env_prefix="WHAM_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None
    #: the server's address as users reach it (links in pull requests); default: the
    #: address of the request that asked for the pull request
    public_url: str | None = None

    model_provider: str = "openai"
    model_base_url: str | None = None
    model_api_key: str | None = None
    model: str = "gpt-5.1-codex"
    # How Codex runs in an attempt's sandbox: "app-server" (the default: `codex app-server`
    # through runtimes/appserver_driver.py, a standby's Codex has its config, initialize and
    # thread/start done before the prompt; docs/design/codex-app-server.md) or "exec"
    # (`codex exec --json`, which does them after reading its prompt).
    codex_mode: CodexMode = CodexMode.APP_SERVER

    # "inprocess" runs attempts inside `wham serve`; "queue" makes them procrastinate jobs on
    # PostgreSQL, run by `wham worker` processes and serve's embedded worker (engine/queue.py);
    # "none" serves the API only (attempts stay pending until an executor picks them up).
    executor: str = "inprocess"
    # Tasks run at once (unset: the cores): in-process, a best-of-N task's attempts share one
    # slot and start together; under "queue" it counts attempts, and 0 makes `wham serve`
    # API-only.
    executor_concurrency: int | None = None
    # How often an attempt whose server died is started again before it is failed.
    attempt_max_tries: int = 2
    # Standby sandboxes kept ready (workspace cloned, Codex started and waiting for a prompt)
    # for the repository/branch/settings of recent attempts; 0 turns them off.
    standby_sandboxes: int = 4
    standby_max_age_seconds: int = 1800
    # Workspaces as overlays over a checkout made once per (repository, branch, commit) in
    # DATA_DIR/checkouts (needs root and overlayfs; else, or off, a clone per attempt), and
    # how many such checkouts are kept (least recently used beyond it, when idle, go).
    workspace_overlay: bool = True
    checkout_cache: int = 16
    # Post-setup snapshots (DATA_DIR/setup-cache; overlay layers, or copies of clone
    # workspaces): how long one is used after it was taken, and the cache's total size
    # (least recently used beyond it go).
    setup_cache_max_age_seconds: int = 43200
    setup_cache_max_mb: int = 20480

    # Limits of one attempt's sandbox.
    attempt_timeout_seconds: int = 3600
    sandbox_memory_mb: int = 4096
    sandbox_max_processes: int = 1024
    sandbox_max_file_mb: int = 1024
    sandbox_cpus: float | None = None
    # What one attempt may write to disk (its workspace, home and Codex home; the checkout
    # it starts from not counted), setup, agent and diff together; beyond it the attempt
    # fails with disk_quota_exceeded. 0 turns the budget off.
    sandbox_disk_mb: int = 10240
    # The stall watchdog: a sandbox with no output while all its processes are stopped or
    # zombies (it can never go on) for this long is killed and its attempt failed.
    attempt_stall_seconds: float = 120.0
    # The environment's setup script: its wall-clock limit.
    setup_timeout_seconds: int = 1200
    # How long a task's title may take the model; after that the prompt-derived title is used.
    title_timeout_seconds: float = 30.0
    # Private networks (comma-separated CIDRs, e.g. a package mirror at 10.1.2.3/32) that the
    # egress proxy may reach; host addresses, loopback and link-local never are.
    egress_allow_networks: str = ""
    # Where local repositories (absolute paths) may live, os.pathsep-separated. Unset: the
    # server owner's account may use any local path, other accounts none; set, it binds every
    # account. The data directory is never allowed.
    local_repo_roots: str | None = None

    # Rate limits, in attempts (assistant turns) started per window; 0 disables a window.
    rate_limit_primary: int = 100
    rate_limit_primary_window_seconds: int = 5 * 3600
    rate_limit_secondary: int = 1000
    rate_limit_secondary_window_seconds: int = 7 * 24 * 3600
    plan_type: str = "pro"

    token_ttl_seconds: int = 30 * 24 * 3600

    # The most of an attempt's diff that task details and turns carry inline (UTF-8 bytes);
    # a longer one is cut (``truncated: true``) and served whole by ``…/turns/{id}/diff``.
    # The official Codex CLI, which cannot follow that endpoint, always gets it whole.
    inline_diff_max_bytes: int = Field(default=1 << 20, ge=1024)

    # The most one artifact may hold before compression (what a later attempt reads of an
    # earlier one on another node: a completed attempt's Codex session, in the database).
    # A bigger session is not stored: follow-ups of it on other nodes say so, naming this.
    artifact_max_mb: int = Field(default=64, ge=1, le=1024)
    # Where artifacts live: "database" (the default: the table ``artifacts``) or "s3", an
    # S3-compatible bucket (which must exist) at ``artifact_s3_endpoint`` (unset: AWS S3),
    # objects under ``artifact_s3_prefix``; keys from the two settings below, else from
    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    artifact_store: Literal["database", "s3"] = "database"
    artifact_s3_endpoint: str = "https://s3.amazonaws.com"
    artifact_s3_bucket: str | None = None
    artifact_s3_prefix: str = "openwham/"
    artifact_s3_region: str = "us-east-1"
    artifact_s3_access_key_id: str | None = None
    artifact_s3_secret_access_key: str | None = None

    # API and web UI requests served at once, each with its own database connection (a pool
    # of this size, apart from the executor's); more wait in a queue of ``request_queue``
    # for at most ``request_queue_seconds``, and beyond that get 503 with Retry-After at once.
    db_pool_size: int = Field(default=10, ge=1, le=200)
    request_queue: int = Field(default=256, ge=0)
    request_queue_seconds: float = Field(default=3.0, gt=0)
    # Hot reads (task details, the lists, the feed) working in threads at once; the others
    # wait on the event loop. Each is ~0.2 ms of Python holding the GIL: more threads than
    # cores only take turns on it with the loop (docs/benchmarks.md: 10 at once served 520
    # details/s at 32 connections, 2 at once 842). None: 2 on SQLite, 4 on PostgreSQL, whose
    # reads wait on the network with the GIL released; never more than ``db_pool_size``.
    read_threads: int | None = Field(default=None, ge=1, le=200)

    @cached_property
    def resolved_data_dir(self) -> Path:
        """Absolute data directory (created on first use by the callers that write to it)."""
        return self.data_dir.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL: ``WHAM_DATABASE_URL`` or SQLite inside the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'openwham.db'}"

    @property
    def concurrency(self) -> int:
        """Slots of the executor: ``WHAM_EXECUTOR_CONCURRENCY``, else the number of cores (the
        in-process executor runs a best-of-N task's attempts in one slot, the queue's
        workers one attempt per slot)."""
        if self.executor_concurrency and self.executor_concurrency > 0:
            return self.executor_concurrency
        return max(1, len(os.sched_getaffinity(0)))

    @property
    def local_repo_root_paths(self) -> tuple[Path, ...] | None:
        """``WHAM_LOCAL_REPO_ROOTS`` as absolute real paths; ``None`` when it is not set."""
        if self.local_repo_roots is None:
            return None
        parts = (p.strip() for p in self.local_repo_roots.split(os.pathsep))
        return tuple(Path(os.path.realpath(Path(p).expanduser())) for p in parts if p)

    @property
    def keys_dir(self) -> Path:
        """Server keys live beside, not inside, the database, so a DB dump alone leaks nothing."""
        return self.resolved_data_dir / "keys"
