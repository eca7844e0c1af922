"""The web UI's owner password and session generation (``wham web set-password``).

The password is kept as a scrypt hash (stdlib, memory-hard) in ``server_state``; the plain
text is never stored. Every change of the password bumps the session generation, which ends
every browser session signed in before it (the UI's cookies carry the generation they were
issued under).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from sqlalchemy.orm import Session

from openwham.store import models as m

from .accounts import Principal, ensure_owner
from .errors import BadRequest

PASSWORD_KEY = "web_owner_password"
GENERATION_KEY = "web_session_generation"
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
# scrypt cost: ~16 MiB and a few tens of milliseconds per check.
_N, _R, _P = 2**14, 8, 1


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=2**26
    )


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(_scrypt(password, salt, _N, _R, _P))}"


def check_hash(stored: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = _scrypt(password, _unb64(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, _unb64(digest))


def generation(db: Session) -> int:
    row = db.get(m.ServerState, GENERATION_KEY)
    try:
        return int(row.value) if row is not None else 0
    except ValueError:
        return 0


def _bump_generation(db: Session) -> None:
    value = str(generation(db) + 1)
    row = db.get(m.ServerState, GENERATION_KEY)
    if row is None:
        db.add(m.ServerState(key=GENERATION_KEY, value=value))
    else:
        row.value = value


def set_owner_password(db: Session, password: str | None) -> None:
    """Set (or with ``None`` remove) the owner's password; every web session ends."""
    row = db.get(m.ServerState, PASSWORD_KEY)
    if password is None:
        if row is not None:
            db.delete(row)
    else:
        if len(password) < MIN_PASSWORD_LENGTH:
            raise BadRequest(f"The password needs at least {MIN_PASSWORD_LENGTH} characters")
        if len(password) > MAX_PASSWORD_LENGTH:
            raise BadRequest(f"The password has more than {MAX_PASSWORD_LENGTH} characters")
        hashed = hash_password(password)
        if row is None:
            db.add(m.ServerState(key=PASSWORD_KEY, value=hashed))
        else:
            row.value = hashed
    _bump_generation(db)
    db.flush()


def has_owner_password(db: Session) -> bool:
    return db.get(m.ServerState, PASSWORD_KEY) is not None


def owner_by_password(db: Session, password: str) -> Principal | None:
    """The owner in their first account when ``password`` is the owner password, else None."""
    row = db.get(m.ServerState, PASSWORD_KEY)
    if row is None or len(password) > MAX_PASSWORD_LENGTH or not check_hash(row.value, password):
        return None
    account, user = ensure_owner(db)
    return Principal(user=user, account=account)


def principal_for(db: Session, user_id: str, account_id: str) -> Principal | None:
    """The principal a web session names, if the user still belongs to that account."""
    user = db.get(m.User, user_id)
    if user is None:
        return None
    if db.get(m.Membership, (account_id, user_id)) is None:
        return None
    account = db.get(m.Account, account_id)
    if account is None:
        return None
    return Principal(user=user, account=account)
