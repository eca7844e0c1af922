"""The model gateway: sandbox forwarder → UNIX socket → gateway → upstream, for real.

Every test runs the gateway on a UNIX socket and the in-sandbox forwarder as a subprocess,
and talks HTTP to the forwarder's loopback port, as the agent does. The upstream is the
scripted Responses server (``openai`` / ``openai-compatible``), a local stand-in for the
ChatGPT issuer and backend (``chatgpt``), or an httpx mock for failure answers.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from conftest import git
from openwham.config import Settings
from openwham.gateway import (
    ChatGPTUpstream,
    Gateway,
    GatewayServer,
    OpenAIUpstream,
    Upstream,
    Usage,
    bind_unix_socket,
    check_config,
    forwarder_path,
    make_upstream,
)
from openwham.gateway.sse import SSEParser, usage_numbers
from support.codex_exec import run_codex_exec
from support.scripted_model import Say, ScriptedModel, Shell

REAL_KEY = "sk-real-upstream-key-0123456789"
BODY = {"model": "m", "stream": True, "input": [{"type": "message", "role": "user", "content": []}]}


# --------------------------------------------------------------------------- plumbing


def start_forwarder(sock: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-I", str(forwarder_path()), "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [*command, "--unix", str(sock)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("ready 127.0.0.1:"), line
    return proc, f"http://{line.split()[1]}/v1"


def stop_process(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Stack:
    gateway: Gateway
    url: str  # the forwarder's base URL, as the agent sees it
    socket: Path

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Start gateway (UNIX socket) + forwarder for an upstream; everything stops afterwards."""
    with ExitStack() as cleanup:

        def start(upstream: Upstream, **kwargs: Any) -> Stack:
            sock = tmp_path / f"run{len(cleanup._exit_callbacks)}" / "gateway.sock"
            gateway = Gateway(upstream, **kwargs)
            server = GatewayServer(gateway, sock).start()
            cleanup.callback(server.stop)
            proc, url = start_forwarder(sock)
            cleanup.callback(stop_process, proc)
            return Stack(gateway, url, sock)

        yield start


@pytest.fixture
def model() -> Iterator[ScriptedModel]:
    server = ScriptedModel().start()
    try:
        yield server
    finally:
        server.stop()


def serve_app(app: Starlette) -> tuple[str, Callable[[], None]]:
    """Serve an ASGI app on a loopback port from a thread; returns (base URL, stop)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(5)

    return f"http://127.0.0.1:{port}", stop


def sse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


# --------------------------------------------------------------------------- openai upstreams


def test_streams_through_chunk_by_chunk_with_the_real_key(
    model: ScriptedModel, stacks: Callable[..., Stack]
) -> None:
    stack = stacks(OpenAIUpstream("openai-compatible", model.url, REAL_KEY))
    token = stack.gateway.register_attempt("att-1")
    model.delay = 2.5  # response.created first, the rest 2.5 s later (room for a busy host)

    started = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    with (
        stack.client(token) as client,
        client.stream("POST", "/responses", json=BODY) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic() - started, json.loads(line[6:])["type"]))
        received = {k.lower(): v for k, v in response.headers.items()}

    kinds = [kind for _, kind in arrivals]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    # The first event was forwarded while the upstream was still sleeping.
    assert arrivals[0][0] < 2.0, arrivals
    assert arrivals[-1][0] - arrivals[0][0] > 2.0, arrivals

    # The upstream got the real key, never the attempt token; the client never the key.
    seen = model.headers[-1]
    assert seen["authorization"] == f"Bearer {REAL_KEY}"
    assert not any(token in value for value in seen.values())
    assert REAL_KEY not in json.dumps(received)

    assert stack.gateway.usage("att-1") == Usage(
        requests=1, responses=1, input_tokens=100, output_tokens=20, total_tokens=120
    )
    assert stack.gateway.last_error("att-1") is None


def test_usage_adds_up_and_the_model_is_pinned(
    model: ScriptedModel, stacks: Callable[..., Stack]
) -> None:
    stack = stacks(OpenAIUpstream("openai", model.url, REAL_KEY))
    token = stack.gateway.register_attempt("att-2", model="pinned-model")
    other = stack.gateway.register_attempt("att-3")
    with stack.client(token) as client:
        for _ in range(3):
            response = client.post("/responses", json=BODY)
            assert response.status_code == 200
            assert sse_events(response.text)[-1]["type"] == "response.completed"
        models = client.get("/models")
        assert models.status_code == 200 and models.json()["object"] == "list"
    with stack.client(other) as client:
        assert client.post("/responses", json=BODY).status_code == 200

    usage = stack.gateway.usage("att-2")
    assert (usage.requests, usage.responses, usage.total_tokens) == (3, 3, 360)
    assert stack.gateway.usage("att-3").total_tokens == 120
    assert [body["model"] for body in model.requests] == ["pinned-model"] * 3 + ["m"]


def test_bad_revoked_and_expired_tokens_get_401(
    model: ScriptedModel, stacks: Callable[..., Stack]
) -> None:
    stack = stacks(OpenAIUpstream("openai-compatible", model.url, REAL_KEY))
    token = stack.gateway.register_attempt("att-1")
    expired = stack.gateway.register_attempt("att-2", ttl_seconds=0)
    with stack.client(token) as client:
        assert client.post("/responses", json=BODY).status_code == 200
        missing = client.post("/responses", json=BODY, headers={"authorization": ""})
        wrong = client.post("/responses", json=BODY, headers={"authorization": "Bearer nope"})
        old = client.post("/responses", json=BODY, headers={"authorization": f"Bearer {expired}"})
        stack.gateway.revoke("att-1")
        revoked = client.post("/responses", json=BODY)
        revoked_models = client.get("/models")
        unknown = client.get("/chat/completions")
    for response in (missing, wrong, old, revoked, revoked_models):
        assert response.status_code == 401
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code"}
        assert error["code"] == "invalid_api_key"
    assert unknown.status_code == 404
    assert set(unknown.json()["error"]) == {"message", "type", "code"}
    assert len(model.requests) == 1  # nothing unauthenticated reached the upstream
    assert stack.gateway.usage("att-1").requests == 1  # still readable after revoke


def test_limits_answer_429(model: ScriptedModel, stacks: Callable[..., Stack]) -> None:
    stack = stacks(OpenAIUpstream("openai-compatible", model.url, None))
    by_requests = stack.gateway.register_attempt("att-r", max_requests=2)
    by_tokens = stack.gateway.register_attempt("att-t", max_total_tokens=100)
    with stack.client(by_requests) as client:
        statuses = [client.post("/responses", json=BODY).status_code for _ in range(2)]
        refused = client.post("/responses", json=BODY)
    assert statuses == [200, 200] and refused.status_code == 429
    assert "limit of 2 model requests" in refused.json()["error"]["message"]
    with stack.client(by_tokens) as client:
        assert client.post("/responses", json=BODY).status_code == 200  # 120 tokens used
        refused = client.post("/responses", json=BODY)
    assert refused.status_code == 429
    assert "limit of 100 model tokens" in refused.json()["error"]["message"]
    assert "limit of 100 model tokens" in (stack.gateway.last_error("att-t") or "")
    assert len(model.requests) == 3
    assert "authorization" not in model.headers[0]  # no key configured: none sent


def test_unreachable_upstream_names_the_setting(stacks: Callable[..., Stack]) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    base = f"http://user:pw-secret@127.0.0.1:{port}/v1"  # a password in the URL stays hidden
    stack = stacks(OpenAIUpstream("openai-compatible", base, REAL_KEY))
    token = stack.gateway.register_attempt("att-1")
    with stack.client(token) as client:
        response = client.post("/responses", json=BODY)
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert f"http://[redacted]@127.0.0.1:{port}/v1 is unreachable" in message
    assert "check WHAM_MODEL_BASE_URL" in message
    assert "pw-secret" not in response.text
    assert stack.gateway.last_error("att-1") == message


def _mock(status: int, body: bytes, content_type: str = "application/json") -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": content_type})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("status", "body", "answered", "says"),
    [
        (
            401,
            json.dumps({"error": {"message": f"Incorrect API key provided: {REAL_KEY}"}}).encode(),
            400,  # permanent: Codex gives up at once on a 400
            "rejected the credentials (HTTP 401): check WHAM_MODEL_API_KEY",
        ),
        (404, b"404 page not found", 400, "has no Responses API"),
        (503, b"<html>overloaded</html>", 502, "failed with HTTP 503: <html>overloaded</html>"),
        (
            400,
            json.dumps({"error": {"message": "context_length_exceeded", "type": "x"}}).encode(),
            400,
            "context_length_exceeded",
        ),
    ],
)
def test_upstream_failures_are_explained(
    stacks: Callable[..., Stack], status: int, body: bytes, answered: int, says: str
) -> None:
    upstream = OpenAIUpstream("openai-compatible", "http://model.invalid/v1", REAL_KEY)
    stack = stacks(upstream, transport=_mock(status, body))
    token = stack.gateway.register_attempt("att-1")
    with stack.client(token) as client:
        response = client.post("/responses", json=BODY)
    assert response.status_code == answered
    assert says in response.json()["error"]["message"]
    assert says in (stack.gateway.last_error("att-1") or "")
    assert REAL_KEY not in response.text
    if status == 404:
        assert "check WHAM_MODEL_BASE_URL" in response.json()["error"]["message"]


def _key_forms(key: str) -> list[str]:
    """The key as an upstream error body might echo it (each inside a longer text)."""
    raw = key.encode()
    return [
        key,
        base64.b64encode(b"Bearer " + raw).decode(),  # an echoed Authorization header
        base64.b64encode(b"x" + raw + b"y").decode(),
        base64.urlsafe_b64encode(b"xy" + raw).decode(),
        raw.hex(),
        raw.hex().upper(),
        key[::-1],
    ]


@pytest.mark.parametrize("status", [400, 401, 429, 503])
def test_an_upstream_error_echoing_the_key_in_any_encoding_reaches_no_one(
    stacks: Callable[..., Stack], caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """Nor the agent (the body passed on), nor the task's error, nor the server log; also
    a key hidden behind JSON escapes, and in a streamed ``response.failed``."""
    forms = _key_forms(REAL_KEY)
    escaped = "".join(f"\\u{ord(c):04x}" for c in REAL_KEY)  # JSON decodes it to the key
    text = " ".join(forms) + " " + escaped
    body = json.dumps({"error": {"message": text}}).replace("\\\\u", "\\u").encode()
    upstream = OpenAIUpstream("openai-compatible", "http://model.invalid/v1", REAL_KEY)
    stack = stacks(upstream, transport=_mock(status, body))
    token = stack.gateway.register_attempt("att-1")
    with caplog.at_level(logging.DEBUG), stack.client(token) as client:
        response = client.post("/responses", json=BODY)
    assert response.status_code >= 400
    seen = {
        "answer": json.loads(response.text)["error"]["message"] + response.text,
        "task error": stack.gateway.last_error("att-1") or "",
        "server log": caplog.text,
    }
    assert status == 401 or "[redacted]" in seen["task error"]
    inner = [f[2:-2] for f in forms]  # what is left whatever the surrounding text
    for where, text in seen.items():
        for form in inner:
            assert form not in text, (where, form)


def test_a_streamed_response_failed_echoing_the_key_stays_out_of_the_task_error(
    stacks: Callable[..., Stack], caplog: pytest.LogCaptureFixture
) -> None:
    encoded = base64.b64encode(REAL_KEY.encode()).decode()
    event = {
        "type": "response.failed",
        "response": {"id": "r", "error": {"code": "bad", "message": f"key {encoded} bad"}},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        frame = f"data: {json.dumps(event)}\n\n".encode()
        return httpx.Response(200, content=frame, headers={"content-type": "text/event-stream"})

    upstream = OpenAIUpstream("openai-compatible", "http://model.invalid/v1", REAL_KEY)
    stack = stacks(upstream, transport=httpx.MockTransport(handler))
    token = stack.gateway.register_attempt("att-1")
    with caplog.at_level(logging.DEBUG), stack.client(token) as client:
        client.post("/responses", json=BODY)
    error = stack.gateway.last_error("att-1") or ""
    assert "key [redacted]" in error and encoded[2:-2] not in error
    assert encoded[2:-2] not in caplog.text


def test_a_stream_broken_midway_ends_with_response_failed(stacks: Callable[..., Stack]) -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> Any:
            yield b'data: {"type":"response.created","response":{"id":"r"}}\n\n'
            raise httpx.ReadError("connection reset by upstream")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Broken(), headers={"content-type": "text/event-stream"})

    upstream = OpenAIUpstream("openai-compatible", "http://model.invalid/v1", REAL_KEY)
    stack = stacks(upstream, transport=httpx.MockTransport(handler))
    token = stack.gateway.register_attempt("att-1")
    with stack.client(token) as client:
        response = client.post("/responses", json=BODY)
    events = sse_events(response.text)
    assert [e["type"] for e in events] == ["response.created", "response.failed"]
    assert "broke off the response stream" in events[-1]["response"]["error"]["message"]
    assert "broke off" in (stack.gateway.last_error("att-1") or "")


def test_disconnect_and_revoke_stop_the_upstream_stream(stacks: Callable[..., Stack]) -> None:
    closed: list[float] = []

    class Slow(httpx.AsyncByteStream):
        async def __aiter__(self) -> Any:
            import asyncio

            for _ in range(100):
                yield b'data: {"type":"response.output_text.delta","delta":"x"}\n\n'
                await asyncio.sleep(0.1)

        async def aclose(self) -> None:
            closed.append(time.monotonic())

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Slow(), headers={"content-type": "text/event-stream"})

    upstream = OpenAIUpstream("openai-compatible", "http://model.invalid/v1", REAL_KEY)
    stack = stacks(upstream, transport=httpx.MockTransport(handler))
    gone = stack.gateway.register_attempt("att-gone")
    with stack.client(gone) as client, client.stream("POST", "/responses", json=BODY) as response:
        next(response.iter_lines())
    left = time.monotonic()  # the client hung up after the first event
    deadline = left + 3
    while not closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert closed and closed[0] - left < 1.0

    cancelled = stack.gateway.register_attempt("att-cancelled")
    with stack.client(cancelled) as client:
        with client.stream("POST", "/responses", json=BODY) as response:
            lines = response.iter_lines()
            next(lines)
            stack.gateway.revoke("att-cancelled")
            rest = list(lines)
        assert len([line for line in rest if line.startswith("data:")]) <= 2
        assert client.post("/responses", json=BODY).status_code == 401
    deadline = time.monotonic() + 3  # the gateway closes the upstream stream in its own task
    while len(closed) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(closed) == 2


def test_sse_metering_survives_any_chunking() -> None:
    usage = {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 2},
    }
    completed = json.dumps({"type": "response.completed", "response": {"id": "r", "usage": usage}})
    cut = completed.index('{"id"')  # split between JSON tokens, not inside a string
    head, tail = completed[:cut], completed[cut:]
    stream = (
        ": keep-alive comment\r\n"
        'event: response.created\r\ndata: {"type":"response.created","response":{}}\r\n\r\n'
        'data: {"type":"response.output_text.delta",\r\ndata: "delta":"response.completed"}\r\n\r\n'
        f"event: response.completed\rdata: {head}\rdata:{tail}\r\r"
    ).encode()
    # the split data lines join with a newline, which JSON accepts as whitespace
    for size in (1, 2, 7, len(stream)):
        seen: list[dict[str, Any]] = []
        parser = SSEParser(seen.append)
        for start in range(0, len(stream), size):
            parser.feed(stream[start : start + size])
        parser.close()
        assert [event["type"] for event in seen] == ["response.completed"], size
        assert parser.at_boundary
        assert usage_numbers(seen[0]["response"]["usage"]) == {
            "input_tokens": 11,
            "cached_input_tokens": 4,
            "output_tokens": 5,
            "reasoning_output_tokens": 2,
            "total_tokens": 16,
        }


# --------------------------------------------------------------------------- configuration


def _settings(**values: Any) -> Settings:
    return Settings(data_dir=Path("/nonexistent"), **values)


def test_check_config_names_the_setting(tmp_path: Path) -> None:
    assert "set WHAM_MODEL_API_KEY" in (check_config(_settings(model_provider="openai")) or "")
    assert check_config(_settings(model_provider="openai", model_api_key="k")) is None
    missing = check_config(_settings(model_provider="openai-compatible"))
    assert missing is not None and "needs WHAM_MODEL_BASE_URL" in missing
    wrong = check_config(
        _settings(model_provider="openai-compatible", model_base_url="http://h:1/api")
    )
    assert wrong is not None and "WHAM_MODEL_BASE_URL must end in /v1" in wrong
    ok = _settings(model_provider="openai-compatible", model_base_url="http://h:1/v1/")
    assert check_config(ok) is None
    assert isinstance(make_upstream(ok), OpenAIUpstream)
    assert "WHAM_MODEL_PROVIDER" in (check_config(_settings(model_provider="azure")) or "")
    chatgpt = check_config(_settings(model_provider="chatgpt"), codex_home=tmp_path)
    assert chatgpt is not None and "codex login" in chatgpt and str(tmp_path) in chatgpt
    write_auth(tmp_path, access=make_jwt(exp=time.time() + 3600))
    assert check_config(_settings(model_provider="chatgpt"), codex_home=tmp_path) is None


def test_socket_is_reachable_by_any_uid_and_replaced_when_stale(tmp_path: Path) -> None:
    path = tmp_path / "run" / "gateway.sock"
    sock = bind_unix_socket(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o711
    with pytest.raises(OSError, match="already listening"):
        bind_unix_socket(path)
    sock.close()  # the file stays behind, as after a crash
    bind_unix_socket(path).close()


# --------------------------------------------------------------------------- forwarder


def test_forwarder_passes_half_close_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        conn.sendall(b"got %d bytes" % len(received))  # only after the client's EOF
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    proc, url = start_forwarder(path)
    try:
        host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(b"x" * 200_000)
            conn.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        assert reply == b"got 200000 bytes"
    finally:
        stop_process(proc)
        listener.close()
    assert proc.returncode == 0


def test_forwarder_explains_a_missing_gateway(tmp_path: Path) -> None:
    proc, url = start_forwarder(tmp_path / "nothing.sock")
    try:
        response = httpx.post(f"{url}/responses", json=BODY, timeout=10)
    finally:
        stop_process(proc)
    assert response.status_code == 502
    assert "model gateway" in response.json()["error"]["message"]


@pytest.mark.sandbox
def test_forwarder_reaches_the_gateway_from_a_sandbox_without_network(
    model: ScriptedModel, stacks: Callable[..., Stack]
) -> None:
    stack = stacks(OpenAIUpstream("openai-compatible", model.url, REAL_KEY))
    token = stack.gateway.register_attempt("att-1")
    client = (
        "import json, urllib.request\n"
        "request = urllib.request.Request('http://127.0.0.1:8080/v1/responses',"
        " data=b'{\"input\": []}', headers={'Authorization': 'Bearer ' + input()})\n"
        "print(urllib.request.urlopen(request).read().decode().splitlines()[-2])\n"
    )
    # The forwarder is bound at a fixed path: the checkout may itself live under /tmp,
    # which the sandbox replaces with a private tmpfs.
    script = (
        "python3 -I /run/wham/forwarder.py --listen 127.0.0.1:8080"
        " --unix /run/wham/gateway.sock > /tmp/ready &\n"
        "for _ in $(seq 500); do [ -s /tmp/ready ] && break; sleep 0.02; done\n"
        'python3 -I -c "$CLIENT" <<< "$TOKEN"\n'
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '\n"
    )
    sandbox = [
        "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
        "--tmpfs", "/tmp", "--tmpfs", "/run", "--unshare-all", "--die-with-parent",
        "--uid", "65534", "--gid", "65534",
        "--bind", str(stack.socket), "/run/wham/gateway.sock",
        "--ro-bind", str(forwarder_path()), "/run/wham/forwarder.py",
        "--setenv", "CLIENT", client, "--setenv", "TOKEN", token,
        "bash", "-c", script,
    ]  # fmt: skip
    done = subprocess.run(sandbox, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert json.loads(lines[0].removeprefix("data: "))["type"] == "response.completed"
    assert lines[1:] == ["lo"]  # the sandbox's only network interface
    assert stack.gateway.usage("att-1").total_tokens == 120
    assert model.headers[-1]["authorization"] == f"Bearer {REAL_KEY}"


# --------------------------------------------------------------------------- the real agent


@pytest.mark.sandbox
def test_real_codex_runs_through_forwarder_and_gateway(
    model: ScriptedModel, stacks: Callable[..., Stack], tmp_path: Path
) -> None:
    stack = stacks(OpenAIUpstream("openai-compatible", model.url, REAL_KEY))
    token = stack.gateway.register_attempt("att-codex", model="upstream-slug")
    model.script = [Shell("echo hello > a.txt && cat a.txt"), Say("All done.")]
    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", cwd=work)
    run = run_codex_exec(
        tmp_path / "home",
        work,
        base_url=stack.url,
        slug="openwham-test-model",
        key=token,
        prompt="Create the file",
    )
    events = run.events
    done = [e["item"] for e in events if e["type"] == "item.completed"]
    commands = [i for i in done if i["type"] == "command_execution"]
    assert commands[0]["aggregated_output"] == "hello\n" and commands[0]["exit_code"] == 0
    assert [i["text"] for i in done if i["type"] == "agent_message"] == ["All done."]
    assert events[-1]["type"] == "turn.completed"
    assert (work / "a.txt").read_text() == "hello\n"

    assert len(model.requests) == 2
    assert all(h["authorization"] == f"Bearer {REAL_KEY}" for h in model.headers)
    assert all(token not in json.dumps(h) for h in model.headers)
    assert {body["model"] for body in model.requests} == {"upstream-slug"}
    usage = stack.gateway.usage("att-codex")
    assert (usage.requests, usage.responses, usage.total_tokens) == (2, 2, 240)
    assert REAL_KEY not in run.stdout + run.stderr


# --------------------------------------------------------------------------- chatgpt upstream


def make_jwt(**claims: Any) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


def write_auth(home: Path, *, access: str, refresh: str = "rt_1") -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "auth.json"
    path.write_text(
        json.dumps(
            {
                "auth_mode": "chatgpt",
                "OPENAI_API_KEY": None,
                "tokens": {
                    "id_token": make_jwt(email="a@example.com"),
                    "access_token": access,
                    "refresh_token": refresh,
                    "account_id": "acct-123",
                },
                "last_refresh": "2026-01-01T00:00:00.123456789Z",
                "agent_identity": {"keep": "me"},
            }
        )
    )
    path.chmod(0o600)
    return path


@dataclass
class ChatGPTStandIn:
    """The issuer (``/oauth/token``) and the Codex backend (``/backend-api/codex/responses``)."""

    valid_access: set[str] = field(default_factory=set)
    refresh_answer: tuple[int, dict[str, Any]] | None = None
    refresh_bodies: list[dict[str, Any]] = field(default_factory=list)
    backend_headers: list[dict[str, str]] = field(default_factory=list)
    issued: int = 0

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/oauth/token", self.token, methods=["POST"]),
                Route("/backend-api/codex/responses", self.responses, methods=["POST"]),
            ]
        )

    async def token(self, request: Request) -> Response:
        self.refresh_bodies.append(await request.json())
        if self.refresh_answer is not None:
            status, body = self.refresh_answer
            return JSONResponse(body, status_code=status)
        self.issued += 1
        access = make_jwt(exp=int(time.time()) + 3600, n=self.issued)
        self.valid_access.add(access)
        return JSONResponse(
            {
                "access_token": access,
                "refresh_token": f"rt_{self.issued + 1}",
                "id_token": make_jwt(email="a@example.com", n=self.issued),
            }
        )

    async def responses(self, request: Request) -> Response:
        self.backend_headers.append(dict(request.headers))
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if bearer not in self.valid_access:
            return JSONResponse({"detail": "Unauthorized"}, status_code=401)

        async def stream() -> Any:
            usage = {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}
            completed = {"type": "response.completed", "response": {"id": "r", "usage": usage}}
            yield f"data: {json.dumps(completed)}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture
def chatgpt() -> Iterator[tuple[ChatGPTStandIn, str]]:
    stand_in = ChatGPTStandIn()
    url, stop = serve_app(stand_in.app())
    try:
        yield stand_in, url
    finally:
        stop()


def _chatgpt_upstream(home: Path, url: str) -> ChatGPTUpstream:
    return ChatGPTUpstream(
        home, base_url=f"{url}/backend-api/codex", token_url=f"{url}/oauth/token"
    )


def test_chatgpt_refreshes_before_expiry_and_injects_headers(
    chatgpt: tuple[ChatGPTStandIn, str], stacks: Callable[..., Stack], tmp_path: Path
) -> None:
    stand_in, url = chatgpt
    home = tmp_path / "codex-home"
    old_access = make_jwt(exp=int(time.time()) + 30)  # inside the 60 s margin
    path = write_auth(home, access=old_access)
    stack = stacks(_chatgpt_upstream(home, url))
    token = stack.gateway.register_attempt("att-1")
    with stack.client(token) as client:
        for _ in range(2):
            response = client.post("/responses", json=BODY)
            assert response.status_code == 200, response.text
            assert sse_events(response.text)[-1]["type"] == "response.completed"

    assert stand_in.refresh_bodies == [
        {
            "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
            "grant_type": "refresh_token",
            "refresh_reason": "proactive_expiry",
            "refresh_token": "rt_1",
        }
    ]
    saved = json.loads(path.read_text())
    new_access = saved["tokens"]["access_token"]
    assert new_access in stand_in.valid_access and new_access != old_access
    assert saved["tokens"]["refresh_token"] == "rt_2"  # the rotated token was stored
    assert saved["tokens"]["account_id"] == "acct-123"
    assert saved["agent_identity"] == {"keep": "me"} and saved["auth_mode"] == "chatgpt"
    assert saved["last_refresh"] > "2026-01-01T00:00:00.123456789Z"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for headers in stand_in.backend_headers:
        assert headers["authorization"] == f"Bearer {new_access}"
        assert headers["chatgpt-account-id"] == "acct-123"
        assert token not in json.dumps(headers)
    assert stack.gateway.usage("att-1").total_tokens == 20


def test_chatgpt_recovers_from_401_and_explains_a_dead_sign_in(
    chatgpt: tuple[ChatGPTStandIn, str], stacks: Callable[..., Stack], tmp_path: Path
) -> None:
    stand_in, url = chatgpt
    home = tmp_path / "codex-home"
    write_auth(home, access=make_jwt(exp=int(time.time()) + 3600))  # fresh, but revoked
    stack = stacks(_chatgpt_upstream(home, url))
    token = stack.gateway.register_attempt("att-1")
    with stack.client(token) as client:
        assert client.post("/responses", json=BODY).status_code == 200
        assert [b["refresh_reason"] for b in stand_in.refresh_bodies] == ["unauthorized_recovery"]
        assert len(stand_in.backend_headers) == 2  # refused once, then accepted

        stand_in.valid_access.clear()
        stand_in.refresh_answer = (401, {"error": {"code": "refresh_token_reused"}})
        response = client.post("/responses", json=BODY)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "can no longer be refreshed (refresh_token_reused)" in message
    assert "codex login" in message and str(home) in message
    assert stack.gateway.last_error("att-1") == message


def test_a_standby_token_is_handed_to_the_attempt_that_takes_it(
    model: ScriptedModel, stacks: Callable[..., Stack]
) -> None:
    stack = stacks(OpenAIUpstream("openai-compatible", model.url, REAL_KEY))
    token = stack.gateway.register_attempt(".standby-1", model="pinned-model")
    with stack.client(token) as client:
        assert client.post("/responses", json=BODY).status_code == 200
        assert stack.gateway.reassign(".standby-1", "turn-1")
        assert client.post("/responses", json=BODY).status_code == 200
        stack.gateway.revoke("turn-1")
        assert client.post("/responses", json=BODY).status_code == 401
    assert stack.gateway.usage("turn-1").requests == 1  # counted from the hand-over
    with pytest.raises(KeyError):
        stack.gateway.usage(".standby-1")
    assert model.requests[-1]["model"] == "pinned-model"  # the pin moved with the token
    assert not stack.gateway.reassign(".standby-1", "turn-2")  # gone
    assert not stack.gateway.reassign("turn-1", "turn-2")  # revoked
    stack.gateway.register_attempt(".standby-2", ttl_seconds=0)
    assert not stack.gateway.reassign(".standby-2", "turn-3")  # expired


def test_a_held_token_waits_until_released_and_fails_once_dropped(
    model: ScriptedModel, stacks: Callable[..., Stack]
) -> None:
    """A standby's agent may ask before the engine knows the standby fits: its requests wait
    in the gateway (nothing reaches the model) until released, and get 401 if the standby
    is dropped instead."""
    stack = stacks(OpenAIUpstream("openai-compatible", model.url, REAL_KEY))
    answers: dict[str, int] = {}

    def ask(name: str, token: str) -> threading.Thread:
        def run() -> None:
            with stack.client(token) as client:
                answers[name] = client.post("/responses", json=BODY).status_code

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    kept = stack.gateway.register_attempt(".standby-1")
    dropped = stack.gateway.register_attempt(".standby-2")
    assert stack.gateway.reassign(".standby-1", "turn-1", hold=True)
    assert stack.gateway.reassign(".standby-2", "turn-2", hold=True)
    threads = [ask("kept", kept), ask("dropped", dropped)]
    time.sleep(0.3)
    assert answers == {} and model.requests == []  # both wait, nothing went upstream
    stack.gateway.release("turn-1")
    stack.gateway.forget("turn-2")
    for thread in threads:
        thread.join(10)
    assert answers == {"kept": 200, "dropped": 401}
    assert len(model.requests) == 1 and stack.gateway.usage("turn-1").requests == 1


def test_a_turn_ending_response_calls_the_hook_before_its_last_bytes(
    model: ScriptedModel, stacks: Callable[..., Stack]
) -> None:
    """The engine starts the diff when the agent's last model response goes through: one
    with a message and no tool call. The hook runs before the agent has that response's
    ``response.completed``; a request after it shows as ``continued_after_final``."""
    stack = stacks(OpenAIUpstream("openai-compatible", model.url, REAL_KEY))
    token = stack.gateway.register_attempt("turn-1")
    fired: list[float] = []
    stack.gateway.on_final_response("turn-1", lambda: fired.append(time.monotonic()))

    def ask() -> tuple[list[str], float]:
        """The response's event types, and when its response.completed arrived."""
        kinds, completed_at = [], 0.0
        body = {**BODY, "tools": [{"type": "function", "name": "shell", "parameters": {}}]}
        with (
            stack.client(token) as client,
            client.stream("POST", "/responses", json=body) as response,
        ):
            for line in response.iter_lines():
                if line.startswith("data: "):
                    kinds.append(json.loads(line[6:])["type"])
                    if kinds[-1] == "response.completed":
                        completed_at = time.monotonic()
        return kinds, completed_at

    model.script = [Shell("ls")]  # a tool call: the turn goes on
    kinds, _ = ask()
    assert kinds[-1] == "response.completed" and fired == []
    assert not stack.gateway.continued_after_final("turn-1")
    model.script = [Say("All done.")]
    _, completed_at = ask()
    assert len(fired) == 1 and fired[0] <= completed_at
    assert not stack.gateway.continued_after_final("turn-1")
    ask()  # the agent asked again after all (and got another final answer)
    assert stack.gateway.continued_after_final("turn-1") and len(fired) == 2
    # a token handed to another attempt starts without the hook and the marks
    standby = stack.gateway.register_attempt(".standby-1")
    stack.gateway.on_final_response(".standby-1", lambda: fired.append(0.0))
    assert stack.gateway.reassign(".standby-1", "turn-2")
    token = standby
    ask()
    assert len(fired) == 2  # the standby's hook went with the hand-over
    assert not stack.gateway.continued_after_final("turn-2")


def test_the_first_request_hook_fires_once_when_a_request_goes_through(
    model: ScriptedModel, stacks: Callable[..., Stack]
) -> None:
    """``on_first_request``: once, when a request is let through (not while it is held),
    at once when one already went through, and not carried over by a hand-over."""
    stack = stacks(OpenAIUpstream("openai-compatible", model.url, REAL_KEY))
    model.script = [Say("hi"), Say("again"), Say("third")]
    standby = stack.gateway.register_attempt(".standby-1")
    fired: list[str] = []
    stack.gateway.on_first_request(".standby-1", lambda: fired.append("standby"))
    assert stack.gateway.reassign(".standby-1", "turn-1", hold=True)
    stack.gateway.on_first_request("turn-1", lambda: fired.append("turn-1"))
    answers: list[int] = []

    def ask(token: str) -> None:
        with stack.client(token) as client:
            answers.append(client.post("/responses", json=BODY).status_code)

    asking = threading.Thread(target=ask, args=(standby,))
    asking.start()
    time.sleep(0.3)
    assert fired == [] and model.requests == []  # held: not through yet
    stack.gateway.release("turn-1")
    asking.join(10)
    assert answers == [200] and fired == ["turn-1"]
    ask(standby)
    assert fired == ["turn-1"]  # once
    stack.gateway.on_first_request("turn-1", lambda: fired.append("late"))
    assert fired == ["turn-1", "late"]  # registered after a request went through: at once
