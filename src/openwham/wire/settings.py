"""User settings and their configuration limits (wham-api.md §8.1)."""

from typing import Final

from pydantic import Field

from openwham.wire.base import StrictWireModel, WireModel
from openwham.wire.environments import GitHubRepo

BRANCH_FORMAT_MAX_LENGTH: Final = 100
CUSTOM_INSTRUCTIONS_MAX_CHARS: Final = 100_000
BRANCH_FORMAT_SPECIAL_VALUES: Final = (
    "{feature}",
    "{branch}",
    "{uuid}",
    "{ts}",
    "{date}",
    "{time}",
)
GIT_DIFF_MODES: Final = ("split", "unified")
CODE_REVIEW_PREFERENCES: Final = ("repo_default", "never", "always")


class UserSettings(WireModel):
    """``GET /settings/user``; ``branch_format`` names PR branches (``{feature}`` etc.)."""

    user_id: str
    git_diff_mode: str = "split"
    branch_format: str = "codex/{feature}"
    custom_instructions: str = ""
    code_review_preference: str = "repo_default"
    alpha_opt_in: bool = False


class UserSettingsPatch(StrictWireModel):
    """Body of ``PATCH /settings/user``: only the fields sent change; unknown fields are a 4xx."""

    git_diff_mode: str | None = None
    branch_format: str | None = Field(default=None, max_length=BRANCH_FORMAT_MAX_LENGTH)
    custom_instructions: str | None = Field(default=None, max_length=CUSTOM_INSTRUCTIONS_MAX_CHARS)
    code_review_preference: str | None = None
    alpha_opt_in: bool | None = None


class BranchFormatSpecialValue(WireModel):
    """A placeholder allowed in ``branch_format``, with its length and an example."""

    value: str
    char_count_label: str | None = None
    char_count: int | None = None
    description: str | None = None
    example: str | None = None


class UserPreferencesConfig(WireModel):
    """``GET /settings/configs/user-preferences``: the limits the settings UI enforces."""

    branch_format_special_values: list[BranchFormatSpecialValue] = Field(default_factory=list)
    branch_format_max_length: int = BRANCH_FORMAT_MAX_LENGTH
    custom_instructions_max_chars: int = CUSTOM_INSTRUCTIONS_MAX_CHARS


class RepoReviewSetting(WireModel):
    """Code-review preference of one repository (``updated_at`` is ISO 8601 with ``Z``)."""

    repository: GitHubRepo | None = None
    review_preference: str | None = None
    global_review_preference: str | None = None
    global_review_account_id: str | None = None
    updated_at: str | None = None
    last_updated_user_email: str | None = None
    last_updated_by_github_id: int | None = None


class CodeReviewSettingsPage(WireModel):
    """``GET /settings/code_review``; paginated by ``next_token``, not ``cursor``."""

    repo_review_settings: list[RepoReviewSetting] = Field(default_factory=list)
    next_token: str | None = None
