"""The official Codex CLI as a user runs it against openwham, and a proxy that records its calls.

Two pinned releases (npm lockfiles, installed by ``scripts/setup.sh --with-postgres``):
``tools/codex-cloud`` holds 0.151.0, the last ``codex cloud`` that accepts a custom
``CODEX_CLOUD_TASKS_BASE_URL``; ``tools/codex`` holds the current CLI (the agent runtime),
whose top-level ``codex apply`` follows ``chatgpt_base_url``.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from openwham.runtimes.codex_cli import native_binary, pinned_version, tools_dir
from support.app_thread import AppThread

CLOUD_DIR = tools_dir().parent / "codex-cloud"
CLOUD_VERSION = "0.151.0"


def cloud_binary() -> Path:
    """Codex CLI 0.151.0's native binary (``tools/codex-cloud``)."""
    assert pinned_version(CLOUD_DIR) == CLOUD_VERSION
    return native_binary(CLOUD_DIR)


def current_binary() -> Path:
    """The current pinned Codex CLI (``tools/codex``, the agent runtime)."""
    return native_binary()


@dataclass
class CodexUser:
    """A user's clean environment: ``home`` is both HOME and CODEX_HOME."""

    home: Path

    def env(self, base_url: str | None = None) -> dict[str, str]:
        """The whole environment the CLI runs with (``CODEX_CLOUD_TASKS_BASE_URL`` if given)."""
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "CODEX_HOME": str(self.home)}
        if base_url is not None:
            env["CODEX_CLOUD_TASKS_BASE_URL"] = base_url
        return env

    def run(
        self,
        binary: Path,
        *args: str,
        cwd: Path,
        base_url: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), *args],
            cwd=cwd,
            env=self.env(base_url),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cloud(
        self, *args: str, cwd: Path, base_url: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``codex cloud ARGS`` with Codex CLI 0.151.0 and ``CODEX_CLOUD_TASKS_BASE_URL``."""
        return self.run(cloud_binary(), "cloud", *args, cwd=cwd, base_url=base_url, timeout=timeout)


@dataclass
class Call:
    method: str
    path: str
    query: str
    headers: dict[str, str]


_HOP_BY_HOP = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


@dataclass
class RecordingProxy:
    """A plain HTTP reverse proxy to ``upstream`` that records every request it forwards."""

    upstream: str
    calls: list[Call] = field(default_factory=list)
    url: str = ""
    _runner: AppThread = field(default_factory=AppThread)

    def paths(self) -> list[str]:
        return [c.path for c in self.calls]

    async def _forward(self, request: Request) -> Response:
        self.calls.append(
            Call(
                request.method,
                request.url.path,
                request.url.query,
                {k.lower(): v for k, v in request.headers.items()},
            )
        )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        target = self.upstream + request.url.path
        if request.url.query:
            target += "?" + request.url.query
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.request(
                request.method, target, headers=headers, content=await request.body()
            )
        out = {
            k: v
            for k, v in r.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"
        }
        return Response(r.content, status_code=r.status_code, headers=out)

    def start(self) -> RecordingProxy:
        app = Starlette(
            routes=[
                Route(
                    "/{path:path}",
                    self._forward,
                    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                )
            ]
        )
        self.url = self._runner.start(app)
        return self

    def stop(self) -> None:
        self._runner.stop()
