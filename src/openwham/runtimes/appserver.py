"""Codex as ``codex app-server`` (``WHAM_CODEX_MODE=app-server``, docs/design/codex-app-server.md).

A standby's Codex does its config load, ``initialize`` and ``thread/start`` before the prompt
arrives (in ``exec`` mode they follow it): the launcher runs the in-sandbox driver
(``appserver_driver.py``) instead of ``codex exec``, and the driver relays the app-server's
notifications as JSON lines. :class:`AppServerTranslator` maps each to the ``codex exec
--json`` events it stands for (as ``codex exec``'s own JSONL output does at 0.169.0) and
feeds them to the same :class:`~openwham.runtimes.codex.EventTranslator`, so the work log,
status lines, final message and outcome are exec's.
"""

from __future__ import annotations

import enum
import json
import re
import signal
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from openwham.config import CodexMode

from . import codex
from .codex import CodexRuntime, EventTranslator, Outcome, Update
from .codex_cli import pinned_version

SANDBOX_DRIVER = "/opt/openwham/appserver_driver.py"


class TurnStatus(enum.StrEnum):
    """``Turn.status`` of the app-server protocol (schema ``TurnStatus``)."""

    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    IN_PROGRESS = "inProgress"


def driver_path() -> Path:
    """The driver's file on the host (bound read-only at :data:`SANDBOX_DRIVER`)."""
    return Path(__file__).with_name("appserver_driver.py")


@cache
def _client_version() -> str:
    try:
        return pinned_version()
    except (OSError, KeyError, ValueError):
        return "0"


def driver_argv(
    *,
    resume_thread: str | None = None,
    developer_instructions: str | None = None,
    workdir: str = codex.SANDBOX_WORKDIR,
    python: str = codex.SANDBOX_PYTHON,
    driver: str = SANDBOX_DRIVER,
    executable: str = codex.SANDBOX_CODEX_BIN,
) -> list[str]:
    """The driver's argv: ``thread/start`` in ``workdir``, or ``thread/resume`` of
    ``resume_thread``; ``developer_instructions`` replace the config's (Ask mode)."""
    argv = [python, "-I", driver, "--codex", executable, "--cwd", workdir]
    argv += ["--client-version", _client_version(), "--ready-marker", codex.READY_MARKER]
    if resume_thread is not None:
        if not re.fullmatch(r"[0-9A-Za-z-]{8,64}", resume_thread):
            raise ValueError(f"not a Codex thread id: {resume_thread!r}")
        argv += ["--resume", resume_thread]
    if developer_instructions is not None:
        argv += ["--developer-instructions", developer_instructions]
    return argv


# ----------------------------------------------------------------------------- the adapter


def _status(value: Any) -> str:
    text = str(value or "")
    return "in_progress" if text == "inProgress" else text


def _with_details(message: Any, details: Any) -> str:
    text = str(message or "")
    return f"{text} ({details})" if details else text


def exec_item(item: dict[str, Any]) -> dict[str, Any] | None:
    """A ``ThreadItem`` as ``codex exec --json``'s item, ``None`` for one exec does not show."""
    kind = item.get("type")
    key = str(item.get("id") or "")
    if kind == "agentMessage":
        return {"id": key, "type": "agent_message", "text": str(item.get("text") or "")}
    if kind == "reasoning":
        summary = item.get("summary")
        text = "\n".join(str(s) for s in summary) if isinstance(summary, list) else ""
        return {"id": key, "type": "reasoning", "text": text} if text.strip() else None
    if kind == "commandExecution":
        return {
            "id": key,
            "type": "command_execution",
            "command": str(item.get("command") or ""),
            "aggregated_output": str(item.get("aggregatedOutput") or ""),
            "exit_code": item.get("exitCode"),
            "status": _status(item.get("status")),
        }
    if kind == "fileChange":
        changes = item.get("changes")
        status = _status(item.get("status"))
        return {
            "id": key,
            "type": "file_change",
            "changes": [
                {"path": c.get("path"), "kind": (c.get("kind") or {}).get("type")}
                for c in (changes if isinstance(changes, list) else [])
                if isinstance(c, dict)
            ],
            "status": "failed" if status == "declined" else status,
        }
    if kind == "mcpToolCall":
        result = item.get("result")
        error = item.get("error")
        return {
            "id": key,
            "type": "mcp_tool_call",
            "server": item.get("server"),
            "tool": item.get("tool"),
            "arguments": item.get("arguments"),
            "status": _status(item.get("status")),
            "result": (
                {
                    "content": result.get("content"),
                    "structured_content": result.get("structuredContent"),
                }
                if isinstance(result, dict)
                else None
            ),
            "error": {"message": error.get("message")} if isinstance(error, dict) else None,
        }
    if kind == "webSearch":
        return {
            "id": key,
            "type": "web_search",
            "query": item.get("query"),
            "action": item.get("action"),
        }
    return None


@dataclass
class ExecEvents:
    """App-server notifications → ``codex exec --json`` events (stateful: a file change's
    and the plan's first notice starts their item, later ones update it; the plan completes
    and the token usage is reported with the turn)."""

    _started: set[str] = field(default_factory=set)
    _plan: dict[str, Any] | None = None
    _usage: dict[str, Any] | None = None
    _error: str | None = None

    def events(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        method = message.get("method")
        params = message.get("params")
        if not isinstance(params, dict):
            return []
        if method == "thread/started":
            thread = params.get("thread")
            tid = thread.get("id") if isinstance(thread, dict) else None
            return [{"type": "thread.started", "thread_id": tid}]
        if method == "turn/started":
            return [{"type": "turn.started"}]
        if method in ("item/started", "item/completed"):
            raw = params.get("item")
            item = exec_item(raw) if isinstance(raw, dict) else None
            if item is None:
                return []
            if method == "item/completed":
                return [{"type": "item.completed", "item": item}]
            if item["type"] in ("agent_message", "reasoning"):
                return []  # exec shows them when they complete
            return [self._start(item)]
        if method == "item/fileChange/patchUpdated":
            raw = {"type": "fileChange", "id": params.get("itemId"), "status": "inProgress"}
            item = exec_item({**raw, "changes": params.get("changes")})
            return [self._start(item)] if item is not None else []
        if method == "turn/plan/updated":
            return [self._plan_event(params)]
        if method == "thread/tokenUsage/updated":
            usage = params.get("tokenUsage")
            if isinstance(usage, dict) and isinstance(usage.get("total"), dict):
                self._usage = usage["total"]
            return []
        if method == "turn/completed":
            return self._turn_completed(params)
        if method == "error":
            error = params.get("error") or {}
            text = _with_details(error.get("message"), error.get("additionalDetails"))
            self._error = text or self._error
            return [{"type": "error", "message": text}]
        if method in ("configWarning", "deprecationNotice"):
            text = _with_details(params.get("summary"), params.get("details"))
            return [{"type": "item.completed", "item": {"type": "error", "message": text}}]
        if method == "warning":
            message_ = str(params.get("message") or "")
            return [{"type": "item.completed", "item": {"type": "error", "message": message_}}]
        if method == "model/rerouted":
            text = f"model rerouted from {params.get('fromModel')} to {params.get('toModel')}"
            return [{"type": "item.completed", "item": {"type": "error", "message": text}}]
        return []

    def _start(self, item: dict[str, Any]) -> dict[str, Any]:
        key = str(item.get("id"))
        kind = "item.updated" if key in self._started else "item.started"
        self._started.add(key)
        return {"type": kind, "item": item}

    def _plan_event(self, params: dict[str, Any]) -> dict[str, Any]:
        steps = params.get("plan")
        item = {
            "id": f"plan-{params.get('turnId')}",
            "type": "todo_list",
            "items": [
                {"text": str(s.get("step") or ""), "completed": s.get("status") == "completed"}
                for s in (steps if isinstance(steps, list) else [])
                if isinstance(s, dict)
            ],
        }
        kind = "item.updated" if self._plan is not None else "item.started"
        self._plan = item
        return {"type": kind, "item": item}

    def _turn_completed(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        turn = params.get("turn")
        turn = turn if isinstance(turn, dict) else {}
        out: list[dict[str, Any]] = []
        if self._plan is not None:
            out.append({"type": "item.completed", "item": self._plan})
            self._plan = None
        status = turn.get("status")
        if status == TurnStatus.COMPLETED:
            u = self._usage or {}
            usage = {
                "input_tokens": u.get("inputTokens", 0),
                "cached_input_tokens": u.get("cachedInputTokens", 0),
                "output_tokens": u.get("outputTokens", 0),
                "reasoning_output_tokens": u.get("reasoningOutputTokens", 0),
            }
            out.append({"type": "turn.completed", "usage": usage})
        elif status == TurnStatus.FAILED:
            error = turn.get("error")
            message = (
                _with_details(error.get("message"), error.get("additionalDetails"))
                if isinstance(error, dict)
                else ""
            )
            failure = message or self._error or "turn failed"
            out.append({"type": "turn.failed", "error": {"message": failure}})
        # interrupted: no event; the run then ends before finishing its turn
        return out


@dataclass
class AppServerTranslator:
    """The driver's lines → :class:`EventTranslator` (the engine's ``Translator``)."""

    inner: EventTranslator
    adapter: ExecEvents = field(default_factory=ExecEvents)

    @property
    def turn_completed(self) -> bool:
        return self.inner.turn_completed

    @property
    def thread_id(self) -> str | None:
        return self.inner.thread_id

    def take_initial(self) -> list[Update]:
        return self.inner.take_initial()

    def feed(self, line: str) -> list[Update]:
        line = line.strip()
        if not line:
            return []
        try:
            message = json.loads(line)
        except ValueError:
            return self.inner.feed(line)  # a diagnostic, as in exec mode
        if not isinstance(message, dict):
            return self.inner.feed(line)
        out: list[Update] = []
        for event in self.adapter.events(message):
            out += self.inner.feed_event(event)
        return out

    def finish(
        self,
        exit_code: int | None,
        *,
        killed_reason: str | None = None,
        upstream_error: str | None = None,
        stderr: str = "",
    ) -> Outcome:
        return self.inner.finish(
            exit_code, killed_reason=killed_reason, upstream_error=upstream_error, stderr=stderr
        )


# ----------------------------------------------------------------------------- the runtime


@dataclass(frozen=True)
class CodexAppServerRuntime(CodexRuntime):
    """:class:`CodexRuntime` with Codex run as ``codex app-server`` through the driver."""

    idle_helpers: tuple[str, ...] = (codex.SANDBOX_FORWARDER, "openwham-launch", SANDBOX_DRIVER)
    #: the driver's ``INTERRUPT_SIGNAL``: ``turn/interrupt`` on a cancel
    interrupt_signal: int | None = signal.SIGUSR2

    def binds(self, *, forwarder: Path, gateway_socket: Path) -> dict[Path, str]:
        binds = super().binds(forwarder=forwarder, gateway_socket=gateway_socket)
        binds[driver_path()] = SANDBOX_DRIVER
        return binds

    def command(
        self,
        *,
        qa_mode: bool,
        resume_thread: str | None,
        custom_instructions: str | None,
        after: str,
        egress: str | None = None,
        network: str | None = None,
    ) -> list[str]:
        instructions = None
        if qa_mode:  # exec selects the ``ask`` profile; app-server has no profiles
            custom = codex.with_network_note((custom_instructions or "").strip(), network)
            instructions = codex.ask_instructions(custom)
        agent = driver_argv(resume_thread=resume_thread, developer_instructions=instructions)
        return codex.launcher(agent, after=after, egress=egress or "", driver=True)

    def translator(self, prompt: str) -> AppServerTranslator:
        return AppServerTranslator(EventTranslator(prompt=prompt))


CODEX_APP_SERVER = CodexAppServerRuntime()


def codex_runtime(mode: CodexMode | str) -> CodexRuntime:
    """The runtime for ``WHAM_CODEX_MODE``."""
    return CODEX_APP_SERVER if CodexMode(mode) == CodexMode.APP_SERVER else codex.CODEX
