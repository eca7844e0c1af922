"""User settings (``settings/user``) and the branch-format vocabulary."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.orm import Session

from openwham.wire import (
    BranchFormatSpecialValue,
    UserPreferencesConfig,
    UserSettings,
    UserSettingsPatch,
)

from .accounts import Principal
from .errors import BadRequest
from .repos import validate_branch_name

BRANCH_FORMAT_MAX = 100
CUSTOM_INSTRUCTIONS_MAX = 100_000
GIT_DIFF_MODES = ("split", "unified")
CODE_REVIEW_PREFERENCES = ("repo_default", "always", "never")

SPECIAL_VALUES = [
    BranchFormatSpecialValue(
        value="{feature}",
        char_count_label="[1, 60]",
        char_count=60,
        description="Model generated feature name",
        example="feature-branch-name",
    ),
    BranchFormatSpecialValue(
        value="{branch}",
        char_count_label="[1, 60]",
        char_count=60,
        description="The original branch name, or commit sha, truncated to 60 characters",
        example="main",
    ),
    BranchFormatSpecialValue(
        value="{uuid}",
        char_count_label="6",
        char_count=6,
        description="Randomly generated alphanumeric string",
        example="q5ccpt",
    ),
    BranchFormatSpecialValue(
        value="{ts}",
        char_count_label="10",
        char_count=10,
        description="Current UNIX timestamp",
        example="1758000000",
    ),
    BranchFormatSpecialValue(
        value="{date}",
        char_count_label="10",
        char_count=10,
        description="UTC date in yyyy-MM-dd format",
        example="2025-09-25",
    ),
    BranchFormatSpecialValue(
        value="{time}",
        char_count_label="8",
        char_count=8,
        description="UTC time in HH-mm-ss format",
        example="05-22-24",
    ),
]
_TOKENS = {v.value for v in SPECIAL_VALUES}
_BRANCH_CHARS = re.compile(r"^[A-Za-z0-9._/{}-]+$")

DEFAULTS: dict[str, Any] = {
    "git_diff_mode": "split",
    "branch_format": "codex/{feature}",
    "custom_instructions": "",
    "code_review_preference": "repo_default",
    "alpha_opt_in": False,
}


def preferences_config() -> UserPreferencesConfig:
    return UserPreferencesConfig(
        branch_format_special_values=SPECIAL_VALUES,
        branch_format_max_length=BRANCH_FORMAT_MAX,
        custom_instructions_max_chars=CUSTOM_INSTRUCTIONS_MAX,
    )


def get(principal: Principal) -> UserSettings:
    stored = {**DEFAULTS, **(principal.user.settings or {})}
    return UserSettings(user_id=principal.user_id, **stored)


def validate_branch_format(fmt: str) -> None:
    if not fmt or len(fmt) > BRANCH_FORMAT_MAX:
        raise BadRequest(f"branch_format must be 1 to {BRANCH_FORMAT_MAX} characters")
    for token in re.findall(r"\{[^{}]*\}", fmt):
        if token not in _TOKENS:
            raise BadRequest(
                f"branch_format has an unknown placeholder {token}; known: "
                + ", ".join(v.value for v in SPECIAL_VALUES)
            )
    example = fmt
    for special in SPECIAL_VALUES:
        example = example.replace(special.value, special.example or "x")
    if "{" in example or "}" in example:
        raise BadRequest("branch_format has an unmatched '{' or '}'")
    if not _BRANCH_CHARS.match(fmt) or not _valid_branch(example):
        raise BadRequest("branch_format would not produce a valid git branch name")


def _valid_branch(name: str) -> bool:
    try:
        validate_branch_name(name)
    except BadRequest:
        return False
    return True


def patch(db: Session, principal: Principal, body: UserSettingsPatch) -> UserSettings:
    changes = body.model_dump(exclude_unset=True)
    for key, value in changes.items():
        if value is None:
            raise BadRequest(f"{key} cannot be null")
    if "branch_format" in changes:
        validate_branch_format(changes["branch_format"])
    if "git_diff_mode" in changes and changes["git_diff_mode"] not in GIT_DIFF_MODES:
        raise BadRequest(f"git_diff_mode must be one of {', '.join(GIT_DIFF_MODES)}")
    pref = changes.get("code_review_preference")
    if pref is not None and pref not in CODE_REVIEW_PREFERENCES:
        raise BadRequest(
            f"code_review_preference must be one of {', '.join(CODE_REVIEW_PREFERENCES)}"
        )
    principal.user.settings = {**(principal.user.settings or {}), **changes}
    db.flush()
    return get(principal)
