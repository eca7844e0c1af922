"""A scripted OpenAI Responses server: the one external service the tests replace.

It answers ``POST /v1/responses`` (SSE) for the real Codex binary. A script is a list of
steps; the step to play is the number of tool outputs already in the request's ``input``, so
the server is stateless and every attempt of a task replays the same script. Tool calls are
built from the tool list the request offers: ``exec_command`` (or ``shell``) for commands and
the ``apply_patch`` tool for edits, falling back to running ``apply_patch`` through the shell
tool when the request offers no patch tool.

The engine's title request (instructions :data:`openwham.engine.titles.TITLE_INSTRUCTIONS`)
is answered apart: by ``title`` (a :class:`Say` or :class:`Fail`; default: the prompt's
first six words), after ``title_delay`` seconds, recorded in ``title_requests`` and not in
``requests`` (which hold the agent's requests only, as tests count them).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from openwham.engine.titles import TITLE_INSTRUCTIONS
from support.app_thread import AppThread


@dataclass
class Shell:
    """Run a shell command through the offered shell tool."""

    command: str


@dataclass
class Patch:
    """Edit files with an ``*** Begin Patch`` body through the offered patch tool."""

    patch: str


@dataclass
class CallTool:
    """Call an offered function tool by name: ``namespace`` for one inside a namespace
    (Codex offers an MCP server's tools in the namespace ``mcp__<server>``)."""

    name: str
    arguments: dict[str, Any]
    namespace: str | None = None


@dataclass
class SearchTools:
    """Call the offered ``tool_search`` (Codex defers MCP tools behind it for models that
    support it: they are offered only after a search finds them)."""

    query: str


@dataclass
class Say:
    """Finish with an assistant message."""

    text: str


@dataclass
class Fail:
    """Answer with ``response.failed`` (a non-retryable model error)."""

    code: str = "invalid_request_error"
    message: str = "scripted failure"


Step = Shell | Patch | CallTool | SearchTools | Say | Fail


def _tool_outputs(body: dict[str, Any]) -> int:
    return sum(
        1
        for item in body.get("input") or []
        if isinstance(item, dict)
        and item.get("type")
        in ("function_call_output", "custom_tool_call_output", "tool_search_output")
    )


def _tools(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(t.get("name")): t for t in body.get("tools") or [] if isinstance(t, dict)}


def _shell_item(tools: dict[str, dict[str, Any]], command: str) -> dict[str, Any]:
    call_id = f"call_{uuid.uuid4().hex[:12]}"
    if "exec_command" in tools:
        args = {"cmd": command, "yield_time_ms": 30000}
        return {
            "type": "function_call",
            "name": "exec_command",
            "arguments": json.dumps(args),
            "call_id": call_id,
        }
    if "shell" in tools:
        args = {"command": ["bash", "-lc", command]}
        return {
            "type": "function_call",
            "name": "shell",
            "arguments": json.dumps(args),
            "call_id": call_id,
        }
    raise AssertionError(f"the request offers no shell tool: {sorted(tools)}")


def _patch_item(tools: dict[str, dict[str, Any]], patch: str) -> dict[str, Any]:
    call_id = f"call_{uuid.uuid4().hex[:12]}"
    tool = tools.get("apply_patch")
    if tool is not None and tool.get("type") == "custom":
        return {
            "type": "custom_tool_call",
            "name": "apply_patch",
            "input": patch,
            "call_id": call_id,
        }
    if tool is not None:
        return {
            "type": "function_call",
            "name": "apply_patch",
            "arguments": json.dumps({"input": patch}),
            "call_id": call_id,
        }
    return _shell_item(tools, f"apply_patch <<'PATCH'\n{patch}\nPATCH")


def _tool_item(body: dict[str, Any], step: CallTool) -> dict[str, Any]:
    """A ``function_call`` of an offered tool; an assertion error names what was offered."""
    offered: set[tuple[str | None, str]] = set()
    found = [  # tools a tool search found (deferred ones, e.g. an MCP server's)
        tool
        for item in body.get("input") or []
        if isinstance(item, dict) and item.get("type") == "tool_search_output"
        for tool in item.get("tools") or []
    ]
    for tool in [*(body.get("tools") or []), *found]:
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "namespace":
            offered |= {(tool.get("name"), str(t.get("name"))) for t in tool.get("tools") or []}
        else:
            offered.add((None, str(tool.get("name"))))
    if (step.namespace, step.name) not in offered:
        raise AssertionError(f"the request offers no {step.namespace}/{step.name}: {offered}")
    item: dict[str, Any] = {
        "type": "function_call",
        "name": step.name,
        "arguments": json.dumps(step.arguments),
        "call_id": f"call_{uuid.uuid4().hex[:12]}",
    }
    if step.namespace is not None:
        item["namespace"] = step.namespace
    return item


def _default_title(body: dict[str, Any]) -> str:
    """The scripted model's title when a test sets none: the prompt's first six words."""
    texts = [
        str(c.get("text") or "")
        for item in body.get("input") or []
        if isinstance(item, dict)
        for c in item.get("content") or []
        if isinstance(c, dict)
    ]
    return " ".join(" ".join(texts).split()[:6]) or "Untitled"


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


@dataclass
class ScriptedModel:
    """The server; ``script`` may be replaced between tasks; ``requests`` records bodies."""

    script: list[Step] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    delay: float = 0.0
    # while set and not yet released, the agent's model requests wait (titles do not): a
    # test holds an attempt in progress for as long as it needs, instead of racing a timer
    hold: threading.Event | None = None
    on_request: Callable[[dict[str, Any]], None] | None = None
    title: Say | Fail | None = None
    title_delay: float = 0.0
    title_requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _runner: AppThread = field(default_factory=AppThread)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [], "models": []})

    async def _responses(self, request: Request) -> Response:
        body = json.loads(await request.body())
        if body.get("instructions") == TITLE_INSTRUCTIONS:
            self.title_requests.append(body)
            step = self.title if self.title is not None else Say(_default_title(body))
            return StreamingResponse(
                self._stream(body, step, delay=self.title_delay), media_type="text/event-stream"
            )
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.on_request is not None:
            self.on_request(body)
        index = _tool_outputs(body)
        step = self.script[index] if index < len(self.script) else Say("done")
        return StreamingResponse(self._stream(body, step), media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any], step: Step, delay: float | None = None) -> Any:
        import asyncio

        rid = f"resp_{uuid.uuid4().hex[:16]}"
        yield _sse({"type": "response.created", "response": {"id": rid}})
        hold = self.hold if delay is None else None
        while hold is not None and not hold.is_set():
            await asyncio.sleep(0.05)
        wait = self.delay if delay is None else delay
        if wait:
            await asyncio.sleep(wait)
        if isinstance(step, Fail):
            yield _sse(
                {
                    "type": "response.failed",
                    "response": {"id": rid, "error": {"code": step.code, "message": step.message}},
                }
            )
            return
        tools = _tools(body)
        if isinstance(step, Shell):
            item = _shell_item(tools, step.command)
        elif isinstance(step, Patch):
            item = _patch_item(tools, step.patch)
        elif isinstance(step, CallTool):
            item = _tool_item(body, step)
        elif isinstance(step, SearchTools):
            item = {
                "type": "tool_search_call",
                "call_id": f"call_{uuid.uuid4().hex[:12]}",
                "execution": "client",
                "status": "completed",
                "arguments": {"query": step.query},
            }
        else:
            item = {
                "type": "message",
                "role": "assistant",
                "id": f"msg_{uuid.uuid4().hex[:12]}",
                "content": [{"type": "output_text", "text": step.text}],
            }
        yield _sse({"type": "response.output_item.added", "item": item})
        yield _sse({"type": "response.output_item.done", "item": item})
        usage = {
            "input_tokens": 100,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 20,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 120,
        }
        response = {"id": rid, "status": "completed", "output": [item], "usage": usage}
        yield _sse({"type": "response.completed", "response": response})

    def start(self) -> ScriptedModel:
        self.url = self._runner.start(self.app()) + "/v1"
        return self

    def stop(self) -> None:
        self._runner.stop()
