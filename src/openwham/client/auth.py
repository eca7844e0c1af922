"""``httpx.Auth`` for the SDK: Codex ``auth.json`` tokens (chatgpt.com) and static bearer tokens.

``CodexAuth`` reads the same ``$CODEX_HOME/auth.json`` as the Codex CLI and keeps it usable by
it (`docs/reference/codex-cli.md` §6.3-§6.5): the access token is refreshed when it
expires within 60 s (or, without ``exp``, when ``last_refresh`` is 8 days old) and once after a
401, under ``flock(auth.json.lock)``, writing the rotated tokens back atomically. One auth flow
serves ``httpx.Client`` and ``httpx.AsyncClient``: the refresh is a request the flow yields (as
httpx's ``DigestAuth`` yields its challenge answer), so no second HTTP client is involved and the
caller's transport, proxies and certificates apply to the token endpoint too.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from openwham import codexauth
from openwham.client.errors import AuthError, NotLoggedIn, SessionExpired
from openwham.codexauth import (
    CLIENT_ID,
    ORIGINATOR,
    PERMANENT_REFRESH_ERRORS,
    REFRESH_MARGIN_SECONDS,
    TOKEN_URL,
    ChatGPTTokens,
    CodexAuthError,
    apply_refresh,
    error_code,
    refresh_body,
)

LOGIN_HINT = "run `wham login`"
AUTHAPI_BASE_URL = "https://auth.openai.com/api/accounts"
_INTERNAL = "openwham.client.auth"  # marks the requests the flow itself makes
_INTERNAL_TIMEOUT = httpx.Timeout(30.0).as_dict()
_LOCK_TIMEOUT = 30.0


def default_codex_home() -> Path:
    """``$CODEX_HOME``, else ``~/.codex``: where the Codex CLI keeps ``auth.json``."""
    home = os.environ.get("CODEX_HOME")
    return Path(home).expanduser() if home else Path.home() / ".codex"


class AuthFile(codexauth.CodexAuthFile):
    """``auth.json`` whose failures are the SDK's errors."""

    def login_hint(self) -> str:
        return LOGIN_HINT

    def error(self, exc: CodexAuthError) -> Exception:
        if exc.kind == "locked":
            return AuthError(exc.message)
        if exc.kind == "missing":
            return NotLoggedIn(f"not logged in: {self.path} does not exist", hint=LOGIN_HINT)
        return NotLoggedIn(exc.detail, hint=LOGIN_HINT)


@dataclass(frozen=True)
class _Pause:
    """Asks the driver to sleep (the sync one blocks, the async one awaits)."""

    seconds: float


_Step = httpx.Request | _Pause
_Flow = Generator[_Step, httpx.Response | None, Any]


class CodexAuth(httpx.Auth):
    """Authenticates to chatgpt.com's Codex backend with the tokens of a Codex ``auth.json``.

    Sets ``Authorization: Bearer <access_token>``, ``ChatGPT-Account-Id`` and, for FedRAMP
    accounts, ``X-OpenAI-Fedramp: true``. Raises ``NotLoggedIn`` when there is no usable
    sign-in, ``SessionExpired`` when the refresh token is dead for good (expired, reused,
    invalidated), ``AuthError`` for other refresh failures (transient). A network failure
    reaching the token endpoint surfaces as the ``httpx`` transport error of the request.

    A personal access token (``at-…``: the ``personal_access_token`` argument, else
    ``CODEX_ACCESS_TOKEN``, else ``auth.json``'s ``personal_access_token`` when the file holds no
    ChatGPT tokens) is sent as is; its account id comes from the whoami call of §6.4
    (``CODEX_AUTHAPI_BASE_URL`` overrides the base), made once.
    """

    requires_request_body = True  # a 401 is answered by sending the same request again

    def __init__(
        self,
        codex_home: Path | None = None,
        *,
        token_url: str | None = None,
        client_id: str | None = None,
        personal_access_token: str | None = None,
        authapi_base_url: str | None = None,
        refresh_margin: float = REFRESH_MARGIN_SECONDS,
    ) -> None:
        self.file = AuthFile(codex_home if codex_home is not None else default_codex_home())
        self.token_url = (
            token_url or os.environ.get("CODEX_REFRESH_TOKEN_URL_OVERRIDE") or TOKEN_URL
        )
        self.client_id = (
            client_id or os.environ.get("CODEX_APP_SERVER_LOGIN_CLIENT_ID") or CLIENT_ID
        )
        self.personal_access_token = personal_access_token or os.environ.get("CODEX_ACCESS_TOKEN")
        self.authapi_base_url = (
            authapi_base_url or os.environ.get("CODEX_AUTHAPI_BASE_URL") or AUTHAPI_BASE_URL
        ).rstrip("/")
        self.refresh_margin = refresh_margin
        self._pat_account: dict[str, str | None] = {}

    @property
    def path(self) -> Path:
        return self.file.path

    def tokens(self) -> ChatGPTTokens:
        """The tokens as stored now (no refresh); raises ``NotLoggedIn``."""
        return self.file.tokens()

    # ------------------------------------------------------------------ drivers

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        request.read()
        flow = self._flow(request)
        try:
            step = next(flow)
            while True:
                if isinstance(step, _Pause):
                    time.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                response = yield step
                if step.extensions.get(_INTERNAL):
                    response.read()
                step = flow.send(response)
        except StopIteration:
            return
        finally:
            flow.close()  # releases the lock if httpx gave up half-way

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()
        flow = self._flow(request)
        try:
            step = next(flow)
            while True:
                if isinstance(step, _Pause):
                    await anyio.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                response = yield step
                if step.extensions.get(_INTERNAL):
                    await response.aread()
                step = flow.send(response)
        except StopIteration:
            return
        finally:
            flow.close()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """httpx calls the two drivers above; this is the sync one for direct callers."""
        yield from self.sync_auth_flow(request)

    # ------------------------------------------------------------------ the flow

    def _flow(self, request: httpx.Request) -> _Flow:
        pat = self._personal_access_token()
        if pat is not None:
            yield from self._pat_flow(request, pat)
            return
        tokens = self.file.tokens()
        if tokens.needs_refresh(self.refresh_margin):
            tokens = yield from self._refresh("proactive_expiry", tokens)
        self._sign(request, tokens)
        response = yield request
        if response is None or response.status_code != 401:
            return
        # Another process may have refreshed since we read the file: then just retry.
        current = self.file.tokens()
        if (
            current.access_token == tokens.access_token
            or current.account_id != tokens.account_id
            or current.needs_refresh(self.refresh_margin)
        ):
            current = yield from self._refresh("unauthorized_recovery", tokens)
        self._sign(request, current)
        yield request

    def _sign(self, request: httpx.Request, tokens: ChatGPTTokens) -> None:
        request.headers["Authorization"] = f"Bearer {tokens.access_token}"
        if tokens.account_id:
            request.headers["ChatGPT-Account-Id"] = tokens.account_id
        if tokens.fedramp():
            request.headers["X-OpenAI-Fedramp"] = "true"

    def _lock(self) -> Generator[_Step, httpx.Response | None, int]:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            fd = self.file.try_lock()
            if fd is not None:
                return fd
            if time.monotonic() > deadline:
                raise AuthError(
                    f"{self.file.lock_path} stayed locked for {_LOCK_TIMEOUT:.0f} s: another "
                    "process is refreshing the ChatGPT tokens; try again"
                )
            yield _Pause(0.05)

    def _refresh(
        self, reason: str, seen: ChatGPTTokens
    ) -> Generator[_Step, httpx.Response | None, ChatGPTTokens]:
        fd = yield from self._lock()
        try:
            data = self.file.load()
            current = self.file.tokens(data)
            if current.access_token != seen.access_token and not current.needs_refresh(
                self.refresh_margin
            ):
                return current  # another process refreshed while we waited for the lock
            if not current.refresh_token:
                raise SessionExpired(
                    f"the ChatGPT sign-in in {self.file.path} has no refresh token and its "
                    "access token is expired or refused",
                    hint=f"{LOGIN_HINT} again",
                )
            answer = yield httpx.Request(
                "POST",
                self.token_url,
                json=refresh_body(self.client_id, reason, current.refresh_token),
                headers={"originator": ORIGINATOR},
                extensions={_INTERNAL: True, "timeout": _INTERNAL_TIMEOUT},
            )
            assert answer is not None
            payload = _json(answer)
            if answer.status_code != 200 or not isinstance(payload, dict):
                code = error_code(payload)
                if code in PERMANENT_REFRESH_ERRORS:
                    raise SessionExpired(
                        f"the ChatGPT sign-in in {self.file.path} can no longer be refreshed "
                        f"({code}): run `wham login` again",
                        hint=f"{LOGIN_HINT} again",
                    )
                raise AuthError(
                    f"refreshing the ChatGPT access token failed (HTTP {answer.status_code}"
                    f"{', ' + code if code else ''}); this is likely transient, try again",
                    hint=f"if it persists, {LOGIN_HINT} again",
                )
            apply_refresh(data, payload, replace_account_id=True)
            self.file.write(data)
            return self.file.tokens(data)
        finally:
            self.file.unlock(fd)

    # ------------------------------------------------------------------ personal access token

    def _personal_access_token(self) -> str | None:
        if self.personal_access_token:
            return self.personal_access_token
        data = self.file.load()
        if isinstance(data.get("tokens"), dict):
            return None
        pat = data.get("personal_access_token")
        return pat if isinstance(pat, str) and pat else None

    def _pat_flow(self, request: httpx.Request, pat: str) -> _Flow:
        if pat not in self._pat_account:
            answer = yield httpx.Request(
                "GET",
                f"{self.authapi_base_url}/v1/user-auth-credential/whoami",
                headers={"Authorization": f"Bearer {pat}", "originator": ORIGINATOR},
                extensions={_INTERNAL: True, "timeout": _INTERNAL_TIMEOUT},
            )
            assert answer is not None
            payload = _json(answer)
            if answer.status_code in (401, 403):
                raise SessionExpired(
                    f"the personal access token was refused (HTTP {answer.status_code})",
                    hint=f"create a new one, or {LOGIN_HINT}",
                )
            if answer.status_code != 200 or not isinstance(payload, dict):
                raise AuthError(
                    f"looking up the personal access token failed (HTTP {answer.status_code});"
                    " this is likely transient, try again"
                )
            account = payload.get("chatgpt_account_id")
            self._pat_account[pat] = account if isinstance(account, str) and account else None
        request.headers["Authorization"] = f"Bearer {pat}"
        account_id = self._pat_account[pat]
        if account_id:
            request.headers["ChatGPT-Account-Id"] = account_id
        yield request


class BearerAuth(httpx.Auth):
    """A static bearer token (openwham servers), with the account it acts for if given."""

    def __init__(self, token: str, account_id: str | None = None) -> None:
        self.token = token
        self.account_id = account_id

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        if self.account_id:
            request.headers["ChatGPT-Account-Id"] = self.account_id
        yield request


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
