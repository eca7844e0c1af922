"""Server keys kept in files outside the database: the token signing key and the secrets key."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from openwham.config import Settings


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
