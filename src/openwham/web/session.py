"""Browser sessions: an HMAC-signed cookie, and CSRF tokens derived from it.

The cookie holds a random session id, who is signed in (user and account ids, never a token),
the id of the API token used to sign in (revoking that token ends the session) and the session
generation it was issued under (``service.webauth``: changing the owner password ends older
sessions). It is signed with a key derived from the server's token
signing key, so a cookie is never a valid API token and an API token never a valid cookie.
Every visitor gets a session (signed in or not), so the sign-in form has a CSRF token too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

COOKIE = "wham_session"
MAX_AGE_SECONDS = 7 * 24 * 3600
_MAX_COOKIE = 2048


def derive_key(signing_key: bytes) -> bytes:
    return hmac.new(signing_key, b"openwham web session v1", hashlib.sha256).digest()


@dataclass(frozen=True)
class WebSession:
    sid: str
    user_id: str | None = None
    account_id: str | None = None
    generation: int = 0
    token_id: str | None = None  # signed in with this API token (None: the owner password)
    expires: float = 0.0
    fresh: bool = False  # made for this request: the response must set the cookie

    @property
    def signed_in(self) -> bool:
        return self.user_id is not None and self.account_id is not None


def new_session(
    user_id: str | None = None,
    account_id: str | None = None,
    generation: int = 0,
    token_id: str | None = None,
) -> WebSession:
    """A new session id (also at sign-in, so an id seen before sign-in is worth nothing)."""
    return WebSession(
        sid=secrets.token_urlsafe(18),
        user_id=user_id,
        account_id=account_id,
        generation=generation,
        token_id=token_id,
        expires=time.time() + MAX_AGE_SECONDS,
        fresh=True,
    )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(key: bytes, session: WebSession) -> str:
    data = {
        "sid": session.sid,
        "uid": session.user_id,
        "aid": session.account_id,
        "gen": session.generation,
        "tid": session.token_id,
        "exp": int(session.expires),
    }
    body = _b64(json.dumps(data, separators=(",", ":")).encode())
    mac = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    return f"{body}.{mac}"


def decode(key: bytes, raw: str | None) -> WebSession | None:
    """The session a cookie holds, or None when it is missing, forged or expired."""
    if not raw or len(raw) > _MAX_COOKIE or raw.count(".") != 1:
        return None
    body, mac = raw.split(".")
    expected = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(mac, expected):
        return None
    try:
        data = json.loads(_unb64(body))
        session = WebSession(
            sid=str(data["sid"]),
            user_id=str(data["uid"]) if data.get("uid") else None,
            account_id=str(data["aid"]) if data.get("aid") else None,
            generation=int(data.get("gen") or 0),
            token_id=str(data["tid"]) if data.get("tid") else None,
            expires=float(data["exp"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
    if session.expires < time.time():
        return None
    return session


def csrf_token(key: bytes, session: WebSession) -> str:
    """The form token of this session (same for all its forms; new with every session)."""
    return _b64(hmac.new(key, b"csrf:" + session.sid.encode(), hashlib.sha256).digest())


def csrf_ok(key: bytes, session: WebSession, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(csrf_token(key, session), token or "")
