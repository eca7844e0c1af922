"""Usage and rate limits (wham-api.md §6)."""

from typing import Any, Final

from openwham.wire.base import OmittingWireModel, WireModel

PLAN_TYPES: Final = (
    "guest",
    "free",
    "go",
    "plus",
    "pro",
    "prolite",
    "free_workspace",
    "team",
    "business",
    "self_serve_business_prolite",
    "self_serve_business_usage_based",
    "ent26",
    "enterprise_cbp_automation",
    "enterprise_cbp_usage_based",
    "enterprise",
    "education",
    "edu",
    "eduplus",
    "edupro",
    "quorum",
    "k12",
    "unknown",
)
RATE_LIMIT_REACHED_TYPES: Final = (
    "rate_limit_reached",
    "workspace_owner_credits_depleted",
    "workspace_member_credits_depleted",
    "workspace_owner_usage_limit_reached",
    "workspace_member_usage_limit_reached",
)
SPEND_LIMIT_TYPES: Final = (
    "individual",
    "group_default",
    "workspace_default",
    "role_budget",
    "group_shared",
    "workspace_shared",
)
RESET_CREDIT_CODES: Final = ("reset", "nothing_to_reset", "no_credit", "already_redeemed")


class RateLimitWindow(WireModel):
    """One usage window (≈5 h primary, ≈7 days secondary); ``reset_at`` is epoch seconds."""

    used_percent: int = 0
    limit_window_seconds: int = 0
    reset_after_seconds: int = 0
    reset_at: int = 0


class RateLimitDetails(WireModel):
    """Whether the caller may run now, with its primary and secondary windows."""

    allowed: bool = True
    limit_reached: bool = False
    primary_window: RateLimitWindow | None = None
    secondary_window: RateLimitWindow | None = None


class Credits(WireModel):
    """Credit balance; ``balance`` is a decimal string."""

    has_credits: bool = False
    unlimited: bool = False
    balance: str | None = None
    approx_local_messages: list[Any] | None = None
    approx_cloud_messages: list[Any] | None = None


class AdditionalRateLimit(WireModel):
    """A per-feature limit; the client prefers the one whose limit id is ``codex``."""

    limit_name: str = ""
    metered_feature: str = ""
    rate_limit: RateLimitDetails | None = None


class RateLimitReachedType(WireModel):
    """Which limit was hit (values in ``RATE_LIMIT_REACHED_TYPES``)."""

    type: str = "rate_limit_reached"


class SpendLimit(WireModel):
    """A spending limit; amounts are decimal strings."""

    limit: str | None = None
    used: str | None = None
    remaining: str | None = None
    used_percent: int | None = None
    remaining_percent: int | None = None
    reset_after_seconds: int | None = None
    reset_at: int | None = None


class GroupSpendLimit(WireModel):
    """A spending limit of a user group."""

    group_id: str | None = None
    group_name: str | None = None
    details: SpendLimit | None = None


class SpendControl(WireModel):
    """Workspace spend controls; all optional because only ``reached`` is always sent."""

    reached: bool = False
    reached_limit_type: str | None = None
    individual_limit: SpendLimit | None = None
    workspace_default_limit: SpendLimit | None = None
    role_budget_limit: SpendLimit | None = None
    workspace_shared_limit: SpendLimit | None = None
    group_default_limit: GroupSpendLimit | None = None
    group_shared_limit: GroupSpendLimit | None = None


class RateLimitResetCredits(WireModel):
    """How many rate-limit resets the caller can redeem."""

    available_count: int = 0


class CodeReviewRateLimit(WireModel):
    """Limit of code reviews (third-party source only)."""

    primary_window: RateLimitWindow | None = None


class RateLimitStatusPayload(OmittingWireModel):
    """``GET /usage``: plan and rate-limit snapshot (``plan_type`` values in ``PLAN_TYPES``)."""

    plan_type: str
    rate_limit: RateLimitDetails | None = None
    credits: Credits | None = None
    additional_rate_limits: list[AdditionalRateLimit] | None = None
    rate_limit_reached_type: RateLimitReachedType | None = None
    spend_control: SpendControl | None = None
    rate_limit_reset_credits: RateLimitResetCredits | None = None
    code_review_rate_limit: CodeReviewRateLimit | None = None
    omit_when_unset = ("code_review_rate_limit",)  # third-party source only


class TaskRateLimitWindow(WireModel):
    """One window of the task quota."""

    limit: int | float = 0
    remaining: int | float = 0
    resets_after: int | float = 0
    limit_window_mins: int | None = None


class TaskRateLimit(OmittingWireModel):
    """``GET /tasks/rate_limit``: the task quota (``resets_after`` in seconds).

    The ``POST /tasks`` response embeds the same object without ``windows``: leave ``windows``
    unset (or dump with ``exclude={"windows"}``); it is emitted only when set.
    """

    allowed: bool = True
    limit_reached: bool = False
    limit: int | float = 0
    remaining: int | float = 0
    resets_after: int | float = 0
    resets_after_text: str | None = None
    user_plan_type: str | None = None
    windows: list[TaskRateLimitWindow] | None = None
    omit_when_unset = ("windows",)


class RateLimitResetConsumeRequest(WireModel):
    """Body of ``POST /rate-limit-reset-credits/consume``."""

    redeem_request_id: str
    credit_id: str | None = None


class RateLimitResetConsumeResponse(WireModel):
    """Result of redeeming a reset credit (``code`` values in ``RESET_CREDIT_CODES``)."""

    code: str = "nothing_to_reset"
    windows_reset: int = 0
