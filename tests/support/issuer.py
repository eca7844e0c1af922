"""A local stand-in for auth.openai.com (the real issuer is unreachable from the tests).

It speaks the protocol of `docs/reference/codex-cli.md` §6.4-§6.7 and checks what a
real issuer would check: PKCE (S256 of the verifier must equal the challenge the code was
issued for), the client id, the redirect URI, single-use codes, and refresh-token rotation
(a refresh token already traded in answers ``refresh_token_reused``). Tokens are real JWTs
(HS256 with a test key; Codex decodes them without verifying) carrying ``exp``, ``email`` and
the ``https://api.openai.com/auth`` claim.

Besides the issuer it serves ``GET /backend-api/protected``, a resource that accepts only the
access tokens currently valid (the newest of each sign-in, unexpired, not revoked), so tests
can watch ``CodexAuth`` refresh and retry.

Scripting: ``device_script`` is played one entry per device-token poll (``pending`` → 403,
``pending404`` → 404, ``slow_down`` → 429 ``{"error": {"code": "slow_down"}}``, ``expired`` →
400 ``deviceauth_expired``, ``approve`` → 200); when it runs out every poll is pending.
``expire_refresh_tokens()``, ``invalidate_refresh_tokens()`` and ``refresh_override`` make
refreshes fail.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode

import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from openwham.codexauth import jwt_claims
from support.app_thread import AppThread

AUTH_CLAIM = "https://api.openai.com/auth"
CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
SIGNING_KEY = "openwham-test-issuer-key-not-a-secret"


@dataclass
class Account:
    """Who signs in at the stand-in."""

    email: str = "dev@example.com"
    account_id: str = "acct-test-1"
    plan_type: str = "pro"
    user_id: str = "user-test-1"
    fedramp: bool = False


@dataclass
class TokenCall:
    """One ``POST /oauth/token``: its grant, fields, content type and headers."""

    grant_type: str
    fields: dict[str, Any]
    content_type: str
    headers: dict[str, str]


@dataclass
class _Code:
    challenge: str
    redirect_uri: str
    client_id: str
    used: bool = False


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass
class Issuer:
    account: Account = field(default_factory=Account)
    client_id: str = CLIENT_ID
    access_ttl: int = 3600
    device_enabled: bool = True
    device_interval: str = "5"
    device_script: list[str] = field(default_factory=list)
    api_key_exchange: bool = True
    #: answer every refresh with this (status, body) instead, e.g. a transient 500
    refresh_override: tuple[int, dict[str, Any]] | None = None
    #: seconds a refresh takes (to make concurrent refreshers meet at the lock)
    refresh_delay: float = 0.0
    #: called with the request before ``/backend-api/protected`` checks the bearer
    protected_hook: Callable[[Request], None] | None = None
    personal_access_tokens: set[str] = field(default_factory=set)

    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    token_calls: list[TokenCall] = field(default_factory=list)
    revocations: list[dict[str, Any]] = field(default_factory=list)
    device_polls: list[dict[str, Any]] = field(default_factory=list)
    protected_calls: list[dict[str, str]] = field(default_factory=list)
    whoami_calls: list[dict[str, str]] = field(default_factory=list)
    #: refresh token → active | used | expired | invalidated | revoked
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    valid_access: set[str] = field(default_factory=set)
    url: str = ""

    _codes: dict[str, _Code] = field(default_factory=dict)
    _devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    _id_tokens: set[str] = field(default_factory=set)
    _mutex: threading.Lock = field(default_factory=threading.Lock)
    _runner: AppThread = field(default_factory=AppThread)

    # ------------------------------------------------------------------ tokens

    def _auth_claim(self) -> dict[str, Any]:
        claim: dict[str, Any] = {
            "chatgpt_account_id": self.account.account_id,
            "chatgpt_plan_type": self.account.plan_type,
            "chatgpt_user_id": self.account.user_id,
            "user_id": self.account.user_id,
        }
        if self.account.fedramp:
            claim["chatgpt_account_is_fedramp"] = True
        return claim

    def mint(self, *, access_ttl: int | None = None) -> dict[str, str]:
        """A fresh sign-in's tokens (id, access, refresh), registered as valid."""
        now = int(time.time())
        ttl = self.access_ttl if access_ttl is None else access_ttl
        base = {"iss": self.url or "https://auth.openai.com", "iat": now}
        id_token = jwt.encode(
            {
                **base,
                "aud": [self.client_id],
                "exp": now + 3600,
                "email": self.account.email,
                "email_verified": True,
                AUTH_CLAIM: self._auth_claim(),
            },
            SIGNING_KEY,
            algorithm="HS256",
        )
        access_token = jwt.encode(
            {
                **base,
                "aud": ["https://api.openai.com/v1"],
                "exp": now + ttl,
                "jti": uuid.uuid4().hex,
                "scp": ["openid", "profile", "email", "offline_access"],
                AUTH_CLAIM: self._auth_claim(),
            },
            SIGNING_KEY,
            algorithm="HS256",
        )
        refresh_token = f"rt_{secrets.token_urlsafe(24)}"
        with self._mutex:
            self._id_tokens.add(id_token)
            self.valid_access.add(access_token)
            self.refresh_tokens[refresh_token] = "active"
        return {"id_token": id_token, "access_token": access_token, "refresh_token": refresh_token}

    def refresh_count(self) -> int:
        return sum(1 for c in self.token_calls if c.grant_type == "refresh_token")

    def expire_refresh_tokens(self) -> None:
        self._mark_active("expired")

    def invalidate_refresh_tokens(self) -> None:
        self._mark_active("invalidated")

    def _mark_active(self, state: str) -> None:
        with self._mutex:
            for token, current in self.refresh_tokens.items():
                if current == "active":
                    self.refresh_tokens[token] = state

    # ------------------------------------------------------------------ routes

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/oauth/authorize", self._authorize, methods=["GET"]),
                Route("/oauth/token", self._token, methods=["POST"]),
                Route("/oauth/revoke", self._revoke, methods=["POST"]),
                Route("/api/accounts/deviceauth/usercode", self._usercode, methods=["POST"]),
                Route("/api/accounts/deviceauth/token", self._device_token, methods=["POST"]),
                Route(
                    "/api/accounts/v1/user-auth-credential/whoami", self._whoami, methods=["GET"]
                ),
                Route("/backend-api/protected", self._protected, methods=["GET", "POST"]),
            ]
        )

    async def _authorize(self, request: Request) -> Response:
        """Stands for the sign-in pages: the user signs in at once and is sent back."""
        params = dict(request.query_params)
        self.authorize_requests.append(params)
        required = ("client_id", "redirect_uri", "code_challenge", "state")
        if params.get("code_challenge_method") != "S256" or any(
            not params.get(k) for k in required
        ):
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        if params["client_id"] != self.client_id:
            return JSONResponse({"error": "invalid_client"}, status_code=400)
        code = f"ac_{secrets.token_urlsafe(24)}"
        self._codes[code] = _Code(params["code_challenge"], params["redirect_uri"], self.client_id)
        query = urlencode({"code": code, "state": params["state"]})
        return RedirectResponse(f"{params['redirect_uri']}?{query}", status_code=302)

    async def _token(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            fields: dict[str, Any] = await request.json()
        else:
            # urlencoded by hand: starlette's form parser needs python-multipart
            form = parse_qs((await request.body()).decode(), keep_blank_values=True)
            fields = {k: v[0] for k, v in form.items()}
        grant = str(fields.get("grant_type", ""))
        self.token_calls.append(TokenCall(grant, fields, content_type, dict(request.headers)))
        if fields.get("client_id") != self.client_id:
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        if grant == "authorization_code":
            return self._code_grant(fields)
        if grant == "urn:ietf:params:oauth:grant-type:token-exchange":
            if not self.api_key_exchange or fields.get("subject_token") not in self._id_tokens:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            return JSONResponse({"access_token": f"sk-test-{secrets.token_hex(8)}"})
        if grant == "refresh_token":
            if self.refresh_delay:
                await asyncio.sleep(self.refresh_delay)
            return self._refresh_grant(fields)
        return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)

    def _code_grant(self, fields: dict[str, Any]) -> Response:
        code = self._codes.get(str(fields.get("code")))
        if code is None or code.used:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        if fields.get("redirect_uri") != code.redirect_uri:
            return JSONResponse({"error": "invalid_grant", "why": "redirect_uri"}, status_code=400)
        if _s256(str(fields.get("code_verifier", ""))) != code.challenge:
            return JSONResponse({"error": "invalid_grant", "why": "pkce"}, status_code=400)
        code.used = True
        return JSONResponse(self.mint())

    def _refresh_grant(self, fields: dict[str, Any]) -> Response:
        if self.refresh_override is not None:
            status, body = self.refresh_override
            return JSONResponse(body, status_code=status)
        token = str(fields.get("refresh_token", ""))
        with self._mutex:
            state = self.refresh_tokens.get(token)
            if state == "active":
                self.refresh_tokens[token] = "used"
        # The three shapes Codex reads an error code from (§6.5), one per failure.
        if state == "used":
            body: dict[str, Any] = {
                "error": {"code": "refresh_token_reused", "message": "already used"}
            }
        elif state == "expired":
            body = {"error": "refresh_token_expired", "error_description": "expired"}
        elif state in ("invalidated", "revoked"):
            body = {"code": "refresh_token_invalidated", "message": "signed out"}
        elif state is None:
            body = {"error": "invalid_grant"}
        else:
            tokens = self.mint()
            return JSONResponse(tokens)
        return JSONResponse(body, status_code=401)

    async def _revoke(self, request: Request) -> Response:
        body = await request.json()
        self.revocations.append({"body": body, "headers": dict(request.headers)})
        with self._mutex:
            if body.get("token") in self.refresh_tokens:
                self.refresh_tokens[body["token"]] = "revoked"
            self.valid_access.discard(body.get("token"))
        return JSONResponse({})

    async def _usercode(self, request: Request) -> Response:
        body = await request.json()
        if not self.device_enabled or body.get("client_id") != self.client_id:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        device_auth_id = f"deviceauth_{secrets.token_hex(8)}"
        user_code = f"{secrets.token_hex(2).upper()}-{secrets.token_hex(2).upper()}"
        self._devices[device_auth_id] = {"user_code": user_code}
        return JSONResponse(
            {
                "device_auth_id": device_auth_id,
                "user_code": user_code,
                "interval": self.device_interval,
            }
        )

    async def _device_token(self, request: Request) -> Response:
        body = await request.json()
        self.device_polls.append(body)
        device = self._devices.get(str(body.get("device_auth_id")))
        if device is None or device["user_code"] != body.get("user_code"):
            return JSONResponse({"error": {"code": "deviceauth_unknown"}}, status_code=400)
        step = self.device_script.pop(0) if self.device_script else "pending"
        if step == "pending":
            pending = {"error": {"code": "deviceauth_authorization_pending"}}
            return JSONResponse(pending, status_code=403)
        if step == "pending404":
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        if step == "slow_down":
            return JSONResponse({"error": {"code": "slow_down"}}, status_code=429)
        if step == "expired":
            return JSONResponse({"error": {"code": "deviceauth_expired"}}, status_code=400)
        assert step == "approve", step
        verifier = base64.urlsafe_b64encode(secrets.token_bytes(64)).rstrip(b"=").decode()
        code = f"ac_{secrets.token_urlsafe(24)}"
        redirect = f"{self.url}/deviceauth/callback"
        self._codes[code] = _Code(_s256(verifier), redirect, self.client_id)
        return JSONResponse(
            {
                "authorization_code": code,
                "code_challenge": _s256(verifier),
                "code_verifier": verifier,
            }
        )

    async def _whoami(self, request: Request) -> Response:
        self.whoami_calls.append(dict(request.headers))
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if bearer not in self.personal_access_tokens:
            return JSONResponse({"error": {"code": "invalid_token"}}, status_code=401)
        claim = self._auth_claim()
        return JSONResponse(
            {
                "email": self.account.email,
                "chatgpt_user_id": claim["chatgpt_user_id"],
                "chatgpt_account_id": claim["chatgpt_account_id"],
                "chatgpt_plan_type": claim["chatgpt_plan_type"],
                "chatgpt_account_is_fedramp": self.account.fedramp,
            }
        )

    def _protected(self, request: Request) -> Response:
        """Sync on purpose: starlette runs it in a thread, so a hook may block or call out."""
        if self.protected_hook is not None:
            self.protected_hook(request)
        headers = dict(request.headers)
        self.protected_calls.append(headers)
        bearer = headers.get("authorization", "").removeprefix("Bearer ")
        valid = bearer in self.valid_access or bearer in self.personal_access_tokens
        exp = jwt_claims(bearer).get("exp")
        if valid and isinstance(exp, int | float):
            valid = exp > time.time()
        if not valid:
            return JSONResponse({"detail": "Unauthorized"}, status_code=401)
        return JSONResponse({"ok": True, "account": headers.get("chatgpt-account-id")})

    def revoke_access(self) -> None:
        """Every access token issued so far stops working (a server-side revocation)."""
        with self._mutex:
            self.valid_access.clear()

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Issuer:
        self.url = self._runner.start(self.app())
        return self

    def stop(self) -> None:
        self._runner.stop()


def decode(token: str) -> dict[str, Any]:
    """A stand-in JWT's claims (verified with the test key)."""
    claims: dict[str, Any] = jwt.decode(
        token, SIGNING_KEY, algorithms=["HS256"], options={"verify_aud": False}
    )
    return claims
