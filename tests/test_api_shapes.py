"""The server's responses against the captured WHAM wire shapes.

For every endpoint with a captured example (``wham-reference/examples``, the official client's
fixtures in ``wham-reference/openai-codex-fixtures`` and the ``usage`` payload quoted in
wham-api.md §6.1) this module builds the same situation on an openwham server (a best-of-4 task
whose attempts completed with a ``message``, a ``pr`` item and a worklog; an environment with
env vars and a secret; a pull request; an archived task) and checks:

* every key path of the example is present in our response with a compatible JSON type
  (``null`` on either side matches anything, int matches float; list elements are compared by
  kind: ``type``, ``content_type`` or worklog role/content type; maps keyed by ids or names,
  such as ``turn_mapping`` or ``repo_map``, are compared by value shape);
* for real captures (not for the hand-written synthetic samples and client fixtures, which are
  abbreviated), our response has no key the capture lacks, except the allow-lists below;
* timestamps are floats, ids have the production formats, and each response parses back into
  its ``openwham.wire`` model with no unknown field and re-serialises to the same JSON.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from pydantic import BaseModel, TypeAdapter

from conftest import Api, Server, git, make_server, reference_dir
from openwham import wire
from openwham.store import models as m

# --------------------------------------------------------------------------- allow-lists

# Keys openwham emits that a capture lacks (path patterns, ``*`` matches anything).
EXTRA_OK: dict[str, str] = {
    "*task.updated_at": "Task.updated_at: read by the official CLI when present (wham-api.md §3.2)",
    "*task.environment_id": "Task.environment_id: read by `codex cloud status` (§3.2)",
    "*task.is_review": "Task.is_review: read by the official CLI when present (§3.2)",
    "*task.task_status_display": "Task.task_status_display: read by the official CLI (§3.2)",
    "task_status_display": "top-level copy in GET tasks/{id}; the CLI prefers it (§3.2)",
    "*latest_turn_status_display.created_at": "timestamp fallback of `codex cloud status` (§3.1)",
    "*latest_turn_status_display.updated_at": "timestamp fallback of `codex cloud status` (§3.1)",
    "*share_targets": "Environment.share_targets: in the synthetic samples and §7.1",
    "*environment.updated_at": "Environment.updated_at: float epoch like created_at (§1.4)",
    "[].updated_at": "Environment.updated_at in environment lists (§1.4)",
    "updated_at": "Environment.updated_at of GET environments/{id} (§1.4)",
    "windows": "tasks/rate_limit windows[]: synthetic sample and envelope schema (§6.2)",
    "additional_rate_limits": "usage: field of the client's RateLimitStatusPayload (§6.1, V)",
    "rate_limit_reached_type": "usage: field of the client's RateLimitStatusPayload (§6.1, V)",
    "spend_control": "usage: field of the client's RateLimitStatusPayload (§6.1, V)",
    "rate_limit_reset_credits": "usage: sent to newer clients (§6.1, V)",
    "*turn.input_items": (
        "AssistantTurn.input_items ([] here): a §4.3 field the client parses when present (V); "
        "test_wire_roundtrip wants server-built turns to carry every §4.3 field"
    ),
    "sibling_turns[assistant].input_items": "AssistantTurn.input_items, as above",
}

# Paths of an example that openwham may lack or type differently (synthetic samples only).
MISSING_OK: dict[str, str] = {
    "*setup": "synthetic samples use a string (also maintenance_setup); real captures use lists",
    "*latest_turn_status_display.issue_counts": (
        "null in one synthetic sample; openwham emits it only when set (D, §3.1)"
    ),
    "*repo_map{}.permissions": "only synthetic samples carry it; the real captures lack the key",
    "machine.limits": "a synthetic sample nests limits; the real capture has flat *_limit fields",
    "current_diff_task_turn.output_items[output_diff]": (
        "openwham puts the diff in a `pr` item, which the client accepts too (§4.6)"
    ),
}

MAP_KEYS = {"turn_mapping", "repo_map", "env_vars", "secrets", "repo_name_map"}
TIMESTAMP_KEYS = {
    "created_at",
    "updated_at",
    "create_time",
    "update_time",
    "created",
    "last_user_turn_created_at",
}

HEX32 = "[0-9a-f]{32}"
TASK_RE = re.compile(rf"^task_e_{HEX32}$")
USER_TURN_RE = re.compile(rf"^task_e_{HEX32}~usertrn_e_{HEX32}$")
ASSISTANT_TURN_RE = re.compile(rf"^task_e_{HEX32}~assttrn_e_{HEX32}$")
ENV_RE = re.compile(rf"^{HEX32}$")


def _pattern(p: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(p).replace(r"\*", ".*") + "$")


def _allowed(path: str, allow: dict[str, str], used: set[str]) -> bool:
    hits = {p for p in allow if _pattern(p).match(path)}
    used |= hits
    return bool(hits)


# --------------------------------------------------------------------------- the comparison


def _kind(value: Any) -> str | None:
    """What distinguishes the elements of a polymorphic list (items, fragments, messages)."""
    if not isinstance(value, dict):
        return None
    turn = value.get("turn")
    if isinstance(turn, dict) and isinstance(turn.get("type"), str):
        return str(turn["type"])
    for key in ("type", "content_type"):
        if isinstance(value.get(key), str):
            return str(value[key])
    author, content = value.get("author"), value.get("content")
    if isinstance(author, dict) and isinstance(content, dict):
        return f"{author.get('role')}/{content.get('content_type')}"
    return None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


@dataclass
class Comparison:
    exact: bool
    problems: list[str] = field(default_factory=list)
    used: set[str] = field(default_factory=set)  # allow-list entries that excused something

    def compare(self, cap: Any, ours: Any, path: str) -> None:
        if cap is None or ours is None:
            return
        if _json_type(cap) != _json_type(ours):
            if not _allowed(path, MISSING_OK, self.used):
                self.problems.append(
                    f"{path or '<root>'}: capture has {_json_type(cap)}, ours {_json_type(ours)}"
                )
            return
        if isinstance(cap, dict):
            if path.rsplit(".", 1)[-1] in MAP_KEYS:
                self._elements(list(cap.values()), list(ours.values()), path + "{}")
            else:
                self._object(cap, ours, path)
        elif isinstance(cap, list):
            self._elements(cap, ours, path + "[]")

    def _object(self, cap: dict[str, Any], ours: dict[str, Any], path: str) -> None:
        for key, value in cap.items():
            sub = f"{path}.{key}" if path else key
            if key not in ours:
                if not _allowed(sub, MISSING_OK, self.used):
                    self.problems.append(f"{sub}: missing in ours")
                continue
            self.compare(value, ours[key], sub)
        if self.exact:
            for key in ours.keys() - cap.keys():
                sub = f"{path}.{key}" if path else key
                if not _allowed(sub, EXTRA_OK, self.used):
                    self.problems.append(f"{sub}: not in the capture")

    def _elements(self, cap: list[Any], ours: list[Any], path: str) -> None:
        if not cap or not ours:
            return
        for element in cap:
            kind = _kind(element)
            match = next((o for o in ours if _kind(o) == kind), None)
            if kind is None:
                self.compare(element, match if match is not None else ours[0], path)
            elif match is None:
                sub = f"{path[:-2]}[{kind}]"
                if not _allowed(sub, MISSING_OK, self.used):
                    self.problems.append(f"{sub}: the capture has a {kind!r} element, ours none")
            else:
                self.compare(element, match, f"{path[:-2]}[{kind}]")


def shape_problems(cap: Any, ours: Any, *, exact: bool, used: set[str] | None = None) -> list[str]:
    comparison = Comparison(exact=exact)
    comparison.compare(cap, ours, "")
    if used is not None:
        used |= comparison.used
    return comparison.problems


def float_problems(value: Any, path: str = "") -> list[str]:
    """Epoch timestamps must be floats (setup-log keys carry naive ISO strings instead)."""
    out: list[str] = []
    if isinstance(value, dict):
        for key, sub in value.items():
            where = f"{path}.{key}" if path else key
            epoch = key in TIMESTAMP_KEYS and not path.endswith(".key")
            if epoch and sub is not None and not isinstance(sub, float):
                out.append(f"{where}: {sub!r} is not a float")
            out += float_problems(sub, where)
    elif isinstance(value, list):
        for sub in value:
            out += float_problems(sub, path + "[]")
    return out


def _turn_id_ok(value: Any) -> bool:
    return isinstance(value, str) and bool(
        USER_TURN_RE.match(value) or ASSISTANT_TURN_RE.match(value)
    )


def id_problems(value: Any, path: str = "") -> list[str]:
    """Task, turn and environment ids wherever they appear have the production formats."""
    out: list[str] = []
    if isinstance(value, list):
        for sub in value:
            out += id_problems(sub, path + "[]")
        return out
    if not isinstance(value, dict):
        return out

    def bad(key: str, what: str) -> None:
        out.append(f"{path}.{key}: {value[key]!r} is not a {what} id")

    kind = value.get("type")
    if "id" in value:
        if kind == "user" and not USER_TURN_RE.match(str(value["id"])):
            bad("id", "user turn")
        elif kind == "assistant" and not ASSISTANT_TURN_RE.match(str(value["id"])):
            bad("id", "assistant turn")
        elif ("denormalized_metadata" in value or "has_unread_turn" in value) and not (
            TASK_RE.match(str(value["id"]))
        ):
            bad("id", "task")
        elif "repo_map" in value and not ENV_RE.match(str(value["id"])):
            bad("id", "environment")
    if value.get("environment_id") is not None and not ENV_RE.match(str(value["environment_id"])):
        bad("environment_id", "environment")
    for key in ("current_turn_id", "turn_id", "previous_turn_id", "assistant_turn_id", "parent"):
        if value.get(key) is not None and not _turn_id_ok(value[key]):
            bad(key, "turn")
    for key in ("sibling_turn_ids", "child_turns", "children"):
        if isinstance(value.get(key), list) and not all(_turn_id_ok(x) for x in value[key]):
            bad(key, "turn")
    for key, sub in value.items():
        if key == "turn_mapping" and isinstance(sub, dict):
            out += [f"{path}.turn_mapping: key {k!r}" for k in sub if not _turn_id_ok(k)]
        out += id_problems(sub, f"{path}.{key}" if path else key)
    return out


def extra_field_problems(obj: Any, path: str = "") -> list[str]:
    """Fields a wire model did not declare (kept as extras, or parsed into UnknownObject)."""
    out: list[str] = []
    if isinstance(obj, BaseModel):
        if obj.model_extra:
            out.append(f"{path or '<root>'} ({type(obj).__name__}): {sorted(obj.model_extra)}")
        for name in type(obj).model_fields:
            out += extra_field_problems(getattr(obj, name), f"{path}.{name}" if path else name)
    elif isinstance(obj, list):
        for sub in obj:
            out += extra_field_problems(sub, path + "[]")
    elif isinstance(obj, dict):
        for key, sub in obj.items():
            out += extra_field_problems(sub, f"{path}{{{key}}}")
    return out


# --------------------------------------------------------------------------- the situation

SECRET = "s3cr3t-value-never-shown"
DIFF = (
    "diff --git a/calc.py b/calc.py\n"
    "index 1111111..2222222 100644\n"
    "--- a/calc.py\n"
    "+++ b/calc.py\n"
    "@@ -1,2 +1,2 @@\n"
    " def add(a, b):\n"
    "-    return a - b\n"
    "+    return a + b\n"
)
TOOLCHAIN = {
    "CODEX_ENV_PYTHON_VERSION": "3.12",
    "CODEX_ENV_NODE_VERSION": "20",
    "CODEX_ENV_RUBY_VERSION": "3.4.4",
    "CODEX_ENV_RUST_VERSION": "1.87.0",
    "CODEX_ENV_GO_VERSION": "1.24.3",
    "CODEX_ENV_BUN_VERSION": "1.2.14",
    "CODEX_ENV_PHP_VERSION": "8.4",
    "CODEX_ENV_JAVA_VERSION": "21",
    "CODEX_ENV_SWIFT_VERSION": "6.1",
}


def _completed_body(body: dict[str, Any], turn_id: str, now: float) -> dict[str, Any]:
    """The stored form of a finished attempt, item for item in the captured shapes."""
    body = copy.deepcopy(body)
    body.update(
        {
            "output_items": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [
                        {"content_type": "text", "text": "Fixed add()."},
                        {
                            "content_type": "terminal_chunk_citation",
                            "terminal_chunk_id": "chunk-1",
                            "line_range_start": 1,
                            "line_range_end": 6,
                        },
                        {"content_type": "text", "text": "\n- tests pass"},
                    ],
                },
                {
                    "type": "pr",
                    "pr_title": "Fix add()",
                    "pr_message": "## Summary\n- add instead of subtract",
                    "output_diff": {
                        "type": "output_diff",
                        "repo_id": None,
                        "base_commit_sha": "a" * 40,
                        "preapply_patch_base_commit_sha": None,
                        "diff": DIFF,
                        "external_storage_diff": None,
                        "files_modified": 1,
                        "lines_added": 1,
                        "lines_removed": 1,
                        "commit_message": "Fix add()",
                    },
                },
                {
                    "type": "partial_repo_snapshot",
                    "files": [
                        {
                            "path": "calc.py",
                            "contents": None,
                            "line_range_contents": [
                                {
                                    "line_range_start": 1,
                                    "line_range_end": 2,
                                    "content": ["def add(a, b):", "    return a - b"],
                                    "contains_end_of_file": True,
                                }
                            ],
                            "missing_reason": None,
                        }
                    ],
                },
            ],
            "worklog": {
                "messages": [
                    {
                        "id": f"{turn_id}-m0",
                        "author": {"role": "user", "name": None, "metadata": {}},
                        "create_time": now,
                        "update_time": now,
                        "content": {"content_type": "text", "parts": ["Fix the failing test"]},
                        "status": "finished_successfully",
                        "end_turn": None,
                        "weight": 0.0,
                        "metadata": {"l1239dk1": {"inline_comments": []}},
                        "recipient": "all",
                        "channel": None,
                    },
                    {
                        "id": f"{turn_id}-m1",
                        "author": {"role": "assistant", "name": None, "metadata": {}},
                        "create_time": None,
                        "update_time": None,
                        "content": {"content_type": "text", "parts": ["Looking at calc.py."]},
                        "status": "finished_successfully",
                        "end_turn": False,
                        "weight": 1.0,
                        "metadata": {
                            "exclude_after_next_user_message": True,
                            "reasoning_status": "is_reasoning",
                            "first_content_token_index": 3,
                            "is_initial_reasoning_message": False,
                        },
                        "recipient": "all",
                        "channel": None,
                    },
                    {
                        "id": f"{turn_id}-m2",
                        "author": {"role": "assistant", "name": None, "metadata": {}},
                        "create_time": now,
                        "update_time": now,
                        "content": {
                            "content_type": "code",
                            "language": "unknown",
                            "response_format_name": None,
                            "text": '{"session_name":"shell"}',
                        },
                        "status": "finished_successfully",
                        "end_turn": False,
                        "weight": 1.0,
                        "metadata": {"first_content_token_index": 11},
                        "recipient": "container.new_session",
                        "channel": "analysis",
                    },
                ]
            },
            "latest_event": {"created": now, "text": "Completing the task", "event_type": "info"},
            "base_commit_sha": "a" * 40,
            "logs": {
                "logs": [
                    {
                        "key": {
                            "name": "userscript_1757148687",
                            "type": "UserSetupScript",
                            "created_at": "2025-09-06T08:51:27.933241",
                        },
                        "value": "file_" + "0" * 32,
                    }
                ]
            },
            "proxy_events": [
                {
                    "timestamp": "2025-09-06T08:54:21.576412",
                    "decision": "allow",
                    "reason": "checks passed",
                    "method": "GET",
                    "domain": "registry.npmjs.org",
                    "protocol": "HTTP/1.1",
                    "size": 0,
                    "path": None,
                }
            ],
        }
    )
    return body


def _pull_request(turn_id: str) -> dict[str, Any]:
    return {
        "id": "pr-1",
        "assistant_turn_id": turn_id,
        "pull_request": {
            "number": 172,
            "url": "https://github.com/acme/widgets/pull/172",
            "state": "open",
            "merged": False,
            "mergeable": False,
            "draft": False,
            "title": "Fix add()",
            "body": "## Summary",
            "base": "main",
            "head": "codex/fix-add",
            "base_sha": "a" * 40,
            "head_sha": "b" * 40,
            "merge_commit_sha": None,
            "comments": None,
            "diff": None,
            "user": {
                "login": "acme",
                "name": "acme",
                "email": None,
                "avatar_url": "https://example.com/a.png",
                "id": 1,
            },
        },
        "codex_updated_sha": "b" * 40,
    }


@dataclass
class Scenario:
    server: Server
    api: Api
    env: dict[str, Any]
    created: dict[str, Any]
    task_id: str
    responses: dict[str, Any] = field(default_factory=dict)
    requests: dict[str, tuple[str, dict[str, Any] | None]] = field(default_factory=dict)


def _finish_task(server: Server, task_id: str) -> None:
    now = time.time()
    with server.app_state.db.session() as s:
        task = s.get(m.Task, task_id)
        assert task is not None
        turns = s.query(m.Turn).filter(m.Turn.task_id == task_id, m.Turn.role == "assistant")
        for turn in turns:
            turn.body = _completed_body(turn.body, turn.id, now)
            turn.turn_status = "completed"
            turn.updated_at = now
        task.title = "Fix the failing test"
        task.has_generated_title = True
        pr = _pull_request(str(task.current_turn_id))
        task.body = {**task.body, "external_pull_requests": [pr]}
        task.updated_at = now


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("shapes")
    repo = tmp / "widgets"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "initial", cwd=repo)
    git("branch", "develop", cwd=repo)  # branch search pages: main, then develop

    gen = make_server(tmp, f"sqlite:///{tmp / 'data' / 'openwham.db'}")
    server = next(gen)
    api = server.api
    env = api.create_env(
        repo,
        setup=["pip install -e ."],
        maintenance_setup=["pip install -e ."],
        env_vars={**TOOLCHAIN, "TKEY": "plain-value"},
        secrets={"API_TOKEN": SECRET},
        agent_network_access={
            "mode": "on",
            "preset_allowlist": "all",
            "allowlist_domains": "",
            "safe_methods_only": None,
        },
        auto_setup_settings={"use_auto_setup": False},
        cache_settings={"post_setup_cache_enabled": True},
        share_settings="workspace",
    )
    archived = api.create_task(env["id"], "An archived task")["task"]["id"]
    assert api.post(f"tasks/{archived}/archive").status_code == 200
    api.create_task(env["id"], "Another task")
    # best-of-4 (turn_mapping_sample) starting from local changes (the synthetic task bundle)
    resp = api.post(
        "tasks",
        json={
            "new_task": {"environment_id": env["id"], "branch": "main"},
            "input_items": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"content_type": "text", "text": "Fix the failing test"}],
                },
                {"type": "pre_apply_patch", "output_diff": {"diff": DIFF}},
            ],
            "metadata": {"best_of_n": 4},
        },
    )
    assert resp.status_code == 200, resp.text
    created = resp.json()
    task_id = created["task"]["id"]
    _finish_task(server, task_id)
    sc = Scenario(server=server, api=api, env=env, created=created, task_id=task_id)

    turn_id = created["turn"]["id"]
    r = sc.responses
    r["tasks_create"] = created
    for name, path, params in [
        ("task", f"tasks/{task_id}", None),
        ("tasks_list_all", "tasks/list", {"limit": 19, "task_filter": "all"}),
        ("tasks_list_current", "tasks/list", {"limit": 19, "task_filter": "current"}),
        ("tasks_list_archived", "tasks/list", {"limit": 19, "task_filter": "archived"}),
        ("tasks_list_limit1", "tasks/list", {"limit": 1, "task_filter": "all"}),
        ("tasks_feed", "tasks", None),
        ("turns", f"tasks/{task_id}/turns", None),
        ("turn", f"tasks/{task_id}/turns/{turn_id}", None),
        ("siblings", f"tasks/{task_id}/turns/{turn_id}/sibling_turns", None),
        ("environments", "environments", None),
        ("environments_recent", "environments/recent", None),
        ("environment", f"environments/{env['id']}", None),
        ("environment_full", f"environments/{env['id']}/with-creator-and-machine", None),
        ("environments_with_creators", "environments/with-creators", None),
        ("rate_limit", "tasks/rate_limit", None),
        ("settings_user", "settings/user", None),
        ("user_preferences", "settings/configs/user-preferences", None),
        ("usage", "usage", None),
        ("machines", "machines", None),
        ("accounts_check", "accounts/check", None),
        ("github_installations", "github/installations", None),
        ("github_installations_v2", "github/installations/v2", None),
        ("github_installation_events", "github/installations/events/v2", None),
        ("github_repository", f"github/repositories/{env['repos'][0]}", None),
        ("github_branches", f"github/branches/{env['repos'][0]}/search", {"limit": 1}),
        ("github_user_handle", "task_suggestions/github/user_handle", None),
    ]:
        resp = api.get(path, params=params)
        assert resp.status_code == 200, f"{path}: {resp.status_code} {resp.text}"
        r[name] = resp.json()
        sc.requests[name] = (path, params)
    viewed = api.post(f"tasks/{task_id}/turns/{turn_id}/viewed")
    assert viewed.status_code == 200, viewed.text
    r["viewed"] = viewed.json()
    yield sc
    next(gen, None)


# --------------------------------------------------------------------------- the cases


def _reference() -> Path:
    return reference_dir()


def load_example(name: str) -> Any:
    folder = "openai-codex-fixtures" if name.startswith("oc:") else "examples"
    return json.loads((_reference() / folder / name.removeprefix("oc:")).read_text())


# wham-api.md §6.1, captured Pro response (the secondary window's numbers were elided there).
USAGE_CAPTURE: dict[str, Any] = {
    "plan_type": "pro",
    "rate_limit": {
        "allowed": True,
        "limit_reached": False,
        "primary_window": {
            "used_percent": 8,
            "limit_window_seconds": 17940,
            "reset_after_seconds": 6625,
            "reset_at": 1761548349,
        },
        "secondary_window": {
            "used_percent": 3,
            "limit_window_seconds": 604740,
            "reset_after_seconds": 400000,
            "reset_at": 1761948349,
        },
    },
    "credits": None,
}


@dataclass(frozen=True)
class Case:
    response: str
    example: str
    exact: bool  # real capture: our output must not add keys (beyond EXTRA_OK)


CASES = [
    Case("tasks_create", "task_create_response.json", True),
    Case("task", "task_details_sample.json", True),
    Case("task", "wham-examples_task-bundle.json", False),
    Case("task", "oc:task_details_with_diff.json", False),
    Case("task", "oc:task_details_with_error.json", False),
    Case("tasks_list_all", "tasks_list_all.json", True),
    Case("tasks_list_current", "tasks_list_current.json", True),
    Case("tasks_list_archived", "tasks_list_archived.json", True),
    Case("tasks_list_limit1", "tasks_list_limit1_all.json", True),
    Case("tasks_list_current", "wham-examples_tasks-list.json", False),
    Case("tasks_feed", "wham-examples_tasks-response.json", False),
    Case("turns", "turn_mapping_sample.json", True),
    Case("turns", "wham-examples_turn-mapping.json", False),
    Case("turn", "wham-examples_task-turn-detail.json", False),
    Case("siblings", "sibling_turns_sample.json", True),
    Case("environments", "environments_list.json", True),
    Case("environments", "wham-examples_environments-list.json", False),
    Case("environments_recent", "environments_recent.json", True),
    Case("environment", "environment_detail.json", True),
    Case("environment_full", "environment_detail_with_creator.json", True),
    Case("environment_full", "wham-examples_environment-with-creator.json", False),
    Case("rate_limit", "rate_limit_plus.json", True),
    Case("rate_limit", "wham-examples_tasks-rate-limit.json", False),
    Case("settings_user", "settings_user.json", True),
    Case("settings_user", "wham-examples_settings-user.json", False),
    Case("user_preferences", "wham-examples_settings-config-user-preferences.json", True),
    Case("viewed", "turn_viewed_success.json", True),
    Case("usage", "<wham-api.md §6.1>", True),
    Case("github_installations", "wham-examples_github-installations.json", False),
    Case("github_installations_v2", "wham-examples_github-installations-v2.json", False),
    Case("github_installation_events", "wham-examples_github-installations-events.json", False),
    Case("github_repository", "wham-examples_github-repository.json", False),
    Case("github_branches", "wham-examples_github-branches-search.json", False),
    Case("github_user_handle", "wham-examples_task-suggestions-github-user-handle.json", False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.response}~{c.example}")
def test_response_has_the_captured_shape(scenario: Scenario, case: Case) -> None:
    capture = USAGE_CAPTURE if case.response == "usage" else load_example(case.example)
    ours = scenario.responses[case.response]
    assert shape_problems(capture, ours, exact=case.exact) == []


def test_every_allow_list_entry_is_needed(scenario: Scenario) -> None:
    """An allow-list entry that no longer excuses anything must be removed."""
    used: set[str] = set()
    for case in CASES:
        capture = USAGE_CAPTURE if case.response == "usage" else load_example(case.example)
        shape_problems(capture, scenario.responses[case.response], exact=case.exact, used=used)
    assert set(EXTRA_OK) - used == set()
    assert set(MISSING_OK) - used == set()


def test_machines_elements_have_the_captured_machine_shape(scenario: Scenario) -> None:
    """The captures of ``machines`` are ``[]``; elements match the captured ``machine`` object."""
    machines = scenario.responses["machines"]
    assert isinstance(machines, list) and len(machines) == 1
    assert load_example("machines_list.json") == []
    machine = load_example("environment_detail_with_creator.json")["machine"]
    assert shape_problems(machine, machines[0], exact=True) == []
    embedded = scenario.responses["environment_full"]["machine"]
    assert shape_problems(machine, embedded, exact=True) == []


def test_situation_matches_the_captures(scenario: Scenario) -> None:
    """Guard against vacuous comparisons: the compared parts really are populated."""
    r = scenario.responses
    attempt = r["task"]["current_assistant_turn"]
    kinds = [o["type"] for o in attempt["output_items"]]
    assert kinds == ["message", "pr", "partial_repo_snapshot"]
    assert [len(attempt["worklog"]["messages"]), attempt["turn_status"]] == [3, "completed"]
    assert r["task"]["current_diff_task_turn"]["id"] == attempt["id"]
    assert len(r["turns"]["turn_mapping"]) == 5
    assert [t["attempt_placement"] for t in r["siblings"]["sibling_turns"]] == [1, 2, 3]
    assert r["environment"]["secrets"] == {"API_TOKEN": "<REDACTED>"}
    assert r["tasks_list_all"]["items"][0]["pull_requests"][0]["pull_request"]["number"] == 172
    assert len(r["tasks_list_archived"]["items"]) == 1
    assert isinstance(r["tasks_list_limit1"]["cursor"], str)
    assert r["environments_recent"][0]["id"] == scenario.env["id"]
    assert SECRET not in json.dumps(r)


def test_timestamps_are_floats(scenario: Scenario) -> None:
    problems = [p for name, body in scenario.responses.items() for p in float_problems(body, name)]
    assert problems == []


def test_ids_have_the_production_formats(scenario: Scenario) -> None:
    problems = [p for name, body in scenario.responses.items() for p in id_problems(body, name)]
    assert problems == []
    r = scenario.responses
    assert TASK_RE.match(r["tasks_create"]["task"]["id"])
    assert USER_TURN_RE.match(r["tasks_create"]["user_turn"]["id"])
    assert ASSISTANT_TURN_RE.match(r["tasks_create"]["turn"]["id"])
    assert ENV_RE.match(r["environment"]["id"])
    assert all(ENV_RE.match(e["id"]) for e in r["environments"])


WIRE_MODELS: dict[str, Any] = {
    "tasks_create": wire.CreateTaskResponse,
    "task": wire.TaskDetails,
    "tasks_list_all": wire.TaskListPage,
    "tasks_list_current": wire.TaskListPage,
    "tasks_list_archived": wire.TaskListPage,
    "tasks_list_limit1": wire.TaskListPage,
    "tasks_feed": wire.TaskFeedPage,
    "turns": wire.TurnMapping,
    "turn": wire.TurnResponse,
    "siblings": wire.SiblingTurnsResponse,
    "environments": TypeAdapter(list[wire.Environment]),
    "environments_recent": TypeAdapter(list[wire.Environment]),
    "environment": wire.Environment,
    "environment_full": wire.EnvironmentWithCreatorAndMachine,
    "environments_with_creators": wire.EnvironmentsWithCreatorsPage,
    "rate_limit": wire.TaskRateLimit,
    "settings_user": wire.UserSettings,
    "user_preferences": wire.UserPreferencesConfig,
    "usage": wire.RateLimitStatusPayload,
    "machines": TypeAdapter(list[wire.Machine]),
    "accounts_check": wire.AccountsCheck,
    "viewed": wire.SuccessResponse,
}


@pytest.mark.parametrize("name", sorted(WIRE_MODELS))
def test_responses_validate_into_wire_models(scenario: Scenario, name: str) -> None:
    model = WIRE_MODELS[name]
    data = scenario.responses[name]
    if isinstance(model, TypeAdapter):
        parsed = model.validate_python(data)
        again = model.dump_python(parsed, mode="json")
    else:
        parsed = model.model_validate(data)
        again = parsed.model_dump(mode="json")
    assert extra_field_problems(parsed) == []
    assert again == data


def test_responses_match_the_published_openapi_schema(scenario: Scenario) -> None:
    """Each answer validates against ``/openapi.json`` (what the fuzz checks on every case):
    completed best-of-4 attempts with messages, a ``pr`` item and work logs included."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", scenario.api.client.app)
    failures = []
    for name, (path, params) in scenario.requests.items():
        resp = scenario.api.get(path, params=params)
        operation = schema.find_operation_by_path("GET", scenario.api.url(path))
        assert operation is not None, path
        try:
            operation.validate_response(resp)
        except (AssertionError, BaseExceptionGroup) as exc:
            failures.append(f"{name}: {exc}")
    assert failures == []


def test_both_path_styles_answer_the_same(scenario: Scenario) -> None:
    codex = scenario.api.styled("/api/codex")
    task = codex.get(f"tasks/{scenario.task_id}").json()
    assert task == scenario.api.get(f"tasks/{scenario.task_id}").json()
    assert shape_problems(load_example("task_details_sample.json"), task, exact=True) == []


def test_comparison_helper_reports_differences() -> None:
    """The helper itself: missing keys, extra keys, type changes, maps and element kinds."""
    cap = {"a": 1, "b": {"c": "x"}, "repo_map": {"k1": {"n": 1}}, "items": [{"type": "m", "t": ""}]}
    assert shape_problems(cap, copy.deepcopy(cap), exact=True) == []
    assert shape_problems(cap, {**cap, "a": 1.5, "b": None}, exact=True) == []
    ours = {
        "a": "1",
        "b": {"c": "x", "d": 2},
        "repo_map": {"other": {"n": True}},
        "items": [{"type": "m"}],
        "z": 0,
    }
    assert sorted(shape_problems(cap, ours, exact=True)) == [
        "a: capture has number, ours str",
        "b.d: not in the capture",
        "items[m].t: missing in ours",
        "repo_map{}.n: capture has number, ours bool",
        "z: not in the capture",
    ]
    assert shape_problems(cap, ours, exact=False) == [
        "a: capture has number, ours str",
        "repo_map{}.n: capture has number, ours bool",
        "items[m].t: missing in ours",
    ]
    assert shape_problems({"x": [{"type": "q"}]}, {"x": [{"type": "p"}]}, exact=False) == [
        "x[q]: the capture has a 'q' element, ours none"
    ]
