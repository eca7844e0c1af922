"""ORM tables. Hot, queried fields are columns; the rest of a turn's wire body is JSON."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    event,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .status import TurnStatus

ID = String(200)


class TurnStatusType(TypeDecorator[TurnStatus]):
    """``VARCHAR(32)`` holding a :class:`TurnStatus` value: rows load as enum members, and a
    string that is not a status is refused when bound (not stored)."""

    impl = String(32)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else TurnStatus(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> TurnStatus | None:
        return None if value is None else TurnStatus(value)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Account(Base):
    """A workspace: the unit that owns environments, tasks and rate limits."""

    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    plan_type: Mapped[str] = mapped_column(String(64), default="pro")
    created_at: Mapped[float] = mapped_column(Float)


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Membership(Base):
    __tablename__ = "memberships"

    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    # the key leads with the account; a user's accounts (a token without an account, the
    # accounts list) need their own index
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(32), default="member")
    created_at: Mapped[float] = mapped_column(Float)


class Environment(Base):
    """An environment; ``body`` holds the wire fields, ``secrets`` holds ciphertexts only."""

    __tablename__ = "environments"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    creator_id: Mapped[str] = mapped_column(ID)
    label: Mapped[str] = mapped_column(String(200))
    is_pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    body: Mapped[dict[str, Any]] = mapped_column(default=dict)
    secrets: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_account_created", "account_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ID)
    environment_id: Mapped[str | None] = mapped_column(ID, nullable=True, index=True)
    title: Mapped[str] = mapped_column(Text)
    has_generated_title: Mapped[bool] = mapped_column(Boolean, default=False)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    has_unread_turn: Mapped[bool] = mapped_column(Boolean, default=False)
    branch: Mapped[str | None] = mapped_column(String(255), nullable=True)
    current_user_turn_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    current_turn_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    num_follow_ups: Mapped[int] = mapped_column(Integer, default=0)
    body: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Turn(Base):
    """A user turn or one assistant attempt; ``body`` carries the rest of its wire fields.

    ``body`` (which can hold a diff of many MB) is the table's last column on SQLite
    (migration 0005): SQLite reaches a column stored after a big value by walking its overflow
    pages, so a migration adding a column here puts it before ``body``
    (``batch_alter_table(recreate="always", partial_reordering=…)``)."""

    __tablename__ = "turns"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    parent_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    attempt_placement: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # changed only by store.turnstate (tests/test_architecture.py checks that)
    turn_status: Mapped[TurnStatus | None] = mapped_column(
        TurnStatusType(), nullable=True, index=True
    )
    discarded: Mapped[bool] = mapped_column(Boolean, default=False)
    viewed: Mapped[bool] = mapped_column(Boolean, default=False)
    body: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # The diff's stats, copied out of ``body`` whenever it is written, so that lists read
    # three integers instead of loading (and parsing) bodies that hold multi-MB diffs.
    diff_files_modified: Mapped[int | None] = mapped_column(Integer, nullable=True)
    diff_lines_added: Mapped[int | None] = mapped_column(Integer, nullable=True)
    diff_lines_removed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Whether ``body`` holds a non-empty diff (the stats may be unknown for one).
    has_diff: Mapped[bool] = mapped_column(Boolean, default=False)
    # Bumped by store.turnstate when the attempt starts over and its events are deleted
    # (requeue, recover): turn streams' in-memory tails forget what they hold (0008).
    events_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The fencing token of the run holding the attempt: set by each claim, cleared by a
    # requeue or recover; a run's writes are conditional on it (store.turnstate, 0010).
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)

    @staticmethod
    def body_values(body: dict[str, Any]) -> dict[str, Any]:
        """The column values of a new ``body`` (for Core ``update().values(...)``, which the
        ORM's attribute event below does not see)."""
        return {"body": body, **diff_columns(body)}


def body_diff(body: Any) -> dict[str, Any] | None:
    """The ``output_diff`` of a turn body (see :func:`items_diff`)."""
    return items_diff(body.get("output_items") if isinstance(body, dict) else None)


def items_diff(items: Any) -> dict[str, Any] | None:
    """The ``output_diff`` of an attempt's output items (inside its ``pr`` item, or a bare
    ``output_diff`` item) when it holds a non-empty diff."""
    for item in items or []:
        if not isinstance(item, dict):
            continue
        inner = item.get("output_diff")
        if item.get("type") == "pr" and isinstance(inner, dict) and inner.get("diff"):
            return dict(inner)
        if item.get("type") == "output_diff" and item.get("diff"):
            return dict(item)
    return None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def diff_columns(body: Any) -> dict[str, Any]:
    """``diff_*`` and ``has_diff`` for a turn body."""
    diff = body_diff(body) or {}
    return {
        "diff_files_modified": _int_or_none(diff.get("files_modified")),
        "diff_lines_added": _int_or_none(diff.get("lines_added")),
        "diff_lines_removed": _int_or_none(diff.get("lines_removed")),
        "has_diff": bool(diff),
    }


@event.listens_for(Turn.body, "set")
def _body_set(target: Turn, value: Any, _old: Any, _initiator: Any) -> None:
    """Every ORM write of a turn's ``body`` keeps its diff columns in step."""
    for key, column_value in diff_columns(value).items():
        setattr(target, key, column_value)


class UsageEvent(Base):
    """One started attempt; kept after a task is deleted so that deleting cannot reset limits."""

    __tablename__ = "usage_events"
    __table_args__ = (Index("ix_usage_account_created", "account_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ID)
    task_id: Mapped[str] = mapped_column(ID)
    turn_id: Mapped[str] = mapped_column(ID)
    created_at: Mapped[float] = mapped_column(Float)


class ServerState(Base):
    """Small key/value facts about this installation (e.g. the owner account)."""

    __tablename__ = "server_state"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class TurnEvent(Base):
    """One entry of an attempt's ordered event log: what the turn stream sends, replayable.

    ``id`` orders events globally; a client resumes with the last ``id`` it saw.
    """

    __tablename__ = "turn_events"
    # AUTOINCREMENT on SQLite: ids of deleted events (an attempt that started over) are
    # never given again, so a reader resuming after an id it saw skips nothing (0008)
    __table_args__ = (
        Index("ix_turn_events_turn_id_id", "turn_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    turn_id: Mapped[str] = mapped_column(ID)
    item_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[float] = mapped_column(Float)


class ApiToken(Base):
    """One API token: the JWT carries ``id`` as its ``jti``; every request checks this row, so
    revoking (or deleting the user) ends the token at once on every node of the database."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class KeyFingerprint(Base):
    """A fingerprint of the server keys the database was first opened with (an HMAC of a
    fixed text under each key, never the keys): a node started with other keys is refused
    instead of failing tokens and secrets later (``service.keys.check_fingerprint``)."""

    __tablename__ = "key_fingerprints"

    name: Mapped[str] = mapped_column(ID, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(ID)
    created_at: Mapped[float] = mapped_column(Float)


class Artifact(Base):
    """What a later attempt needs from an earlier one, for every node (``store.artifacts``):
    a compressed blob per (turn, name), gone with its turn."""

    __tablename__ = "artifacts"

    turn_id: Mapped[str] = mapped_column(
        ForeignKey("turns.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(ID, primary_key=True)
    codec: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(Integer)  # before compression
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class ForgeConnection(Base):
    """An account's connection to a git hosting service's API (GitHub, GitLab, Gitea) that
    opens pull requests for repositories under ``repo_url_prefix``. Tokens are ciphertexts
    (the secrets key), never shown again."""

    __tablename__ = "forge_connections"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    creator_id: Mapped[str] = mapped_column(ID)
    kind: Mapped[str] = mapped_column(String(32))
    api_base_url: Mapped[str] = mapped_column(Text)
    repo_url_prefix: Mapped[str] = mapped_column(Text)
    token: Mapped[str] = mapped_column(Text)
    bot_token: Mapped[str | None] = mapped_column(Text, nullable=True)
    pr_authorship_mode: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)


class GitCredential(Base):
    """An account's credential for private git remotes whose URL starts with
    ``url_prefix``: HTTPS (``username`` + sealed ``secret``) or SSH (sealed ``secret`` = the
    private key, ``known_hosts`` in clear: public). Used by host git only, never shown again."""

    __tablename__ = "git_credentials"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    creator_id: Mapped[str] = mapped_column(ID)
    kind: Mapped[str] = mapped_column(String(16))  # "https" or "ssh"
    url_prefix: Mapped[str] = mapped_column(Text)
    username: Mapped[str | None] = mapped_column(Text, nullable=True)
    secret: Mapped[str] = mapped_column(Text)
    known_hosts: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
