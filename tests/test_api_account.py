"""Usage, rate limits, settings and the start-up calls of Codex clients (in-process)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PREFIXES, Api, Server, make_server
from openwham.service.accounts import ensure_owner
from openwham.store import models as m

LIMIT = 3


def _limited_server(tmp_path: Path, database_url: str, **limits: Any) -> Iterator[Server]:
    yield from make_server(tmp_path, database_url, **{"rate_limit_primary": LIMIT, **limits})


@pytest.fixture
def limited(tmp_path: Path, sqlite_url: str) -> Iterator[Server]:
    """A server whose primary window allows only LIMIT attempts."""
    yield from _limited_server(tmp_path, sqlite_url)


@pytest.fixture
def any_limited(tmp_path: Path, database_url: str) -> Iterator[Server]:
    """The same, once on SQLite and once on PostgreSQL."""
    yield from _limited_server(tmp_path, database_url)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count_tasks(server: Server) -> tuple[int, int]:
    with server.app_state.db.session() as s:
        return s.query(m.Task).count(), s.query(m.Turn).count()


# --------------------------------------------------------------------------- usage


def test_usage_payload_and_used_percent_rises(api: Api, repo: Path) -> None:
    usage = api.get("usage").json()
    assert usage["plan_type"] == "pro"
    assert usage["credits"] is None
    rate = usage["rate_limit"]
    assert rate["allowed"] is True and rate["limit_reached"] is False
    primary, secondary = rate["primary_window"], rate["secondary_window"]
    assert primary["limit_window_seconds"] == 18000
    assert secondary["limit_window_seconds"] == 604800
    for window in (primary, secondary):
        assert set(window) == {
            "used_percent",
            "limit_window_seconds",
            "reset_after_seconds",
            "reset_at",
        }
        assert all(_is_int(v) for v in window.values())
        assert window["used_percent"] == 0
        assert window["reset_at"] >= window["reset_after_seconds"]

    env = api.create_env(repo)
    api.create_task(env["id"], metadata={"best_of_n": 4})
    api.create_task(env["id"])
    after = api.get("usage").json()["rate_limit"]
    # 5 attempts of 100 (primary) and of 1000 (secondary), rounded up
    assert after["primary_window"]["used_percent"] == 5
    assert after["secondary_window"]["used_percent"] == 1
    assert after["primary_window"]["reset_after_seconds"] <= 18000


def test_tasks_rate_limit_shape(api: Api, repo: Path) -> None:
    rl = api.get("tasks/rate_limit").json()
    assert rl["allowed"] is True and rl["limit_reached"] is False
    assert _is_int(rl["limit"]) and _is_int(rl["remaining"])
    assert rl["remaining"] == rl["limit"] == 100
    assert rl["user_plan_type"] == "pro" and isinstance(rl["resets_after_text"], str)
    assert [(w["limit"], w["limit_window_mins"]) for w in rl["windows"]] == [
        (100, 300),
        (1000, 7 * 24 * 60),
    ]
    assert all(_is_int(w["remaining"]) and _is_int(w["resets_after"]) for w in rl["windows"])

    env = api.create_env(repo)
    created = api.create_task(env["id"], metadata={"best_of_n": 2})
    rl = api.get("tasks/rate_limit").json()
    assert rl["remaining"] == 98
    assert [w["remaining"] for w in rl["windows"]] == [98, 998]
    embedded = created["rate_limit"]
    assert "windows" not in embedded
    moving = ("windows", "resets_after", "resets_after_text")  # windows only in rate_limit
    assert {k: v for k, v in rl.items() if k not in moving} == {
        k: v for k, v in embedded.items() if k not in moving
    }


def test_rate_limit_refuses_tasks_beyond_the_limit(limited: Server, repo: Path) -> None:
    api = limited.api
    env = api.create_env(repo)
    first = api.create_task(env["id"], metadata={"best_of_n": 2})
    assert first["rate_limit"]["remaining"] == 1
    before = _count_tasks(limited)

    body = {
        "new_task": {"environment_id": env["id"]},
        "input_items": [
            {"type": "message", "role": "user", "content": [{"content_type": "text", "text": "x"}]}
        ],
    }
    r = api.post("tasks", json={**body, "metadata": {"best_of_n": 2}})  # 2 attempts, 1 left
    assert r.status_code == 429, r.text
    payload = r.json()
    assert isinstance(payload["detail"], str) and "limit" in payload["detail"].lower()
    rl = payload["rate_limit"]
    assert rl["allowed"] is False and rl["limit"] == LIMIT and rl["remaining"] == 1
    assert rl["user_plan_type"] == "pro" and isinstance(rl["windows"], list)
    assert _count_tasks(limited) == before  # nothing created

    assert api.post("tasks", json=body).status_code == 200  # the last attempt fits
    r = api.post("tasks", json=body)
    assert r.status_code == 429
    assert r.json()["rate_limit"]["remaining"] == 0
    assert r.json()["rate_limit"]["limit_reached"] is True

    status = api.get("tasks/rate_limit").json()
    assert status["limit_reached"] is True and status["remaining"] == 0
    usage = api.get("usage").json()
    assert usage["rate_limit"]["limit_reached"] is True
    assert usage["rate_limit"]["allowed"] is False
    assert usage["rate_limit"]["primary_window"]["used_percent"] == 100
    assert usage["rate_limit_reached_type"] == {"type": "rate_limit_reached"}

    # a follow-up is an attempt too
    with limited.app_state.db.session() as s:
        turn = s.get(m.Turn, first["turn"]["id"])
        assert turn is not None
        turn.turn_status = "completed"
    follow = {
        "follow_up": {"task_id": first["task"]["id"], "turn_id": first["turn"]["id"]},
        "input_items": body["input_items"],
    }
    assert api.post("tasks", json=follow).status_code == 429


def test_best_of_n_counts_every_attempt(limited: Server, repo: Path) -> None:
    api = limited.api
    env = api.create_env(repo)
    r = api.create_task(env["id"], metadata={"best_of_n": 3})
    assert r["rate_limit"]["remaining"] == 0
    assert api.get("tasks/rate_limit").json()["remaining"] == 0


def test_best_of_n_above_the_limit_is_refused_whole(limited: Server, repo: Path) -> None:
    api = limited.api
    env = api.create_env(repo)
    body = {
        "new_task": {"environment_id": env["id"]},
        "input_items": [{"type": "message", "content": [{"content_type": "text", "text": "x"}]}],
        "metadata": {"best_of_n": 4},
    }
    r = api.post("tasks", json=body)
    assert r.status_code == 429, r.text
    assert _count_tasks(limited) == (0, 0)
    assert api.get("tasks/rate_limit").json()["remaining"] == LIMIT


def test_concurrent_creates_cannot_overrun_the_limit(any_limited: Server, repo: Path) -> None:
    api = any_limited.api
    env = api.create_env(repo)
    body = {
        "new_task": {"environment_id": env["id"]},
        "input_items": [{"type": "message", "content": [{"content_type": "text", "text": "x"}]}],
    }
    codes: list[int] = []

    def create() -> None:
        for _ in range(2):
            codes.append(api.post("tasks", json=body).status_code)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] * LIMIT + [429] * (12 - LIMIT)
    assert _count_tasks(any_limited)[0] == LIMIT
    assert api.get("tasks/rate_limit").json()["remaining"] == 0


def test_deleting_a_task_does_not_give_usage_back(limited: Server, repo: Path) -> None:
    api = limited.api
    env = api.create_env(repo)
    task_id = api.create_task(env["id"], metadata={"best_of_n": 2})["task"]["id"]
    assert api.delete(f"tasks/{task_id}").status_code == 200
    assert api.get(f"tasks/{task_id}").status_code == 404
    assert api.get("tasks/rate_limit").json()["remaining"] == 1
    used = api.get("usage").json()["rate_limit"]["primary_window"]["used_percent"]
    assert used == 67  # 2 of 3, rounded up
    # deleting the environment does not either
    assert api.delete(f"environments/{env['id']}").status_code == 204
    assert api.get("tasks/rate_limit").json()["remaining"] == 1


def test_limits_are_per_account(limited: Server, repo: Path) -> None:
    api = limited.api
    env = api.create_env(repo)
    api.create_task(env["id"], metadata={"best_of_n": 3})
    other = api.as_(limited.other_account_token())
    assert other.get("tasks/rate_limit").json()["remaining"] == LIMIT
    assert other.get("usage").json()["rate_limit"]["primary_window"]["used_percent"] == 0


def test_a_disabled_window_is_null_not_shifted(tmp_path: Path, sqlite_url: str, repo: Path) -> None:
    """rate_limit_primary=0 disables the 5-hour window; the weekly one stays secondary."""
    server = _limited_server(tmp_path, sqlite_url, rate_limit_primary=0, rate_limit_secondary=2)
    srv = next(server)
    try:
        api = srv.api
        env = api.create_env(repo)
        api.create_task(env["id"], metadata={"best_of_n": 2})
        rate = api.get("usage").json()["rate_limit"]
        assert rate["primary_window"] is None
        assert rate["secondary_window"]["limit_window_seconds"] == 604800
        assert rate["secondary_window"]["used_percent"] == 100
        assert rate["limit_reached"] is True
        rl = api.get("tasks/rate_limit").json()
        assert [(w["limit"], w["remaining"]) for w in rl["windows"]] == [(2, 0)]
        again = {
            "new_task": {"environment_id": env["id"]},
            "input_items": [{"type": "message", "content": ["again"]}],
        }
        assert api.post("tasks", json=again).status_code == 429
    finally:
        next(server, None)


# --------------------------------------------------------------------------- settings


def test_user_settings_defaults_and_patch_round_trip(api: Api, server: Server) -> None:
    got = api.get("settings/user").json()
    assert got == {
        "user_id": got["user_id"],
        "git_diff_mode": "split",
        "branch_format": "codex/{feature}",
        "custom_instructions": "",
        "code_review_preference": "repo_default",
        "alpha_opt_in": False,
    }
    assert got["user_id"]

    change = {
        "branch_format": "codex/{date}-{feature}",
        "custom_instructions": "Always run the tests.",
        "alpha_opt_in": True,
    }
    r = api.patch("settings/user", json=change)
    assert r.status_code == 200, r.text
    assert r.json() == {**got, **change}
    assert api.get("settings/user").json() == {**got, **change}

    r = api.patch("settings/user", json={"git_diff_mode": "unified"})
    assert r.json() == {**got, **change, "git_diff_mode": "unified"}

    for bad in (
        {"branch_format": "codex/{nope}"},
        {"branch_format": "x" * 101},
        {"git_diff_mode": "sideways"},
        {"code_review_preference": "sometimes"},
        {"alpha_opt_in": None},
        {"unknown": 1},
    ):
        r = api.patch("settings/user", json=bad)
        assert r.status_code == 400, (bad, r.text)
    assert api.get("settings/user").json()["git_diff_mode"] == "unified"

    # settings belong to the user: another account's user sees the defaults
    other = api.as_(server.other_account_token())
    assert other.get("settings/user").json()["alpha_opt_in"] is False


def test_user_preferences_config(api: Api) -> None:
    cfg = api.get("settings/configs/user-preferences").json()
    assert cfg["branch_format_max_length"] == 100
    assert cfg["custom_instructions_max_chars"] == 100000
    values = [v["value"] for v in cfg["branch_format_special_values"]]
    assert values == ["{feature}", "{branch}", "{uuid}", "{ts}", "{date}", "{time}"]
    for v in cfg["branch_format_special_values"]:
        assert set(v) == {"value", "char_count_label", "char_count", "description", "example"}


# --------------------------------------------------------------------------- Codex start-up


def test_accounts_check(api: Api, server: Server) -> None:
    r = api.get("accounts/check")
    assert r.status_code == 200
    body = r.json()
    with server.app_state.db.session() as s:
        account, _ = ensure_owner(s)
        account_id = account.id
    assert body["default_account_id"] == account_id
    assert body["account_ordering"] == [account_id]
    [entry] = body["accounts"]
    assert entry["id"] == account_id
    assert entry["workspace_backend_origin"] == str(api.client.base_url).rstrip("/")
    assert entry["workspace_backend_origin"] == "http://testserver"
    assert entry["account_routing_override"] == "NO_CONSTRAINT"
    assert entry["structure"] in ("personal", "workspace")

    # with ChatGPT-Account-Id naming the account, the same answer
    same = api.get("accounts/check", headers={"ChatGPT-Account-Id": account_id})
    assert same.json() == body


@pytest.mark.parametrize("path", ["config/bundle", "config/requirements", "workspace-messages"])
def test_codex_start_up_calls_answer_empty_objects(api: Api, path: str) -> None:
    r = api.get(path)
    assert r.status_code == 200
    assert r.json() == {}


@pytest.mark.parametrize(
    "path",
    [
        "usage",
        "tasks/rate_limit",
        "settings/user",
        "settings/configs/user-preferences",
        "accounts/check",
        "config/bundle",
        "workspace-messages",
    ],
)
def test_account_endpoints_need_a_token(server: Server, path: str) -> None:
    for prefix in PREFIXES:
        r = server.api.as_(None).styled(prefix).get(path)
        assert r.status_code == 401, (prefix, path, r.text)
