"""The ``chatgpt`` upstream: a ChatGPT plan's Codex access, from a Codex ``auth.json``.

Implemented from the documented behaviour of Codex CLI 0.169.0
(``../shared/reference/codex-cli.md`` §6.3, §6.5, §7.1); **untested against the live
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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from openwham.gateway.upstream import Upstream, UpstreamError

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
TOKEN_URL = "https://auth.openai.com/oauth/token"
BACKEND_URL = "https://chatgpt.com/backend-api/codex"
REFRESH_MARGIN_SECONDS = 60.0
STALE_AFTER = timedelta(days=8)
PERMANENT_REFRESH_ERRORS = {
    "refresh_token_expired",
    "refresh_token_reused",
    "refresh_token_invalidated",
}
_AUTH_CLAIMS = "https://api.openai.com/auth"


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, decoded without verifying it (as Codex does); ``{}`` if opaque."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    text = value.strip().replace("Z", "+00:00")
    # Codex writes nanoseconds; fromisoformat takes at most microseconds.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ChatGPTTokens:
    access_token: str
    refresh_token: str
    id_token: str | None
    account_id: str | None
    last_refresh: datetime | None

    def expires_at(self) -> float | None:
        exp = jwt_claims(self.access_token).get("exp")
        return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None

    def needs_refresh(self, margin: float = REFRESH_MARGIN_SECONDS) -> bool:
        expires = self.expires_at()
        if expires is not None:
            return expires - time.time() < margin
        if self.last_refresh is None:
            return True
        return datetime.now(UTC) - self.last_refresh > STALE_AFTER

    def fedramp(self) -> bool:
        auth = jwt_claims(self.id_token or "").get(_AUTH_CLAIMS)
        return isinstance(auth, dict) and auth.get("chatgpt_account_is_fedramp") is True


class CodexAuthFile:
    """``CODEX_HOME/auth.json``: read, lock, and write back atomically."""

    def __init__(self, codex_home: Path) -> None:
        self.home = codex_home
        self.path = codex_home / "auth.json"
        self.lock_path = codex_home / "auth.json.lock"

    def login_hint(self) -> str:
        return f"sign in with `codex login` using CODEX_HOME={self.home} (or set WHAM_CODEX_HOME)"

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise UpstreamError(
                f"WHAM_MODEL_PROVIDER=chatgpt needs Codex sign-in tokens, but {self.path} "
                f"does not exist: {self.login_hint()}",
                code="upstream_not_configured",
                permanent=True,
            ) from None
        except (OSError, ValueError) as exc:
            raise UpstreamError(
                f"cannot read {self.path} ({exc}): {self.login_hint()}",
                code="upstream_not_configured",
                permanent=True,
            ) from None
        if not isinstance(data, dict):
            raise UpstreamError(
                f"{self.path} is not a JSON object: {self.login_hint()}",
                code="upstream_not_configured",
                permanent=True,
            )
        return data

    def tokens(self, data: dict[str, Any] | None = None) -> ChatGPTTokens:
        data = self.load() if data is None else data
        tokens = data.get("tokens")
        if (
            not isinstance(tokens, dict)
            or not isinstance(tokens.get("access_token"), str)
            or not isinstance(tokens.get("refresh_token"), str)
        ):
            raise UpstreamError(
                f"{self.path} holds no ChatGPT tokens (an API-key login?): {self.login_hint()}",
                code="upstream_not_configured",
                permanent=True,
            )
        account_id = tokens.get("account_id")
        id_token = tokens.get("id_token")
        if not isinstance(account_id, str) or not account_id:
            auth = jwt_claims(id_token if isinstance(id_token, str) else "").get(_AUTH_CLAIMS)
            account_id = auth.get("chatgpt_account_id") if isinstance(auth, dict) else None
        return ChatGPTTokens(
            access_token=tokens["access_token"],
            refresh_token=tokens["refresh_token"],
            id_token=id_token if isinstance(id_token, str) else None,
            account_id=account_id if isinstance(account_id, str) and account_id else None,
            last_refresh=_parse_time(data.get("last_refresh")),
        )

    def problem(self) -> str | None:
        try:
            self.tokens()
        except UpstreamError as exc:
            return exc.message
        return None

    @contextlib.asynccontextmanager
    async def locked(self, timeout: float = 30.0) -> AsyncIterator[None]:
        """``flock`` on ``auth.json.lock``, polled so the event loop never blocks."""
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise UpstreamError(
                            f"{self.lock_path} stayed locked for {timeout:.0f} s: another "
                            "process is refreshing the ChatGPT tokens; try again"
                        ) from None
                    await asyncio.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def write(self, data: dict[str, Any]) -> None:
        """Replace ``auth.json`` atomically (mode 0600), so readers see old or new, never half."""
        tmp = self.path.with_name(f".auth.json.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=2)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        dir_fd = os.open(self.home, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _error_code(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return str(error["code"])
    if isinstance(error, str):
        return error
    code = body.get("code")
    return code if isinstance(code, str) else None


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
        #: how many refreshes this process made (for tests and diagnostics)
        self.refreshes = 0

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
            body = {
                "client_id": self.client_id,
                "grant_type": "refresh_token",
                "refresh_reason": reason,
                "refresh_token": current.refresh_token,
            }
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
                code = _error_code(payload)
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
            tokens = data.setdefault("tokens", {})
            for key in ("id_token", "access_token", "refresh_token"):
                value = payload.get(key)
                if isinstance(value, str) and value:
                    tokens[key] = value
            if not tokens.get("account_id"):
                auth = jwt_claims(str(tokens.get("id_token") or "")).get(_AUTH_CLAIMS)
                if isinstance(auth, dict) and isinstance(auth.get("chatgpt_account_id"), str):
                    tokens["account_id"] = auth["chatgpt_account_id"]
            data["last_refresh"] = _now_rfc3339()
            self.auth.write(data)
            self.refreshes += 1
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
