"""The ``chatgpt`` upstream: a ChatGPT plan's Codex access, from a Codex ``auth.json``.

Implemented from the documented behaviour of Codex CLI 0.169.0
(`docs/reference/codex-cli.md` §6.3, §6.5, §7.1); **untested against the live
service** (the tests use local stand-ins for the issuer and the backend).

- Requests go to ``https://chatgpt.com/backend-api/codex/responses`` (``WHAM_MODEL_BASE_URL``
  overrides the base) with ``Authorization: Bearer <tokens.access_token>`` and
  ``ChatGPT-Account-Id: <tokens.account_id>``.
- The access token is refreshed when its JWT ``exp`` is less than 60 s away (or, without
  ``exp``, when ``last_refresh`` is older than 8 days), and once after a 401: ``POST
  https://auth.openai.com/oauth/token`` (``CODEX_REFRESH_TOKEN_URL_OVERRIDE`` overrides) with
  the public Codex client id. The refresh token rotates, so the answer is written back to
  ``auth.json`` at once: under ``flock(auth.json.lock)``, re-reading the file first (another
  process may have refreshed already), replacing it atomically and keeping its other fields.
  The file handling lives in :mod:`openwham.codexauth`, shared with the SDK's ``CodexAuth``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx

from openwham import codexauth
from openwham.codexauth import (
    CLIENT_ID,
    PERMANENT_REFRESH_ERRORS,
    REFRESH_MARGIN_SECONDS,
    STALE_AFTER,
    TOKEN_URL,
    ChatGPTTokens,
    CodexAuthError,
    apply_refresh,
    error_code,
    jwt_claims,
    refresh_body,
)
from openwham.gateway.upstream import Upstream, UpstreamError

__all__ = [
    "BACKEND_URL",
    "CLIENT_ID",
    "PERMANENT_REFRESH_ERRORS",
    "REFRESH_MARGIN_SECONDS",
    "STALE_AFTER",
    "TOKEN_URL",
    "ChatGPTTokens",
    "ChatGPTUpstream",
    "CodexAuthFile",
    "jwt_claims",
]

BACKEND_URL = "https://chatgpt.com/backend-api/codex"


class CodexAuthFile(codexauth.CodexAuthFile):
    """``CODEX_HOME/auth.json`` whose failures are ``UpstreamError``s the agent is answered."""

    def login_hint(self) -> str:
        return f"sign in with `codex login` using CODEX_HOME={self.home} (or set WHAM_CODEX_HOME)"

    def error(self, exc: CodexAuthError) -> Exception:
        if exc.kind == "locked":
            return UpstreamError(exc.message)
        message = exc.message
        if exc.kind == "missing":
            message = f"WHAM_MODEL_PROVIDER=chatgpt needs Codex sign-in tokens, but {message}"
        return UpstreamError(message, code="upstream_not_configured", permanent=True)

    def problem(self) -> str | None:
        try:
            self.tokens()
        except UpstreamError as exc:
            return exc.message
        return None


class ChatGPTUpstream(Upstream):
    """Forwards to the ChatGPT Codex backend with the tokens of a Codex ``auth.json``."""

    provider = "chatgpt"

    def __init__(
        self,
        codex_home: Path,
        *,
        base_url: str | None = None,
        token_url: str | None = None,
        client_id: str = CLIENT_ID,
        refresh_margin: float = REFRESH_MARGIN_SECONDS,
    ) -> None:
        self.auth = CodexAuthFile(codex_home)
        self.base_url = (base_url or BACKEND_URL).rstrip("/")
        self.token_url = (
            token_url or os.environ.get("CODEX_REFRESH_TOKEN_URL_OVERRIDE") or TOKEN_URL
        )
        self.client_id = client_id
        self.refresh_margin = refresh_margin
        self._tokens: ChatGPTTokens | None = None
        self._mutex: asyncio.Lock | None = None

    def _lock(self) -> asyncio.Lock:
        if self._mutex is None:
            self._mutex = asyncio.Lock()
        return self._mutex

    async def auth_headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        async with self._lock():
            tokens = self.auth.tokens()  # re-read: another process may have rotated them
            if tokens.needs_refresh(self.refresh_margin):
                tokens = await self._refresh(client, "proactive_expiry", tokens)
            self._tokens = tokens
        headers = {"authorization": f"Bearer {tokens.access_token}"}
        if tokens.account_id:
            headers["chatgpt-account-id"] = tokens.account_id
        if tokens.fedramp():
            headers["x-openai-fedramp"] = "true"
        return headers

    async def recover_unauthorized(self, client: httpx.AsyncClient) -> bool:
        async with self._lock():
            failed = self._tokens
            self._tokens = await self._refresh(client, "unauthorized_recovery", failed)
        return True

    async def _refresh(
        self, client: httpx.AsyncClient, reason: str, seen: ChatGPTTokens | None
    ) -> ChatGPTTokens:
        async with self.auth.locked():
            data = self.auth.load()
            current = self.auth.tokens(data)
            if (
                seen is not None
                and current.access_token != seen.access_token
                and not current.needs_refresh(self.refresh_margin)
            ):
                return current  # someone else refreshed while we waited for the lock
            body = refresh_body(self.client_id, reason, current.refresh_token)
            try:
                answer = await client.post(
                    self.token_url,
                    json=body,
                    headers={"originator": "codex_cli_rs", "user-agent": "openwham-gateway"},
                )
            except httpx.HTTPError as exc:
                raise UpstreamError(
                    f"ChatGPT token endpoint {self.token_url} is unreachable "
                    f"({type(exc).__name__}): check this host's network access to "
                    "auth.openai.com",
                    code="upstream_unreachable",
                ) from None
            try:
                payload = answer.json()
            except ValueError:
                payload = None
            if answer.status_code != 200 or not isinstance(payload, dict):
                code = error_code(payload)
                if code in PERMANENT_REFRESH_ERRORS:
                    raise UpstreamError(
                        f"the ChatGPT sign-in in {self.auth.path} can no longer be refreshed "
                        f"({code}): {self.auth.login_hint()}",
                        code="upstream_auth_failed",
                        permanent=True,
                    )
                raise UpstreamError(
                    f"refreshing the ChatGPT access token failed (HTTP {answer.status_code}"
                    f"{', ' + code if code else ''}); if it persists, {self.auth.login_hint()}",
                    code="upstream_auth_failed",
                )
            apply_refresh(data, payload)
            self.auth.write(data)
            return self.auth.tokens(data)

    def secrets(self) -> list[str]:
        tokens = self._tokens
        if tokens is None:
            return []
        return [t for t in (tokens.access_token, tokens.refresh_token, tokens.id_token) if t]

    def rejected_message(self, status: int) -> str:
        return (
            f"the ChatGPT Codex backend {self.base_url} rejected the sign-in from "
            f"{self.auth.path} (HTTP {status}): {self.auth.login_hint()}"
        )

    def unreachable_message(self, reason: str) -> str:
        if self.base_url == BACKEND_URL:
            return (
                f"model upstream {self.base_url} is unreachable ({reason}): check this host's "
                "network access to chatgpt.com (or set WHAM_MODEL_BASE_URL)"
            )
        return super().unreachable_message(reason)
