"""Shared fixtures: databases (SQLite and a real PostgreSQL), in-process and live servers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from openwham.config import Settings
from openwham.server.app import create_app
from openwham.server.state import AppState
from openwham.service.accounts import create_account, create_api_token, ensure_owner

PREFIXES = ("/backend-api/wham", "/api/codex")
WHAM = Path(sys.executable).with_name("wham")


# --------------------------------------------------------------------------- tiers
# Markers (registered in pyproject.toml) let the fast contract tier run alone:
#   ./scripts/test --fast   (= -m "not sandbox and not browser and not slow")
# They are given here, from what a test uses, so that no test can forget its marker:
# `scripts/test --fast` runs that tier with a bubblewrap and a Codex CLI (WHAM_CODEX_BIN) that
# refuse to start, so a test that starts either without being marked fails there.

# Modules whose tests run attempts, sandboxes or the real Codex CLI throughout (their own
# servers and helpers); single tests that run the Codex CLI carry @pytest.mark.sandbox.
SANDBOX_MODULES = {
    "test_attempt_files",
    "test_client_live",
    "test_cli_tasks",
    "test_codex_compat",
    "test_crash_batch",
    "test_engine",
    "test_engine_sandbox",
    "test_environment_setup",
    "test_pr_branches",
    "test_repo_paths",
    "test_runtime_codex",
    "test_sandbox",
    "test_scripted_model",
    "test_serve_tasks",
    "test_standby",
    "test_task_actions",
    "test_workspace",
}
SANDBOX_FIXTURES = {"engine_server", "served", "gate", "scripted_serve"}
BROWSER_FIXTURES = {"browser", "context", "page"}
# Slow: live `wham serve` processes, many `wham` command start-ups, crash tests, the TUI, the
# schemathesis fuzz.
SLOW_MODULES = {
    "test_api_fuzz",
    "test_cli_login",
    "test_codex_compat",
    "test_crash_batch",
    "test_live_server",
    "test_serve_tasks",
    "test_standby",
    "test_web_ui",
}
SLOW_FIXTURES = {"live_server"}


def pytest_report_header() -> str:
    """Which Codex mode the suite's attempts run in (``WHAM_CODEX_MODE``, as the engine reads
    it; ``WHAM_CODEX_MODE=app-server ./scripts/test …`` runs them as ``codex app-server``)."""
    return f"codex mode: {os.environ.get('WHAM_CODEX_MODE') or 'app-server (the default)'}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        module = item.module.__name__ if getattr(item, "module", None) else ""
        callspec = getattr(item, "callspec", None)
        params = set(map(str, callspec.params.values())) if callspec else set()
        if module in SANDBOX_MODULES or names & SANDBOX_FIXTURES:
            item.add_marker(pytest.mark.sandbox)
        if names & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)
        if "postgres_url" in names or "postgres" in params:
            item.add_marker(pytest.mark.postgres)
        if module in SLOW_MODULES or names & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


REFERENCE_DIR = Path(__file__).resolve().parent / "fixtures" / "wham-reference"


def reference_dir() -> Path:
    """The captured WHAM payloads copied into the project (origins and licenses in its README)."""
    return REFERENCE_DIR


# --------------------------------------------------------------------------- databases


def _postgres_admin_url() -> str:
    url = os.environ.get("WHAM_TEST_POSTGRES_URL")
    if not url:
        pytest.fail(
            "WHAM_TEST_POSTGRES_URL is not set: run the suite with ./scripts/test, "
            "which installs PostgreSQL and starts a throwaway cluster"
        )
    return url


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty database on the test cluster, dropped afterwards."""
    import psycopg

    admin = _postgres_admin_url()
    plain = admin.replace("postgresql+psycopg://", "postgresql://")
    name = f"wham_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'openwham.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs a test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


# --------------------------------------------------------------------------- clients


@dataclass
class Api:
    """A client bound to one path style and one caller's token."""

    client: httpx.Client
    token: str | None
    prefix: str = PREFIXES[0]
    headers: dict[str, str] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"{self.prefix}/{path.lstrip('/')}"

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = dict(self.headers)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(kw.pop("headers", None) or {})
        return self.client.request(method, self.url(path), headers=headers, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def patch(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("PATCH", path, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", path, **kw)

    def as_(self, token: str | None) -> Api:
        return Api(self.client, token, self.prefix, dict(self.headers))

    def styled(self, prefix: str) -> Api:
        return Api(self.client, self.token, prefix, dict(self.headers))

    # conveniences -----------------------------------------------------------

    def create_env(self, repo: Path | str, **body: Any) -> dict[str, Any]:
        payload = {"label": body.pop("label", "acme/widgets"), "repos": [str(repo)], **body}
        r = self.post("environments", json=payload)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def create_task(
        self, env_id: str, prompt: str = "Fix the failing test", **extra: Any
    ) -> dict[str, Any]:
        """``POST tasks`` with ``new_task`` (``extra``: more top-level keys)."""
        new_task = {"environment_id": env_id, **extra.pop("new_task", {})}
        return self._create({"new_task": new_task}, prompt, extra)

    def follow_up(self, task_id: str, turn_id: str, prompt: str, **spec: Any) -> dict[str, Any]:
        """``POST tasks`` with ``follow_up`` (``spec``: more ``follow_up`` keys)."""
        return self._create(
            {"follow_up": {"task_id": task_id, "turn_id": turn_id, **spec}}, prompt, {}
        )

    def _create(self, mode: dict[str, Any], prompt: str, extra: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            **mode,
            "input_items": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"content_type": "text", "text": prompt}],
                }
            ],
            **extra,
        }
        r = self.post("tasks", json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())


@dataclass
class Server:
    """An in-process app with its owner token and helpers for a second account."""

    app_state: AppState
    api: Api

    def other_account_token(self, name: str = "Other") -> str:
        with self.app_state.db.session() as s:
            account, user = create_account(s, name=name, email=f"{uuid.uuid4().hex}@example.com")
            _, token = create_api_token(
                s, self.app_state.signing_key, user, account, ttl_seconds=3600
            )
            return token

    def owner_token(self, **kw: Any) -> str:
        """A new API token (with its row) for the owner; ``kw``: ``create_api_token``'s."""
        with self.app_state.db.session() as s:
            account, user = ensure_owner(s)
            _, token = create_api_token(
                s, self.app_state.signing_key, user, account, **{"ttl_seconds": 3600, **kw}
            )
            return token


def make_server(tmp_path: Path, database_url: str, **options: Any) -> Iterator[Server]:
    """An in-process app on ``database_url``; ``options`` are extra ``Settings`` fields."""
    options.setdefault("executor", "none")  # attempts stay pending unless a test runs them
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, **options)
    app = create_app(settings)
    state: AppState = app.state.wham
    with TestClient(app, raise_server_exceptions=False) as client:
        server = Server(state, Api(client, None))
        server.api.token = server.owner_token()
        yield server
    state.db.dispose()


@pytest.fixture
def server(tmp_path: Path, sqlite_url: str) -> Iterator[Server]:
    """In-process server on SQLite."""
    yield from make_server(tmp_path, sqlite_url)


@pytest.fixture
def any_server(tmp_path: Path, database_url: str) -> Iterator[Server]:
    """In-process server, once on SQLite and once on PostgreSQL."""
    yield from make_server(tmp_path, database_url)


@pytest.fixture(params=PREFIXES)
def api(request: pytest.FixtureRequest, server: Server) -> Api:
    """The owner's client, once per path style."""
    return server.api.styled(str(request.param))


# --------------------------------------------------------------------------- git


def git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout


def make_repo(path: Path) -> Path:
    """A small git repository with one commit on ``main``."""
    path.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=path)
    (path / "README.md").write_text("# widgets\n")
    (path / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    git("add", ".", cwd=path)
    git("commit", "-q", "-m", "initial", cwd=path)
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "widgets")


def finish_turn(server: Server, turn_id: str, status: str = "completed") -> None:
    """Mark an attempt finished directly in the store (no engine runs attempts here), with
    the terminal status event the engine would write, so its stream ends at once."""
    from openwham.store import events
    from openwham.store import models as m

    with server.app_state.db.session() as s:
        turn = s.get(m.Turn, turn_id)
        assert turn is not None
        turn.turn_status = status
        payload = events.status_payload(status.capitalize(), status)
        events.append(s, turn.task_id, turn_id, events.TASK_TURN_EVENT, payload)


# --------------------------------------------------------------------------- the wham CLI


def run_cli(
    env: dict[str, str], *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``wham ARGS`` as a user runs it, with exactly ``env``."""
    return subprocess.run(
        [str(WHAM), *args],
        env=env,
        cwd=cwd,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )


def cli_user(home: Path, url: str, token: str, *login: str) -> dict[str, str]:
    """The environment of a CLI user with their own home, logged in to ``url``."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "WHAM_CONFIG_DIR": str(home / "config"),
        "CODEX_HOME": str(home / "codex"),
    }
    out = run_cli(env, "login", "--server", url, "--token", token, *login)
    assert out.returncode == 0, out.stderr
    assert f"logged in to {url}" in out.stdout
    return env


# --------------------------------------------------------------------------- live server


@dataclass
class LiveServer:
    url: str
    data_dir: Path
    process: subprocess.Popen[str]

    def token(self) -> str:
        out = subprocess.run(
            [str(WHAM), "token", "create", "--data-dir", str(self.data_dir)],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()


def start_live_server(data_dir: Path, env: dict[str, str] | None = None) -> LiveServer:
    """``wham serve --port 0`` as a real process; reads the base URL it prints."""
    proc = subprocess.Popen(
        [str(WHAM), "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.match(r"openwham (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    else:
        proc.wait(10)
        raise AssertionError("wham serve did not print its URL:\n" + "".join(lines))
    for _ in range(200):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return LiveServer(url=url, data_dir=data_dir, process=proc)


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = start_live_server(tmp_path / "live-data")
    try:
        yield srv
    finally:
        srv.process.terminate()
        try:
            srv.process.wait(10)
        except subprocess.TimeoutExpired:
            srv.process.kill()


# --------------------------------------------------------------------------- wham serve, per module


def serve_env(model: Any) -> dict[str, str]:
    """``wham serve``'s environment for running tasks against the scripted model."""
    return {
        "WHAM_MODEL_PROVIDER": "openai-compatible",
        "WHAM_MODEL_BASE_URL": model.url,
        "WHAM_MODEL_API_KEY": "sk-upstream-secret-key",
        "WHAM_MODEL": CODEX_MODEL,
        "WHAM_EXECUTOR_CONCURRENCY": "2",
    }


def stop(srv: LiveServer, sig: int = signal.SIGTERM) -> None:
    if srv.process.poll() is None:
        srv.process.send_signal(sig)
        try:
            srv.process.wait(20)
        except subprocess.TimeoutExpired:
            srv.process.kill()
            srv.process.wait(5)


@pytest.fixture(scope="module")
def model() -> Iterator[Any]:
    """One scripted model for a module (set ``model.script`` per test)."""
    from support.scripted_model import ScriptedModel

    m = ScriptedModel().start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def gate(model: Any) -> threading.Event:
    """While cleared, the model holds every request: attempts stay unfinished."""
    event = threading.Event()
    event.set()
    model.on_request = lambda body: event.wait(60) or None
    return event


@pytest.fixture(scope="module")
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    model: Any,
    gate: threading.Event,
) -> Iterator[LiveServer]:
    """One ``wham serve`` process for a module, running tasks against ``model``."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    srv = start_live_server(tmp_path_factory.mktemp(name) / "data", serve_env(model))
    try:
        yield srv
    finally:
        gate.set()
        stop(srv)


# --------------------------------------------------------------------------- running tasks

TERMINAL = ("completed", "failed", "cancelled")
CODEX_MODEL = "gpt-5.5"  # a slug Codex knows: it offers the freeform apply_patch tool


@pytest.fixture
def scripted_model() -> Iterator[Any]:
    """The scripted OpenAI-Responses server (the model is the one replaced service)."""
    from support.scripted_model import ScriptedModel

    model = ScriptedModel().start()
    try:
        yield model
    finally:
        model.stop()


def engine_settings(model: Any, **options: Any) -> dict[str, Any]:
    """Settings that run attempts in-process against the scripted model."""
    return {
        "executor": "inprocess",
        "executor_concurrency": 2,
        "model_provider": "openai-compatible",
        "model_base_url": model.url,
        "model_api_key": "sk-upstream-secret-key",
        "model": CODEX_MODEL,
        "attempt_timeout_seconds": 120,
        "sandbox_memory_mb": 2048,
        **options,
    }


@pytest.fixture
def engine_server(tmp_path: Path, sqlite_url: str, scripted_model: Any) -> Iterator[Server]:
    """An in-process server that runs attempts (sandbox, Codex, gateway) on SQLite."""
    yield from make_server(tmp_path, sqlite_url, **engine_settings(scripted_model))


@pytest.fixture
def standby_server(tmp_path: Path, sqlite_url: str, scripted_model: Any) -> Iterator[Server]:
    """``engine_server`` keeping one standby sandbox ready (``WHAM_STANDBY_SANDBOXES=1``)."""
    yield from make_server(
        tmp_path, sqlite_url, **engine_settings(scripted_model, standby_sandboxes=1)
    )


def wait_for_task(api: Api, task_id: str, timeout: float = 90.0) -> dict[str, Any]:
    """Poll ``GET tasks/{id}`` until the current attempt is terminal; returns the details."""
    deadline = time.monotonic() + timeout
    while True:
        r = api.get(f"tasks/{task_id}")
        assert r.status_code == 200, r.text
        details = dict(r.json())
        turn = details.get("current_assistant_turn") or {}
        if turn.get("turn_status") in TERMINAL:
            return details
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} still {turn.get('turn_status')}: {turn}")
        time.sleep(0.1)


def completed_task(
    api: Api, model: Any, env_id: str, prompt: str, script: list[Any]
) -> tuple[str, str, dict[str, Any]]:
    """Run a task whose agent follows ``script``; asserts that its attempt completed.
    Returns the task id, the attempt id and the task's details."""
    model.script = script
    created = api.create_task(env_id, prompt)
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    details = wait_for_task(api, task_id)
    turn = details["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    return task_id, turn_id, details


def wait_stored(server: Server, turn_id: str, timeout: float = 30.0) -> bytes:
    """Until a completed attempt's end has stored its Codex session (``ArtifactStore``) and
    removed its directory (every node reads the session from the store); returns the
    stored archive."""
    store = server.app_state.artifacts
    directory = server.app_state.settings.resolved_data_dir / "attempts" / turn_id
    deadline = time.monotonic() + timeout
    while not store.present([turn_id], "codex-home") or directory.exists():
        assert time.monotonic() < deadline, f"attempt {turn_id}: session never stored"
        time.sleep(0.02)
    data = store.get(turn_id, "codex-home")
    assert data is not None
    return data


def wait_for_turn(
    api: Api, task_id: str, turn_id: str, until: Any = None, timeout: float = 90.0
) -> dict[str, Any]:
    """Poll one turn until ``until(turn)`` (default: terminal); returns the turn."""
    check = until or (lambda t: t.get("turn_status") in TERMINAL)
    deadline = time.monotonic() + timeout
    while True:
        r = api.get(f"tasks/{task_id}/turns/{turn_id}")
        assert r.status_code == 200, r.text
        turn = dict(r.json()["turn"])
        if check(turn):
            return turn
        if time.monotonic() > deadline:
            raise AssertionError(f"turn {turn_id} never matched: {turn}")
        time.sleep(0.05)


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Frames of an event stream: each ``{"id", "event", "data"}`` (data parsed as JSON)."""
    import json

    frames = []
    for block in text.split("\n\n"):
        frame: dict[str, Any] = {}
        data = []
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "data":
                data.append(value)
            elif key in ("id", "event"):
                frame[key] = value
        if data:
            frame["data"] = json.loads("\n".join(data))
            frames.append(frame)
    return frames


def diff_of(details: dict[str, Any]) -> str:
    """The diff ``codex apply`` would take: ``current_diff_task_turn``'s ``pr`` item."""
    turn = details.get("current_diff_task_turn") or {}
    for item in turn.get("output_items") or []:
        if item.get("type") == "pr":
            return str(item["output_diff"]["diff"])
    return ""


@pytest.fixture(scope="session")
def net_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A test host on a network of its own (support/nethost.py), serving ``hello.txt``."""
    from support import nethost

    root = tmp_path_factory.mktemp("nethost")
    (root / "hello.txt").write_text("hello from the test host\n")
    host = nethost.start(root)
    try:
        yield host
    finally:
        nethost.stop(host)
