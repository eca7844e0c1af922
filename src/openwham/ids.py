"""Identifier formats of Codex cloud (see docs/reference/wham-api.md §1.3)."""

from __future__ import annotations

import secrets
import uuid


def _hex32() -> str:
    return uuid.uuid4().hex


def new_task_id() -> str:
    return f"task_e_{_hex32()}"


def new_user_turn_id(task_id: str) -> str:
    return f"{task_id}~usertrn_e_{_hex32()}"


def new_assistant_turn_id(task_id: str) -> str:
    return f"{task_id}~assttrn_e_{_hex32()}"


def new_environment_id() -> str:
    return _hex32()


def new_account_id() -> str:
    """ChatGPT account (workspace) ids are UUIDs."""
    return str(uuid.uuid4())


def new_user_id() -> str:
    return f"user-{secrets.token_urlsafe(18).replace('-', 'A').replace('_', 'B')}"
