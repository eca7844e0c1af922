"""Server keys kept in files outside the database: the token signing key and the secrets key."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.store import models as m


def _read_or_create(path: Path, make: bytes) -> bytes:
    """Create the key file once (mode 0600, atomically) and read it afterwards."""
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(make)
    try:
        os.link(tmp, path)  # fails if another process won the race; then use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()


def signing_key(settings: Settings) -> bytes:
    return _read_or_create(settings.keys_dir / "token-signing.key", secrets.token_hex(32).encode())


def secrets_key(settings: Settings) -> bytes:
    return _read_or_create(settings.keys_dir / "secrets.key", Fernet.generate_key())


# the row of the keys' fingerprint, and the text each key signs for it
_FINGERPRINT_ROW = "server-keys"
_FINGERPRINT_TEXT = b"openwham server keys fingerprint v1"


class KeysMismatch(RuntimeError):
    """This node's keys are not the ones the database was first opened with."""


def fingerprint(signing: bytes, secrets_: bytes) -> str:
    """SHA-256 over an HMAC of a fixed text under each key: equal for equal keys, and
    telling nothing about them (the keys stay out of the database)."""
    parts = [hmac.new(k, _FINGERPRINT_TEXT, hashlib.sha256).digest() for k in (signing, secrets_)]
    return hashlib.sha256(b"".join(parts)).hexdigest()


def check_fingerprint(db: Session, settings: Settings, signing: bytes, secrets_: bytes) -> None:
    """Record the keys' fingerprint on the database's first start; afterwards refuse
    (:class:`KeysMismatch`) a node whose keys differ: its tokens would be refused by the
    other nodes and the secrets they sealed unreadable to it."""
    mine = fingerprint(signing, secrets_)
    row = db.get(m.KeyFingerprint, _FINGERPRINT_ROW)
    if row is None:
        db.add(m.KeyFingerprint(name=_FINGERPRINT_ROW, fingerprint=mine, created_at=time.time()))
        try:
            db.commit()
        except IntegrityError:  # another node recorded its keys at the same time
            db.rollback()
        row = db.get(m.KeyFingerprint, _FINGERPRINT_ROW, populate_existing=True)
        assert row is not None
    if not hmac.compare_digest(row.fingerprint, mine):
        raise KeysMismatch(
            f"the server keys in {settings.keys_dir} (token-signing.key, secrets.key) are not "
            "the ones this database was first started with; every node of one database needs "
            "the same keys: copy the keys/ directory of a node already serving this database "
            f"into {settings.resolved_data_dir} (keep its mode 0700, the files 0600) and start "
            "again"
        )


class SecretBox:
    """Encrypts environment secrets at rest (Fernet: AES-128-CBC + HMAC-SHA256)."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    def seal(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def open(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:  # wrong key file: say so instead of a bare crypto error
            raise RuntimeError("secret cannot be decrypted with this server's secrets.key") from exc

    def open_all(self, sealed: dict[str, str]) -> dict[str, str]:
        """Every value of ``sealed`` decrypted (``RuntimeError`` if one cannot be)."""
        return {name: self.open(token) for name, token in sealed.items()}
