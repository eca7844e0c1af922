"""Task titles: asked of the model through the gateway, as Codex cloud titles its tasks, with a
title derived from the prompt when the model fails or is slow.

The model request (:func:`title_request`, recognisable by :data:`TITLE_INSTRUCTIONS`) goes
through the gateway like the agent's own requests: a token of its own (``<turn>:title``,
pinned to the attempt's model, one request), the real credential added there, its tokens
metered there; the engine records them on the attempt (``run.title_usage``). It runs in a
thread beside the attempt (:class:`TitleJob`), so the attempt never waits for it to start;
the title is written when the answer arrives, or the derived one when the answer fails or
does not come in time, and always before the attempt's terminal event.

The derived title (:func:`derived_title`) is the prompt's first sentence without code,
markdown or polite preamble. Every title is shortened at a word boundary, never inside a
word (:func:`shorten`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from openwham.gateway import Gateway, Usage
from openwham.service.text import shorten

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 4000  # what the title request sends of a long prompt
TITLE_INSTRUCTIONS = (
    "You write the title of a coding task from the user's request to a coding agent. "
    "Answer with the title only: at most 8 words and under 60 characters, in the language "
    "of the request, in the imperative like a commit subject (e.g. 'Fix the failing date "
    "test'), without quotes, markdown or a final period."
)
_FENCE = re.compile(r"```.*?(```|$)", re.S)
_PREFIX = re.compile(
    r"^(?:(?:please|pls|hey|hi|hello|ok|okay|so|now|codex)\b[,:!]?\s*)+"
    r"|^(?:can|could|would|will)\s+you\s+(?:please\s+)?"
    r"|^(?:i\s+(?:want|need|would\s+like)\s+(?:you\s+)?to\s+)"
    r"|^(?:help\s+me\s+(?:to\s+)?)",
    re.I,
)
_MARKUP = re.compile(r"^(?:#+\s*|[-*+]\s+|\d+[.)]\s+|>\s*)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_LABEL = re.compile(r"^(?:task\s+)?title\s*:\s*", re.I)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"  # straight, curly and angle quotes


def derived_title(prompt: str) -> str:
    """The title made from the prompt alone (the fallback, and the title on creation)."""
    text = _FENCE.sub(" ", prompt)
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    line = _MARKUP.sub("", line)
    line = _SENTENCE_END.split(line, maxsplit=1)[0]
    line = line.replace("`", "").replace("**", "")
    line = " ".join(line.split())
    for _ in range(3):
        stripped = _PREFIX.sub("", line).strip()
        if stripped == line:
            break
        line = stripped
    line = line.rstrip(" .!:;,")
    if not line:
        return "New task"
    line = shorten(line)
    return line[0].upper() + line[1:]


def clean_model_title(text: str) -> str | None:
    """The model's answer as a title (first line, no label, quotes, markdown or final
    period, shortened at a word); ``None`` when nothing usable is left."""
    text = _THINK.sub(" ", text)  # open models often show their reasoning first
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    line = _MARKUP.sub("", line).replace("**", "").replace("`", "")
    line = _LABEL.sub("", line).strip().strip(_QUOTES).strip()
    line = line.rstrip(" .:;,")
    if not line:
        return None
    line = shorten(line)
    return line[0].upper() + line[1:]


def title_request(model: str, prompt: str) -> dict[str, Any]:
    """The Responses API body that asks for a title (streamed and not stored, which every
    upstream accepts, the ChatGPT backend included)."""
    return {
        "model": model,
        "instructions": TITLE_INSTRUCTIONS,
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": prompt[:MAX_PROMPT_CHARS]}],
            }
        ],
        "stream": True,
        "store": False,
    }


def _answer_text(response: dict[str, Any]) -> str:
    parts = []
    for item in response.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            for c in item.get("content") or []:
                if isinstance(c, dict) and c.get("type") == "output_text":
                    parts.append(str(c.get("text") or ""))
    return "".join(parts)


@functools.cache
def _tls() -> ssl.SSLContext:
    """The transport's TLS context, made once: the request is plain HTTP over a UNIX socket
    and never uses it, but a transport made without one loads the CA bundle (~28 ms of the
    server's CPU per title, ~0.9 s of a burst of 32 new tasks)."""
    return ssl.create_default_context()


def ask_model(socket_path: Path, token: str, body: dict[str, Any], timeout: float) -> str | None:
    """Post ``body`` to the gateway's ``/v1/responses`` over its UNIX socket and return the
    answer's text (``None`` on any failure; the gateway logs the upstream's)."""
    deadline = time.monotonic() + timeout
    transport = httpx.HTTPTransport(uds=str(socket_path), verify=_tls())
    # nothing from the environment (proxies, .netrc): the request goes to the socket as is
    headers = {"authorization": f"Bearer {token}", "accept": "text/event-stream"}
    deltas: list[str] = []
    with (
        httpx.Client(transport=transport, timeout=timeout, trust_env=False) as client,
        client.stream("POST", "http://gateway/v1/responses", json=body, headers=headers) as r,
    ):
        if r.status_code != 200:
            return None
        for line in r.iter_lines():
            if time.monotonic() > deadline:
                return None
            if not line.startswith("data:"):
                continue
            try:
                event = json.loads(line[5:].strip())
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            if kind == "response.output_text.delta":
                deltas.append(str(event.get("delta") or ""))
            elif kind == "response.completed" and isinstance(event.get("response"), dict):
                return _answer_text(event["response"]) or "".join(deltas)
            elif kind in ("response.failed", "response.incomplete", "error"):
                return None
    return None


@dataclass
class TitleJob:
    """One task's title: the model's, asked in a thread, or the derived one. ``write`` stores
    a title (and its event); it is called exactly once, by the first of the thread (with the
    model's title) and :meth:`settle` (with the derived one, when the model has not answered
    in time)."""

    prompt: str
    write: Callable[[str], None]
    timeout: float
    started: float = field(default_factory=time.monotonic)
    source: str = ""  # "model" or "prompt" once written
    usage: dict[str, int] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, gateway: Gateway, socket_path: Path, owner: str, model: str) -> None:
        """Ask the model in a daemon thread, through the gateway as ``owner``."""

        def run() -> None:
            try:
                title = self._ask(gateway, socket_path, owner, model)
                if title is not None:
                    self._put(title, "model")
            except Exception:  # the derived title stands in; the attempt goes on
                log.exception("title for %s: could not be written", owner)
            finally:
                self._done.set()

        self._thread = threading.Thread(target=run, name=f"title-{owner[-14:]}", daemon=True)
        self._thread.start()

    def _ask(self, gateway: Gateway, socket_path: Path, owner: str, model: str) -> str | None:
        token = gateway.register_attempt(
            owner, model=model, max_requests=1, ttl_seconds=self.timeout + 30
        )
        try:
            answer = ask_model(socket_path, token, title_request(model, self.prompt), self.timeout)
        except (httpx.HTTPError, OSError) as exc:
            log.warning("title for %s: the model request failed: %s", owner, exc)
            answer = None
        finally:
            gateway.revoke(owner)
            used = gateway.usage(owner)
            gateway.forget(owner)
            self.usage = asdict(used) if used != Usage() else None
        if answer is None:
            log.info("title for %s: no answer from the model; the prompt gives the title", owner)
        return clean_model_title(answer) if answer else None

    def _put(self, title: str, source: str) -> None:
        # Written under the lock: once ``settle`` returns, the title (and its event) is
        # stored, whichever side wrote it, so the terminal event comes after it.
        with self._lock:
            if self.source:
                return
            self.write(title)
            self.source = source

    def settle(self, *, wait: bool = True, stop: Callable[[], bool] | None = None) -> None:
        """Make sure a title is written: wait for the model (at most until its timeout, and
        not at all with ``wait`` false or once ``stop()`` says so, e.g. on a cancel), else
        write the derived title."""
        if wait and self._thread is not None:
            deadline = self.started + self.timeout + 1.0
            while not self._done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline or (stop is not None and stop()):
                    break
        self._put(derived_title(self.prompt), "prompt")
