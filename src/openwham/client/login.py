"""Sign in to ChatGPT the way the Codex CLI does, writing the ``auth.json`` it reads.

Implements `docs/reference/codex-cli.md` §6.3, §6.5-§6.7 (Codex CLI 0.169.0): the
browser flow (authorization code + PKCE, local callback server on ``127.0.0.1:1455``), the
device-code flow, logout (revoke, then delete) and an offline status. The result is the file
``codex login`` writes (``auth_mode: "chatgpt"``, ``tokens`` with ``oauth_provenance`` and
``login_owner_id``, ``last_refresh``), mode 0600, replaced atomically under
``auth.json.lock``, so the Codex CLI and ``CodexAuth`` share the sign-in.

The issuer is, in order: the ``issuer`` argument, ``WHAM_AUTH_ISSUER``, ``https://auth.openai.com``
(a test stand-in or a staging issuer replaces it); the client id: the ``client_id`` argument,
``CODEX_APP_SERVER_LOGIN_CLIENT_ID``, the public Codex client id. The Codex CLI reads this
file when its credential store allows files (``cli_auth_credentials_store = "file"`` guarantees
it, §6.1).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import html
import os
import secrets
import threading
import time
import webbrowser
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from openwham.client.auth import AuthFile, default_codex_home
from openwham.client.errors import AuthError, NotLoggedIn
from openwham.codexauth import (
    CLIENT_ID,
    ISSUER,
    ORIGINATOR,
    auth_claims,
    error_code,
    jwt_claims,
    now_rfc3339,
    parse_time,
)

DEFAULT_ISSUER = ISSUER
DEFAULT_PORT = 1455
SCOPE = "openid profile email offline_access api.connectors.read api.connectors.invoke"
PLATFORM_URL = "https://platform.openai.com"
DEVICE_TIMEOUT = 900.0  # the user code expires after 15 minutes
SLOW_DOWN_STEP = 5.0
_HTTP_TIMEOUT = 30.0


def resolve_issuer(issuer: str | None = None) -> str:
    """The issuer base URL: argument, ``WHAM_AUTH_ISSUER``, or ``https://auth.openai.com``."""
    return (issuer or os.environ.get("WHAM_AUTH_ISSUER") or DEFAULT_ISSUER).rstrip("/")


def resolve_client_id(client_id: str | None = None) -> str:
    """The OAuth client id: argument, ``CODEX_APP_SERVER_LOGIN_CLIENT_ID``, or Codex's own."""
    return client_id or os.environ.get("CODEX_APP_SERVER_LOGIN_CLIENT_ID") or CLIENT_ID


@dataclass(frozen=True)
class LoginResult:
    """Who signed in, and where the tokens were written."""

    path: Path
    email: str | None
    account_id: str | None
    plan_type: str | None
    api_key_saved: bool = False


@dataclass(frozen=True)
class AuthStatus:
    """What ``auth.json`` holds, read offline. ``mode``: ``chatgpt``, ``apikey`` or ``pat``.

    Times are epoch seconds (as everywhere in WHAM), so the status prints as JSON as is;
    ``expires_at`` is the access token's (a refresh renews it while the refresh token lives).
    """

    mode: str
    path: Path
    email: str | None = None
    plan_type: str | None = None
    account_id: str | None = None
    expires_at: float | None = None
    last_refresh: float | None = None
    issuer: str | None = None
    api_key_hint: str | None = None


@dataclass(frozen=True)
class Pkce:
    """A PKCE pair: 64 random bytes as base64url (86 characters) and its S256 challenge."""

    verifier: str
    challenge: str

    @classmethod
    def generate(cls) -> Pkce:
        verifier = _b64url(secrets.token_bytes(64))
        return cls(verifier, _b64url(hashlib.sha256(verifier.encode()).digest()))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def authorize_url(
    issuer: str,
    client_id: str,
    redirect_uri: str,
    pkce: Pkce,
    state: str,
    workspace_id: str | None = None,
) -> str:
    """``{issuer}/oauth/authorize`` with the parameters of §6.6, in Codex's order."""
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": SCOPE,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "id_token_add_organizations": "true",
        "codex_cli_simplified_flow": "true",
        "state": state,
        "originator": ORIGINATOR,
    }
    if workspace_id:
        params["allowed_workspace_id"] = workspace_id
    return f"{issuer}/oauth/authorize?{urlencode(params)}"


# ---------------------------------------------------------------------------- issuer calls


@contextlib.contextmanager
def _http(issuer: str) -> Iterator[httpx.Client]:
    """A client for the issuer; network failures become one-line ``AuthError``s."""
    with httpx.Client(timeout=_HTTP_TIMEOUT) as client:
        del client.headers["user-agent"]  # Codex sends the token exchange without one
        try:
            yield client
        except httpx.HTTPError as exc:
            raise AuthError(
                f"cannot reach the sign-in server {issuer} ({type(exc).__name__}: {exc})",
                hint="check this machine's network access",
            ) from None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _describe(response: httpx.Response) -> str:
    code = error_code(_json(response))
    return f"HTTP {response.status_code}{', ' + code if code else ''}"


def exchange_code(
    http: httpx.Client,
    issuer: str,
    client_id: str,
    code: str,
    redirect_uri: str,
    code_verifier: str,
) -> dict[str, str]:
    """Trade an authorization code for ``{id_token, access_token, refresh_token}`` (form POST)."""
    answer = http.post(
        f"{issuer}/oauth/token",
        data={
            "grant_type": "authorization_code",
            "client_id": client_id,
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        },
    )
    payload = _json(answer)
    if answer.status_code != 200 or not isinstance(payload, dict):
        raise AuthError(f"the sign-in server refused the authorization code ({_describe(answer)})")
    tokens = {k: payload.get(k) for k in ("id_token", "access_token", "refresh_token")}
    missing = [k for k, v in tokens.items() if not isinstance(v, str) or not v]
    if missing:
        raise AuthError(f"the sign-in server's answer lacks {', '.join(missing)}")
    return {k: str(v) for k, v in tokens.items()}


def exchange_api_key(http: httpx.Client, issuer: str, client_id: str, id_token: str) -> str | None:
    """The API key for the signed-in organisation, or ``None`` (best effort, as in Codex)."""
    try:
        answer = http.post(
            f"{issuer}/oauth/token",
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "client_id": client_id,
                "requested_token": "openai-api-key",
                "subject_token": id_token,
                "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
            },
        )
    except httpx.HTTPError:
        return None
    payload = _json(answer)
    if answer.status_code != 200 or not isinstance(payload, dict):
        return None
    key = payload.get("access_token")
    return key if isinstance(key, str) and key else None


def save_login(
    codex_home: Path,
    tokens: dict[str, str],
    *,
    issuer: str,
    client_id: str,
    api_key: str | None = None,
) -> LoginResult:
    """Write ``auth.json`` as ``codex login`` does (§6.3), replacing any earlier sign-in."""
    claims = auth_claims(tokens["id_token"])
    account_id = claims.get("chatgpt_account_id")
    token_data: dict[str, Any] = {
        "id_token": tokens["id_token"],
        "access_token": tokens["access_token"],
        "refresh_token": tokens["refresh_token"],
    }
    if isinstance(account_id, str) and account_id:
        token_data["account_id"] = account_id
    token_data["oauth_provenance"] = {"issuer": issuer, "client_id": client_id}
    token_data["login_owner_id"] = _b64url(secrets.token_bytes(16))
    data = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": api_key,
        "tokens": token_data,
        "last_refresh": now_rfc3339(),
    }
    file = AuthFile(codex_home)
    with file.locked_sync():
        file.write(data)
    email = jwt_claims(tokens["id_token"]).get("email")
    plan = claims.get("chatgpt_plan_type")
    return LoginResult(
        path=file.path,
        email=email if isinstance(email, str) else None,
        account_id=token_data.get("account_id"),
        plan_type=plan if isinstance(plan, str) else None,
        api_key_saved=api_key is not None,
    )


# ---------------------------------------------------------------------------- browser login


_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
    "<body style='font-family:sans-serif;margin:4em auto;max-width:36em'>"
    "<h1>{title}</h1><p>{text}</p></body></html>"
)


class _LoginServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class _BrowserLogin:
    """The state the callback server shares with ``login_browser``."""

    codex_home: Path
    issuer: str
    client_id: str
    pkce: Pkce
    state: str
    redirect_uri: str
    port: int
    workspace_id: str | None
    result: LoginResult | None = None
    failure: AuthError | None = None

    def __post_init__(self) -> None:
        self.done = threading.Event()
        self.success_served = threading.Event()
        self.mutex = threading.Lock()

    def finish(self, result: LoginResult | None, failure: AuthError | None) -> None:
        self.result, self.failure = result, failure
        self.done.set()

    def callback(self, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        """Answer ``/auth/callback``: (status, headers, page)."""
        if query.get("error"):
            text = query.get("error_description") or query["error"]
            self.finish(None, AuthError(f"sign-in failed: {text}"))
            return 400, {}, _PAGE.format(title="Sign-in failed", text=html.escape(text))
        if query.get("state") != self.state:
            # Not our browser's answer: refuse it and keep waiting for the real one.
            return 400, {}, _PAGE.format(title="State mismatch", text="Start the login again.")
        code = query.get("code")
        if not code:
            return 400, {}, _PAGE.format(title="Missing authorization code", text="")
        with self.mutex:
            if self.done.is_set():
                return 409, {}, _PAGE.format(title="Login already finished", text="")
            try:
                with _http(self.issuer) as http:
                    verifier = self.pkce.verifier
                    tokens = exchange_code(
                        http, self.issuer, self.client_id, code, self.redirect_uri, verifier
                    )
                    if self.workspace_id:
                        account = auth_claims(tokens["id_token"]).get("chatgpt_account_id")
                        if account != self.workspace_id:
                            raise AuthError(
                                f"signed in to workspace {account}, but this login requires "
                                f"workspace {self.workspace_id}"
                            )
                    api_key = exchange_api_key(
                        http, self.issuer, self.client_id, tokens["id_token"]
                    )
                result = save_login(
                    self.codex_home,
                    tokens,
                    issuer=self.issuer,
                    client_id=self.client_id,
                    api_key=api_key,
                )
            except AuthError as exc:
                self.finish(None, exc)
                return 500, {}, _PAGE.format(title="Sign-in failed", text=html.escape(str(exc)))
            self.finish(result, None)
        return 302, {"Location": self.success_url(tokens["id_token"])}, ""

    def success_url(self, id_token: str) -> str:
        claims = auth_claims(id_token)
        needs_setup = bool(claims.get("is_org_owner")) and not claims.get(
            "completed_platform_onboarding"
        )
        params = {
            "id_token": id_token,
            "needs_setup": "true" if needs_setup else "false",
            "org_id": str(claims.get("organization_id") or ""),
            "project_id": str(claims.get("project_id") or ""),
            "plan_type": str(claims.get("chatgpt_plan_type") or ""),
            "platform_url": PLATFORM_URL,
        }
        return f"http://127.0.0.1:{self.port}/success?{urlencode(params)}"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        login = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                headers: dict[str, str] = {}
                if url.path == "/auth/callback":
                    status, headers, page = login.callback(query)
                elif url.path == "/success":
                    status, page = (
                        200,
                        _PAGE.format(
                            title="Signed in to Codex",
                            text="You may now close this page and return to the terminal.",
                        ),
                    )
                    login.success_served.set()
                elif url.path == "/cancel":
                    login.finish(None, AuthError("login cancelled (another login took its port)"))
                    status, page = 200, _PAGE.format(title="Login cancelled", text="")
                else:
                    status, page = 404, _PAGE.format(title="Not found", text="")
                body = page.encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the terminal belongs to the CLI

        return Handler


def _bind(port: int, handler: type[BaseHTTPRequestHandler]) -> _LoginServer:
    """Listen on ``127.0.0.1:port``; an earlier login server holding it is told to ``/cancel``."""
    for attempt in range(10):
        try:
            return _LoginServer(("127.0.0.1", port), handler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise AuthError(f"cannot listen on 127.0.0.1:{port} ({exc})") from None
            if attempt == 0:
                with contextlib.suppress(httpx.HTTPError):
                    httpx.get(f"http://127.0.0.1:{port}/cancel", timeout=2.0)
            time.sleep(0.2)
    raise AuthError(
        f"port {port} on 127.0.0.1 is in use: close whatever holds it (an earlier login?) "
        "or use the device-code login"
    )


def login_browser(
    codex_home: Path | None = None,
    *,
    issuer: str | None = None,
    client_id: str | None = None,
    port: int = DEFAULT_PORT,
    open_browser: Callable[[str], object] = webbrowser.open,
    timeout: float = 600.0,
    workspace_id: str | None = None,
) -> LoginResult:
    """Browser sign-in (§6.6): serve ``/auth/callback`` on ``127.0.0.1:port``, hand the
    authorize URL to ``open_browser`` (which may block, as a test's scripted browser does),
    wait up to ``timeout`` seconds for the callback, exchange the code, save ``auth.json``.

    ``port=0`` takes a free port (the redirect URI names the real one); the real issuer only
    accepts 1455. ``workspace_id`` restricts the sign-in to one ChatGPT workspace.
    """
    home = codex_home if codex_home is not None else default_codex_home()
    issuer_url = resolve_issuer(issuer)
    login = _BrowserLogin(
        codex_home=home,
        issuer=issuer_url,
        client_id=resolve_client_id(client_id),
        pkce=Pkce.generate(),
        state=_b64url(secrets.token_bytes(32)),
        redirect_uri="",
        port=port,
        workspace_id=workspace_id,
    )
    server = _bind(port, login.handler())
    login.port = server.server_address[1]
    login.redirect_uri = f"http://127.0.0.1:{login.port}/auth/callback"
    thread = threading.Thread(target=server.serve_forever, name="wham-login", daemon=True)
    thread.start()
    try:
        url = authorize_url(
            issuer_url, login.client_id, login.redirect_uri, login.pkce, login.state, workspace_id
        )
        open_browser(url)
        if not login.done.wait(timeout):
            raise AuthError(f"login timed out after {timeout:.0f} s without a browser callback")
        if login.result is not None:
            login.success_served.wait(2.0)  # let the browser load the success page
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    if login.failure is not None:
        raise login.failure
    assert login.result is not None
    return login.result


# ---------------------------------------------------------------------------- device login


def _interval(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return 5.0
    return seconds if seconds >= 0 else 5.0


def login_device(
    codex_home: Path | None = None,
    *,
    issuer: str | None = None,
    client_id: str | None = None,
    on_code: Callable[[str, str], object],
    sleep: Callable[[float], object] = time.sleep,
    timeout: float = DEVICE_TIMEOUT,
) -> LoginResult:
    """Device-code sign-in (§6.7): get a user code, show it with ``on_code(url, code)``, poll
    until the user has entered it, exchange the code, save ``auth.json`` (no API key).

    Polls every ``interval`` seconds; 403 and 404 mean pending. A ``slow_down`` answer (error
    code ``slow_down`` in any of the error shapes with a 4xx status, or a bare 429; RFC 8628's
    name, not observed from the real issuer) adds 5 s to the interval. Gives up after
    ``timeout`` seconds, counting the time slept (so a fake ``sleep`` advances the clock).
    """
    home = codex_home if codex_home is not None else default_codex_home()
    issuer_url = resolve_issuer(issuer)
    client = resolve_client_id(client_id)
    with _http(issuer_url) as http:
        answer = http.post(
            f"{issuer_url}/api/accounts/deviceauth/usercode", json={"client_id": client}
        )
        payload = _json(answer)
        if not answer.is_success or not isinstance(payload, dict):
            raise AuthError(
                f"device code login is not enabled for this server ({issuer_url}, "
                f"{_describe(answer)})",
                hint="use the browser login (`wham login`)",
            )
        device_auth_id = payload.get("device_auth_id")
        user_code = payload.get("user_code") or payload.get("usercode")
        if not isinstance(device_auth_id, str) or not isinstance(user_code, str):
            raise AuthError(f"{issuer_url} answered the device code request without a code")
        interval = _interval(payload.get("interval", 5))
        on_code(f"{issuer_url}/codex/device", user_code)

        start = time.monotonic()
        slept = 0.0
        while True:
            answer = http.post(
                f"{issuer_url}/api/accounts/deviceauth/token",
                json={"device_auth_id": device_auth_id, "user_code": user_code},
            )
            if answer.status_code == 200:
                break
            code = error_code(_json(answer))
            if code == "slow_down" or (answer.status_code == 429 and code is None):
                interval += SLOW_DOWN_STEP
            elif answer.status_code not in (403, 404):
                raise AuthError(f"device code login failed ({_describe(answer)})")
            elapsed = max(slept, time.monotonic() - start)
            if elapsed >= timeout:
                raise AuthError(
                    f"device code login timed out after {timeout / 60:.0f} minutes: the code "
                    "was not entered in time",
                    hint="run `wham login --device` again",
                )
            pause = min(interval, timeout - elapsed)
            sleep(pause)
            slept += pause

        grant = _json(answer)
        fields = ("authorization_code", "code_verifier")
        if not isinstance(grant, dict) or not all(isinstance(grant.get(k), str) for k in fields):
            raise AuthError(f"{issuer_url} approved the device code without an authorization code")
        tokens = exchange_code(
            http,
            issuer_url,
            client,
            grant["authorization_code"],
            f"{issuer_url}/deviceauth/callback",
            grant["code_verifier"],
        )
    return save_login(home, tokens, issuer=issuer_url, client_id=client)


# ---------------------------------------------------------------------------- logout, status


def logout(
    codex_home: Path | None = None,
    *,
    issuer: str | None = None,
    revoke_url: str | None = None,
    client_id: str | None = None,
) -> bool:
    """Revoke the refresh token (else the access token; best effort) and delete ``auth.json``.

    The revoke URL is ``revoke_url``, else ``CODEX_REVOKE_TOKEN_URL_OVERRIDE``, else
    ``{issuer}/oauth/revoke`` with the issuer from the argument, the file's
    ``oauth_provenance``, or :func:`resolve_issuer`. Returns whether there was a file.
    """
    file = AuthFile(codex_home if codex_home is not None else default_codex_home())
    try:
        data: dict[str, Any] = file.load()
    except NotLoggedIn:
        if not file.path.exists():
            return False
        data = {}  # unreadable: nothing to revoke, but still remove it
    tokens = data.get("tokens") if isinstance(data.get("tokens"), dict) else {}
    assert isinstance(tokens, dict)
    provenance = tokens.get("oauth_provenance")
    provenance = provenance if isinstance(provenance, dict) else {}
    token, hint = tokens.get("refresh_token"), "refresh_token"
    if not isinstance(token, str) or not token:
        token, hint = tokens.get("access_token"), "access_token"
    if isinstance(token, str) and token:
        known_issuer = provenance.get("issuer")
        if issuer is None and isinstance(known_issuer, str):
            issuer = known_issuer
        known_client = provenance.get("client_id")
        if client_id is None and isinstance(known_client, str):
            client_id = known_client
        url = (
            revoke_url
            or os.environ.get("CODEX_REVOKE_TOKEN_URL_OVERRIDE")
            or f"{resolve_issuer(issuer)}/oauth/revoke"
        )
        body = {"token": token, "token_type_hint": hint, "client_id": resolve_client_id(client_id)}
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(url, json=body, headers={"originator": ORIGINATOR}, timeout=_HTTP_TIMEOUT)
    with file.locked_sync():
        file.path.unlink(missing_ok=True)
    return True


def auth_status(codex_home: Path | None = None) -> AuthStatus | None:
    """Who ``auth.json`` signs in, without network: ``None`` when there is no sign-in.

    Only the file is read (``CODEX_ACCESS_TOKEN`` and ``OPENAI_API_KEY`` are not considered);
    an unreadable file raises ``NotLoggedIn`` saying why.
    """
    file = AuthFile(codex_home if codex_home is not None else default_codex_home())
    try:
        data = file.load()
    except NotLoggedIn:
        if not file.path.exists():
            return None
        raise
    api_key = data.get("OPENAI_API_KEY")
    api_key = api_key if isinstance(api_key, str) and api_key else None
    key_hint = f"{api_key[:8]}***{api_key[-5:]}" if api_key else None
    tokens = data.get("tokens")
    if data.get("auth_mode") != "apikey" and isinstance(tokens, dict):
        with contextlib.suppress(NotLoggedIn):
            parsed = file.tokens(data)
            id_claims = jwt_claims(parsed.id_token or "")
            claims = auth_claims(parsed.id_token)
            expires = parsed.expires_at()
            refreshed = parse_time(data.get("last_refresh"))
            provenance = tokens.get("oauth_provenance")
            issuer = provenance.get("issuer") if isinstance(provenance, dict) else None
            email, plan = id_claims.get("email"), claims.get("chatgpt_plan_type")
            return AuthStatus(
                mode="chatgpt",
                path=file.path,
                email=email if isinstance(email, str) else None,
                plan_type=plan if isinstance(plan, str) else None,
                account_id=parsed.account_id,
                expires_at=expires,
                last_refresh=refreshed.timestamp() if refreshed else None,
                issuer=issuer if isinstance(issuer, str) else None,
                api_key_hint=key_hint,
            )
    pat = data.get("personal_access_token")
    if data.get("auth_mode") != "apikey" and isinstance(pat, str) and pat:
        return AuthStatus(mode="pat", path=file.path)
    if api_key:
        return AuthStatus(mode="apikey", path=file.path, api_key_hint=key_hint)
    return None
