"""The Codex CLI's ``CODEX_HOME/auth.json``: read it, refresh its tokens, write it back.

A leaf module (stdlib only, no openwham imports) shared by the model gateway's ``chatgpt``
upstream and the SDK's ``CodexAuth``, so both keep the file in the one form the Codex CLI
reads (`docs/reference/codex-cli.md` §6.3, §6.5):

- writes are atomic (temporary file, ``fsync``, ``rename``), mode 0600, and keep every field
  they do not own (``agent_identity``, ``personal_access_token``, fields of later versions);
- refreshes happen under ``flock(auth.json.lock)`` after re-reading the file, because the
  refresh token rotates: two processes refreshing with the same token would get the second one
  refused as ``refresh_token_reused`` and lose the sign-in.
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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
ISSUER = "https://auth.openai.com"
TOKEN_URL = f"{ISSUER}/oauth/token"
ORIGINATOR = "codex_cli_rs"
REFRESH_MARGIN_SECONDS = 60.0
STALE_AFTER = timedelta(days=8)
PERMANENT_REFRESH_ERRORS = {
    "refresh_token_expired",
    "refresh_token_reused",
    "refresh_token_invalidated",
}
AUTH_CLAIMS = "https://api.openai.com/auth"


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


def auth_claims(token: str | None) -> dict[str, Any]:
    """The ``https://api.openai.com/auth`` claim of a token (account, plan, user ids)."""
    auth = jwt_claims(token or "").get(AUTH_CLAIMS)
    return auth if isinstance(auth, dict) else {}


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 time as Codex writes it (nanoseconds, ``Z``); ``None`` if not one."""
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


def now_rfc3339() -> str:
    """``last_refresh`` as Codex writes it: RFC 3339, UTC, ``Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def error_code(body: Any) -> str | None:
    """The error code of an issuer answer: ``error.code``, an ``error`` string, or ``code``."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return str(error["code"])
    if isinstance(error, str):
        return error
    code = body.get("code")
    return code if isinstance(code, str) else None


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
        return auth_claims(self.id_token).get("chatgpt_account_is_fedramp") is True


class CodexAuthError(Exception):
    """``auth.json`` cannot be used. ``kind``: ``missing``, ``unreadable``, ``not_object``,
    ``no_tokens`` or ``locked``; callers turn it into their own error type. ``detail`` is the
    message without the sign-in hint."""

    def __init__(self, message: str, *, kind: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.detail = detail or message


class CodexAuthFile:
    """``CODEX_HOME/auth.json``: read, lock, and write back atomically.

    Failures go through :meth:`error`, which subclasses override to raise their own type.
    """

    def __init__(self, codex_home: Path) -> None:
        self.home = codex_home
        self.path = codex_home / "auth.json"
        self.lock_path = codex_home / "auth.json.lock"

    def login_hint(self) -> str:
        return f"sign in with `codex login` using CODEX_HOME={self.home}"

    def error(self, exc: CodexAuthError) -> Exception:
        """The exception to raise for ``exc`` (by default ``exc`` itself)."""
        return exc

    def _fail(self, kind: str, detail: str) -> Exception:
        return self.error(
            CodexAuthError(f"{detail}: {self.login_hint()}", kind=kind, detail=detail)
        )

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise self._fail("missing", f"{self.path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise self._fail("unreadable", f"cannot read {self.path} ({exc})") from None
        if not isinstance(data, dict):
            raise self._fail("not_object", f"{self.path} is not a JSON object")
        return data

    def tokens(self, data: dict[str, Any] | None = None) -> ChatGPTTokens:
        data = self.load() if data is None else data
        tokens = data.get("tokens")
        if (
            not isinstance(tokens, dict)
            or not isinstance(tokens.get("access_token"), str)
            or not isinstance(tokens.get("refresh_token"), str)
        ):
            raise self._fail(
                "no_tokens", f"{self.path} holds no ChatGPT tokens (an API-key login?)"
            )
        account_id = tokens.get("account_id")
        id_token = tokens.get("id_token")
        if not isinstance(account_id, str) or not account_id:
            account_id = auth_claims(id_token if isinstance(id_token, str) else None).get(
                "chatgpt_account_id"
            )
        return ChatGPTTokens(
            access_token=tokens["access_token"],
            refresh_token=tokens["refresh_token"],
            id_token=id_token if isinstance(id_token, str) else None,
            account_id=account_id if isinstance(account_id, str) and account_id else None,
            last_refresh=parse_time(data.get("last_refresh")),
        )

    def _locked_error(self, timeout: float) -> Exception:
        message = (
            f"{self.lock_path} stayed locked for {timeout:.0f} s: another process is "
            "refreshing the ChatGPT tokens; try again"
        )
        return self.error(CodexAuthError(message, kind="locked"))

    def _open_lock(self) -> int:
        self.home.mkdir(parents=True, exist_ok=True)
        return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    @contextlib.asynccontextmanager
    async def locked(self, timeout: float = 30.0) -> AsyncIterator[None]:
        """``flock`` on ``auth.json.lock``, polled so the event loop never blocks."""
        fd = self._open_lock()
        try:
            deadline = time.monotonic() + timeout
            while not self._try_lock(fd):
                if time.monotonic() > deadline:
                    raise self._locked_error(timeout) from None
                await asyncio.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def locked_sync(self, timeout: float = 30.0) -> Iterator[None]:
        """The same lock for threads and plain scripts (polled, so ``timeout`` holds)."""
        fd = self._open_lock()
        try:
            deadline = time.monotonic() + timeout
            while not self._try_lock(fd):
                if time.monotonic() > deadline:
                    raise self._locked_error(timeout) from None
                time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def try_lock(self) -> int | None:
        """Take the lock without waiting: its descriptor (give it to :meth:`unlock`), or
        ``None`` when another holder has it. For callers that wait their own way."""
        fd = self._open_lock()
        if self._try_lock(fd):
            return fd
        os.close(fd)
        return None

    @staticmethod
    def unlock(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def write(self, data: dict[str, Any]) -> None:
        """Replace ``auth.json`` atomically (mode 0600), so readers see old or new, never half."""
        self.home.mkdir(parents=True, exist_ok=True)
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


def refresh_body(client_id: str, reason: str, refresh_token: str) -> dict[str, str]:
    """The JSON body Codex 0.169.0 posts to the token URL to refresh (§6.5)."""
    return {
        "client_id": client_id,
        "grant_type": "refresh_token",
        "refresh_reason": reason,
        "refresh_token": refresh_token,
    }


def apply_refresh(
    data: dict[str, Any], payload: dict[str, Any], *, replace_account_id: bool = False
) -> None:
    """Store a refresh answer in ``data`` (the whole auth.json) in place.

    Tokens present in the answer replace the stored ones (the refresh token rotates),
    ``last_refresh`` becomes now, everything else is kept. The account id comes from the id
    token's claim when none is stored, or always with ``replace_account_id``.
    """
    tokens = data.setdefault("tokens", {})
    for key in ("id_token", "access_token", "refresh_token"):
        value = payload.get(key)
        if isinstance(value, str) and value:
            tokens[key] = value
    if replace_account_id or not tokens.get("account_id"):
        account = auth_claims(str(tokens.get("id_token") or "")).get("chatgpt_account_id")
        if isinstance(account, str) and account:
            tokens["account_id"] = account
    data["last_refresh"] = now_rfc3339()
