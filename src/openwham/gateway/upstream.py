"""Where the gateway sends model traffic, with which credential, and what to say when it fails.

An :class:`Upstream` knows its base URL, produces the headers that carry the real credential
(the agent never sees them), and turns each kind of failure into a message that names the
setting to fix. ``make_upstream(settings)`` picks the implementation from
``WHAM_MODEL_PROVIDER``; ``check_config(settings)`` finds a missing or malformed configuration
before any attempt starts.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from openwham.config import Settings
from openwham.redaction import Redactor

OPENAI_BASE_URL = "https://api.openai.com/v1"
PROVIDERS = ("openai", "openai-compatible", "chatgpt")


class GatewayConfigError(ValueError):
    """The model settings cannot work; the message says which setting to fix."""


# Codex 0.169.0 gives up at once on a 400, but retries 401/403/404 six times (~7 s) and 5xx
# thirty times (~25 s). Failures that retrying cannot fix (a rejected credential, a base URL
# without a Responses API, a dead ChatGPT sign-in) are therefore answered with 400, so the
# attempt fails fast with the message; transient ones (unreachable, 5xx) keep 502/504.
PERMANENT_FAILURE_STATUS = 400


class UpstreamError(Exception):
    """A failure answered to the agent in OpenAI error shape and recorded for the engine."""

    def __init__(
        self,
        message: str,
        *,
        permanent: bool = False,
        status: int = 502,
        type: str = "upstream_error",
        code: str = "upstream_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = PERMANENT_FAILURE_STATUS if permanent else status
        self.type = type
        self.code = code


class Upstream(ABC):
    """One configured model service."""

    provider: str
    base_url: str
    #: the setting that moves ``base_url`` (named in "unreachable" messages)
    url_setting = "WHAM_MODEL_BASE_URL"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    @abstractmethod
    async def auth_headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        """Headers carrying the real credential (may refresh it first)."""

    async def recover_unauthorized(self, client: httpx.AsyncClient) -> bool:
        """After a 401: renew the credential if possible; True means "retry once"."""
        return False

    @abstractmethod
    def secrets(self) -> list[str]:
        """Every credential value, so error bodies and logs can be scrubbed of them."""

    @abstractmethod
    def rejected_message(self, status: int) -> str:
        """The upstream refused the credential (HTTP 401/403)."""

    def unreachable_message(self, reason: str) -> str:
        return (
            f"model upstream {self.base_url} is unreachable ({reason}): "
            f"check {self.url_setting} and that the model server is running"
        )

    def not_found_message(self, url: str, status: int) -> str:
        return (
            f"model upstream {self.base_url} has no Responses API ({url} answered HTTP "
            f"{status}): check {self.url_setting} (the server's base URL, ending in /v1)"
        )

    def server_error_message(self, status: int, detail: str) -> str:
        suffix = f": {detail}" if detail else ""
        return (
            f"model upstream {self.base_url} failed with HTTP {status}{suffix} "
            f"(check the model server behind {self.url_setting})"
        )

    def redact(self, text: str) -> str:
        """``text`` without any credential (nor a password inside the base URL), also in
        the encodings an upstream error body may echo it in (base64, hex, URL, JSON: see
        :mod:`openwham.redaction`). Every upstream body that reaches a task error, the
        agent or the server log passes through here first."""
        userinfo = urlsplit(self.base_url).netloc.rpartition("@")[0]
        values = [s for s in self.secrets() if s and len(s) >= 6]
        return Redactor([*values, userinfo]).text(text)


class OpenAIUpstream(Upstream):
    """``openai`` (api.openai.com, key required) and ``openai-compatible`` (key optional)."""

    def __init__(self, provider: str, base_url: str, api_key: str | None) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key or None

    async def auth_headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        if self._api_key is None:
            return {}
        return {"authorization": f"Bearer {self._api_key}"}

    def secrets(self) -> list[str]:
        return [self._api_key] if self._api_key else []

    def rejected_message(self, status: int) -> str:
        if self._api_key is None:
            return (
                f"model upstream {self.base_url} rejected the request (HTTP {status}) and no "
                "key is configured: set WHAM_MODEL_API_KEY"
            )
        return (
            f"model upstream {self.base_url} rejected the credentials (HTTP {status}): "
            "check WHAM_MODEL_API_KEY"
        )

    def unreachable_message(self, reason: str) -> str:
        if self.base_url == OPENAI_BASE_URL:
            return (
                f"model upstream {self.base_url} is unreachable ({reason}): check this host's "
                "network access to api.openai.com (or set WHAM_MODEL_BASE_URL)"
            )
        return super().unreachable_message(reason)


def _base_url_problem(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"WHAM_MODEL_BASE_URL must be an http(s) URL ending in /v1, not {url!r}"
    if not url.rstrip("/").endswith("/v1"):
        return (
            f"WHAM_MODEL_BASE_URL must end in /v1 (the gateway posts to <base>/responses), "
            f"not {url!r}"
        )
    return None


def resolve_codex_home(codex_home: Path | None = None) -> Path:
    """The Codex home whose ``auth.json`` the ``chatgpt`` provider uses.

    An explicit argument, else ``WHAM_CODEX_HOME``, else ``CODEX_HOME``, else ``~/.codex``.
    """
    if codex_home is not None:
        return codex_home.expanduser()
    for name in ("WHAM_CODEX_HOME", "CODEX_HOME"):
        value = os.environ.get(name)
        if value:
            return Path(value).expanduser()
    return Path.home() / ".codex"


def check_config(settings: Settings, *, codex_home: Path | None = None) -> str | None:
    """Why the model settings cannot work, naming the setting to fix; ``None`` when they can."""
    provider = settings.model_provider
    if provider not in PROVIDERS:
        return f"unknown WHAM_MODEL_PROVIDER {provider!r}: use openai, openai-compatible or chatgpt"
    if provider == "openai":
        if not settings.model_api_key:
            return "WHAM_MODEL_PROVIDER=openai needs an API key: set WHAM_MODEL_API_KEY"
        if settings.model_base_url:
            return _base_url_problem(settings.model_base_url)
        return None
    if provider == "openai-compatible":
        if not settings.model_base_url:
            return (
                "WHAM_MODEL_PROVIDER=openai-compatible needs WHAM_MODEL_BASE_URL: the server's "
                "Responses API base URL, ending in /v1 (e.g. http://localhost:11434/v1)"
            )
        return _base_url_problem(settings.model_base_url)
    from openwham.gateway.chatgpt import CodexAuthFile

    return CodexAuthFile(resolve_codex_home(codex_home)).problem()


def make_upstream(settings: Settings, *, codex_home: Path | None = None) -> Upstream:
    """The upstream ``settings`` describe; :class:`GatewayConfigError` when they cannot work."""
    problem = check_config(settings, codex_home=codex_home)
    if problem is not None:
        raise GatewayConfigError(problem)
    if settings.model_provider == "chatgpt":
        from openwham.gateway.chatgpt import ChatGPTUpstream

        return ChatGPTUpstream(resolve_codex_home(codex_home), base_url=settings.model_base_url)
    base = settings.model_base_url or OPENAI_BASE_URL
    return OpenAIUpstream(settings.model_provider, base, settings.model_api_key)
