"""openwham's own API-token bodies (``GET/POST tokens``, ``DELETE tokens/{id}``; docs/api.md).

Not part of Codex cloud: chatgpt.com has no such route. Times are Unix seconds.
"""

from pydantic import BaseModel, Field

from openwham.wire.base import StrictWireModel


class ApiTokenCreate(StrictWireModel):
    """``POST tokens``: both fields optional (name ``API token``, the server's default life)."""

    name: str | None = None
    expires_in_days: float | None = None


class ApiTokenInfo(BaseModel):
    """One token as listed; never the secret itself."""

    id: str
    name: str
    created_at: float
    last_used_at: float | None = None
    expires_at: float
    expired: bool = False
    current: bool = False  # the token this request came with


class ApiTokenCreated(ApiTokenInfo):
    """``POST tokens``: the token's row and, this once, the token (a JWT)."""

    token: str


class ApiTokenList(BaseModel):
    """``GET tokens``: the caller's tokens that are not revoked, newest first."""

    items: list[ApiTokenInfo] = Field(default_factory=list)
