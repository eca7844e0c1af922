"""Account routing, managed configuration and profile (wham-api.md §8.3, §8.4).

``codex exec`` with ChatGPT auth calls these before it runs; without
``workspace_backend_origin`` it fails with "workspace routing discovery missing backend origin".
"""

from typing import Final

from pydantic import Field

from openwham.wire.base import WireModel

ACCOUNT_STRUCTURES: Final = ("personal", "workspace")


class AccountCheckEntry(WireModel):
    """One ChatGPT account (workspace) the token may act for."""

    id: str
    name: str | None = None
    profile_picture_url: str | None = None
    structure: str = "personal"
    workspace_backend_origin: str | None = None
    account_routing_override: str | None = "NO_CONSTRAINT"
    plan_type: str | None = None


class AccountsCheck(WireModel):
    """``GET /accounts/check`` (list form; chatgpt.com may also send a map, not modelled)."""

    accounts: list[AccountCheckEntry] = Field(default_factory=list)
    account_ordering: list[str] = Field(default_factory=list)
    default_account_id: str | None = None


class ConfigBundle(WireModel):
    """``GET /config/bundle``: managed configuration; ``{}`` means none and is accepted."""


class DailyUsageBucket(WireModel):
    """Tokens used on one day."""

    start_date: str | None = None
    tokens: int | None = None


class ProfileStats(WireModel):
    """Usage statistics of ``GET /profiles/me``."""

    lifetime_tokens: int | None = None
    peak_daily_tokens: int | None = None
    longest_running_turn_sec: float | None = None
    current_streak_days: int | None = None
    longest_streak_days: int | None = None
    daily_usage_buckets: list[DailyUsageBucket] | None = None


class Profile(WireModel):
    """``GET /profiles/me``."""

    stats: ProfileStats = Field(default_factory=ProfileStats)
