"""Bad input: every case gets a clear 4xx JSON error, never a 500, and stores nothing.

Each case is one test id. A case is a request built from a :class:`World` (an owner with an
environment and two tasks, plus a second account with its own); the check around every case is
the same: 4xx (the exact status when the case names one), a JSON body with a non-empty string
``detail`` (the exact message where the real server's wording is known), and every table row
unchanged. The create-task table runs on SQLite and PostgreSQL, the rest on SQLite.

The cases share one server per module and database (``world``, ``any_world``): since no case may
change anything, sharing is safe, and it keeps some 600 cases within seconds.
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from conftest import Api, Server, finish_turn, git, make_repo, make_server, postgres_database
from openwham.server.limits import MAX_BODY_BYTES
from openwham.service.tasks import MAX_PATCH_BYTES, MAX_PROMPT_CHARS
from openwham.store.models import Base

# --------------------------------------------------------------------------- world


@dataclass
class World:
    server: Server
    api: Api
    tmp: Path
    repo: Path
    env: str
    task: str
    turn: str  # finished assistant turn of ``task``
    pending_turn: str  # its unfinished sibling attempt
    user_turn: str
    task2: str
    turn2: str  # finished assistant turn of ``task2``
    other_env: str
    other_task: str
    other_turn: str

    @property
    def data_dir(self) -> Path:
        return self.server.app_state.settings.resolved_data_dir


def build_world(server: Server, repo: Path, tmp: Path) -> World:
    api = server.api
    other = api.as_(server.other_account_token())
    # a second account may use local paths only inside WHAM_LOCAL_REPO_ROOTS
    server.app_state.settings.local_repo_roots = str(repo.parent)
    env = api.create_env(repo)["id"]
    first = api.create_task(env, metadata={"best_of_n": 2})
    second = api.create_task(env, "second task")
    other_env = other.create_env(repo, label="theirs")["id"]
    theirs = other.create_task(other_env)
    for turn in (first["turn"]["id"], second["turn"]["id"], theirs["turn"]["id"]):
        finish_turn(server, turn)
    (pending,) = first["turn"]["sibling_turn_ids"]
    return World(
        server=server,
        api=api,
        tmp=tmp,
        repo=repo,
        env=env,
        task=first["task"]["id"],
        turn=first["turn"]["id"],
        pending_turn=pending,
        user_turn=first["user_turn"]["id"],
        task2=second["task"]["id"],
        turn2=second["turn"]["id"],
        other_env=other_env,
        other_task=theirs["task"]["id"],
        other_turn=theirs["turn"]["id"],
    )


@contextmanager
def module_world(tmp: Path, backend: str) -> Iterator[World]:
    """One server (and world) shared by a module's cases: every case leaves it unchanged."""
    with ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp / 'data' / 'openwham.db'}"
        else:
            url = stack.enter_context(postgres_database())
        gen = make_server(tmp, url)
        stack.callback(gen.close)
        yield build_world(next(gen), make_repo(tmp / "widgets"), tmp)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The shared SQLite world (like ``server``)."""
    with module_world(tmp_path_factory.mktemp("bad"), "sqlite") as w:
        yield w


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def any_world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """The shared world, once on SQLite and once on PostgreSQL (like ``any_server``)."""
    with module_world(tmp_path_factory.mktemp(f"bad-{request.param}"), request.param) as w:
        yield w


@pytest.fixture
def fresh_world(any_server: Server, repo: Path, tmp_path: Path) -> World:
    """A world of its own, for tests that may store things (SQLite and PostgreSQL)."""
    return build_world(any_server, repo, tmp_path)


def row_counts(server: Server) -> dict[str, int]:
    with server.app_state.db.session() as s:
        return {
            t.name: int(s.scalar(select(func.count()).select_from(t)) or 0)
            for t in Base.metadata.sorted_tables
        }


def rows(server: Server) -> dict[str, list[str]]:
    with server.app_state.db.session() as s:
        return {
            t.name: sorted(repr(tuple(r)) for r in s.execute(select(t)))
            for t in Base.metadata.sorted_tables
        }


# --------------------------------------------------------------------------- cases

NO_BODY = object()


@dataclass(frozen=True)
class Case:
    """One bad request. ``json``/``path``/``params`` may be callables of the world."""

    method: str
    path: str | Callable[[World], str]
    json: Any = NO_BODY
    content: bytes | Callable[[World], Any] | None = None  # bytes or an iterator of them
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] | Callable[[World], dict[str, Any]] | None = None
    status: int | None = 400
    detail: str | None = None  # exact message
    contains: str | None = None  # substring of the message (case-insensitive)

    def send(self, w: World) -> httpx.Response:
        path = self.path(w) if callable(self.path) else self.path
        kw: dict[str, Any] = {"headers": dict(self.headers)}
        if self.json is not NO_BODY:
            kw["content"] = dumps(self.json(w) if callable(self.json) else self.json)
            kw["headers"].setdefault("content-type", "application/json")
        if self.content is not None:
            kw["content"] = self.content(w) if callable(self.content) else self.content
        if self.params is not None:
            kw["params"] = self.params(w) if callable(self.params) else self.params
        return w.api.request(self.method, path, **kw)


def dumps(value: Any) -> bytes:
    """JSON as Python writes it: unpaired surrogates and NaN escaped (httpx refuses both)."""
    return json.dumps(value).encode()


def check(w: World, case: Case, *, compare: Callable[[World], Any] | None = None) -> None:
    """Send ``case``; assert a clear 4xx and that no row (and no ``compare`` view) changed."""
    before = rows(w.server)
    counts = row_counts(w.server)
    seen = compare(w) if compare else None
    r = case.send(w)
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if case.status is not None:
        assert r.status_code == case.status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict), body
    detail = body.get("detail")
    assert isinstance(detail, str) and detail.strip(), body
    if case.detail is not None:
        assert detail == case.detail
    if case.contains is not None:
        assert case.contains.lower() in detail.lower(), detail
    declared = declared_statuses(w, r.request.method, r.request.url.path)
    assert declared is None or str(r.status_code) in declared, (
        f"{r.status_code} is not in /openapi.json for {r.request.method} {r.request.url.path}:"
        f" {sorted(declared)}"
    )
    assert row_counts(w.server) == counts
    assert rows(w.server) == before
    if compare:
        assert compare(w) == seen


_OPERATIONS: dict[int, list[tuple[re.Pattern[str], str, set[str]]]] = {}


def declared_statuses(w: World, method: str, path: str) -> set[str] | None:
    """The statuses ``/openapi.json`` declares for the operation that serves ``path`` (None
    when no operation does: the router's own 404). Literal paths win over templates."""
    key = id(w.server.app_state)
    if key not in _OPERATIONS:
        doc = w.api.client.get("/openapi.json").json()
        table = []
        for template, ops in doc["paths"].items():
            pattern = re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template)) + "$")
            for name, op in ops.items():
                table.append((pattern, name.upper(), set(op["responses"])))
        table.sort(key=lambda row: row[0].pattern.count("[^/]+"))
        _OPERATIONS[key] = table
    for pattern, name, statuses in _OPERATIONS[key]:
        if name == method and pattern.match(path):
            return statuses
    return None


def P(case: Case, id: str) -> Any:
    return pytest.param(case, id=id)


# --------------------------------------------------------------------------- create task


def text(value: Any = "Fix the failing test") -> dict[str, Any]:
    return {"content_type": "text", "text": value}


def message(*fragments: Any, **over: Any) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": list(fragments or [text()]), **over}


def new(w: World, **spec: Any) -> dict[str, Any]:
    return {"environment_id": w.env, **spec}


def create(build: Callable[[World], dict[str, Any]], **kw: Any) -> Case:
    return Case("POST", "tasks", json=build, **kw)


def items(*its: Any, **top: Any) -> Callable[[World], dict[str, Any]]:
    """A new_task body with these input items (and extra top-level keys)."""
    return lambda w: {"new_task": new(w), "input_items": list(its), **top}


def spec(**fields: Any) -> Callable[[World], dict[str, Any]]:
    """A new_task body whose new_task has these fields added or replaced."""
    return lambda w: {"new_task": new(w, **fields), "input_items": [message()]}


def follow(**fields: Any) -> Callable[[World], dict[str, Any]]:
    """A follow_up body; values that are world attribute names are looked up."""

    def build(w: World) -> dict[str, Any]:
        body = {
            k: getattr(w, v) if isinstance(v, str) and hasattr(w, v) else v
            for k, v in fields.items()
        }
        return {"follow_up": body, "input_items": [message()]}

    return build


BIG_PROMPT = "x" * (MAX_PROMPT_CHARS + 1)
DIFF = (
    "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-hi\n+ho\n"
)
BIG_DIFF = DIFF + "+" * (MAX_PATCH_BYTES + 1) + "\n"


def patch_item(diff: Any) -> dict[str, Any]:
    return {"type": "pre_apply_patch", "output_diff": {"diff": diff}}


BRANCH_MESSAGES = {"nul": "NUL", "lone_surrogate": "surrogate"}  # refused before parsing
MISSING = "Missing input_items"
NO_MODE = "Must specify one of: follow_up, new_task, review_fix"

CREATE_CASES = [
    # the real server's messages, word for word
    P(create(lambda w: {"new_task": new(w)}, detail=MISSING), "no_input_items"),
    P(
        create(lambda w: {"new_task": new(w), "input_items": None}, detail=MISSING),
        "input_items_null",
    ),
    P(create(lambda w: {}, detail=MISSING), "empty_object"),
    P(create(lambda w: {"input_items": [message()]}, detail=NO_MODE), "no_mode"),
    P(
        create(lambda w: {"input_items": [message()], "new_task": None}, detail=NO_MODE),
        "mode_null",
    ),
    P(
        create(lambda w: {"input_items": [message()], "metadata": {}}, detail=NO_MODE),
        "only_metadata",
    ),
    P(
        create(
            lambda w: {"input_items": [message()], "new_task": True},
            detail="new_task should be object/dict",
        ),
        "new_task_true",
    ),
    P(
        create(
            lambda w: {"input_items": [message()], "new_task": w.env},
            detail="new_task should be object/dict",
        ),
        "new_task_string",
    ),
    P(
        create(
            lambda w: {"input_items": [message()], "new_task": [w.env]},
            detail="new_task should be object/dict",
        ),
        "new_task_list",
    ),
    P(
        create(
            lambda w: {"input_items": [message()], "new_task": 1},
            detail="new_task should be object/dict",
        ),
        "new_task_number",
    ),
    P(
        create(
            lambda w: {"input_items": [message()], "follow_up": "x"},
            detail="follow_up should be object/dict",
        ),
        "follow_up_string",
    ),
    P(
        create(
            lambda w: {"input_items": [message()], "review_fix": 1},
            detail="review_fix should be object/dict",
        ),
        "review_fix_number",
    ),
    # body not a JSON object
    P(
        Case("POST", "tasks", content=b"{not json", headers={"content-type": "application/json"}),
        "body_not_json",
    ),
    P(
        Case(
            "POST",
            "tasks",
            content=b'{"input_items": [',
            headers={"content-type": "application/json"},
        ),
        "body_truncated_json",
    ),
    P(
        Case(
            "POST", "tasks", content=b"\xff\xfe\x00", headers={"content-type": "application/json"}
        ),
        "body_not_utf8",
    ),
    P(
        Case("POST", "tasks", content=b"input_items=x", headers={"content-type": "text/plain"}),
        "body_text_plain",
    ),
    P(
        Case(
            "POST",
            "tasks",
            content=b"input_items=x",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        "body_form",
    ),
    P(Case("POST", "tasks"), "body_empty"),
    P(create(lambda w: [{"new_task": new(w), "input_items": [message()]}]), "body_array"),
    P(create(lambda w: "new_task"), "body_string"),
    P(create(lambda w: 42), "body_number"),
    P(create(lambda w: None), "body_null"),
    P(create(lambda w: True), "body_true"),
    P(
        Case(
            "POST",
            "tasks",
            content=b"[" * 100_000 + b"]" * 100_000,
            headers={"content-type": "application/json"},
        ),
        "body_deeply_nested",
    ),
    P(
        Case(
            "POST",
            "tasks",
            content=b'{"input_items": ' + b"9" * 5000 + b"}",
            headers={"content-type": "application/json"},
        ),
        "body_huge_int_literal",
    ),
    # input_items and their items
    P(create(items(), contains="input_items"), "input_items_empty"),
    P(
        create(lambda w: {"new_task": new(w), "input_items": {"type": "message"}}, contains="list"),
        "input_items_object",
    ),
    P(
        create(lambda w: {"new_task": new(w), "input_items": "Fix it"}, contains="list"),
        "input_items_string",
    ),
    P(
        create(lambda w: {"new_task": new(w), "input_items": 3}, contains="list"),
        "input_items_number",
    ),
    P(create(items(5)), "item_number"),
    P(create(items("Fix it")), "item_string"),
    P(create(items(None)), "item_null"),
    P(create(items([message()])), "item_list"),
    P(create(items({"type": "image", "url": "http://x"}), contains="image"), "item_unknown_type"),
    P(create(items({"content": [text()]})), "item_no_type"),
    P(create(items({"type": 5, "content": [text()]})), "item_type_number"),
    P(create(items({"type": "message", "content": "Fix it"})), "message_content_string"),
    P(create(items({"type": "message", "content": {"text": "x"}})), "message_content_object"),
    P(create(items({"type": "message", "content": None})), "message_content_null"),
    P(create(items({"type": "message"}), contains="empty"), "message_no_content"),
    P(
        create(items(message({"content_type": "image", "url": "http://x"})), contains="empty"),
        "fragment_not_text",
    ),
    P(create(items(message(5))), "fragment_number"),
    P(create(items(message(None))), "fragment_null"),
    P(create(items(message(text(5)))), "fragment_text_number"),
    P(create(items(message(text(None)))), "fragment_text_null"),
    P(create(items(message(text(["a"])))), "fragment_text_list"),
    P(create(items(message(role="assistant")), contains="role"), "message_role_assistant"),
    P(create(items(message(role=7))), "message_role_number"),
    P(create(items(*[message()] * 51), contains="50"), "too_many_items"),
    # prompt
    P(create(items(message(text(""))), contains="empty"), "prompt_empty"),
    P(create(items(message(text("  \n\t "))), contains="empty"), "prompt_whitespace"),
    P(create(items(message(text("   "), "\n")), contains="empty"), "prompt_whitespace_fragments"),
    P(create(items(message(text(BIG_PROMPT))), status=413), "prompt_too_long"),
    P(
        create(items(message(text(BIG_PROMPT[:150_000]), text(BIG_PROMPT[:60_000]))), status=413),
        "prompt_too_long_in_parts",
    ),
    P(create(items(message(text("bad\x00nul"))), contains="NUL"), "prompt_nul"),
    P(
        create(items(message(text("lone \ud800 surrogate"))), contains="surrogate"),
        "prompt_lone_surrogate",
    ),
    # pre_apply_patch
    P(create(items(message(), patch_item(BIG_DIFF)), status=413), "patch_too_large"),
    P(create(items(message(), patch_item("just some text")), contains="diff"), "patch_not_a_diff"),
    P(create(items(message(), patch_item("")), contains="diff"), "patch_empty"),
    P(create(items(message(), patch_item(5))), "patch_number"),
    P(create(items(message(), patch_item(None))), "patch_null"),
    P(create(items(message(), {"type": "pre_apply_patch"}), contains="diff"), "patch_missing"),
    P(
        create(items(message(), {"type": "pre_apply_patch", "output_diff": "diff"})),
        "patch_output_diff_string",
    ),
    P(create(items(message(), patch_item(DIFF), patch_item(DIFF)), contains="one"), "patch_twice"),
    P(create(items(patch_item(DIFF)), contains="empty"), "patch_without_prompt"),
    # best_of_n / metadata
    P(create(items(message(), metadata={"best_of_n": 0}), contains="best_of_n"), "best_of_n_0"),
    P(create(items(message(), metadata={"best_of_n": 5}), contains="best_of_n"), "best_of_n_5"),
    P(
        create(items(message(), metadata={"best_of_n": -1}), contains="best_of_n"),
        "best_of_n_negative",
    ),
    P(
        create(items(message(), metadata={"best_of_n": "2"}), contains="best_of_n"),
        "best_of_n_string",
    ),
    P(
        create(items(message(), metadata={"best_of_n": True}), contains="best_of_n"),
        "best_of_n_true",
    ),
    P(
        create(items(message(), metadata={"best_of_n": 1.5}), contains="best_of_n"),
        "best_of_n_float",
    ),
    P(
        create(items(message(), metadata={"best_of_n": 2.0}), contains="best_of_n"),
        "best_of_n_float_whole",
    ),
    P(
        create(items(message(), metadata={"best_of_n": 10**30}), contains="best_of_n"),
        "best_of_n_huge",
    ),
    P(
        create(items(message(), metadata={"best_of_n": [2]}), contains="best_of_n"),
        "best_of_n_list",
    ),
    P(create(items(message(), metadata="best_of_n=2"), contains="metadata"), "metadata_string"),
    P(create(items(message(), metadata=[1]), contains="metadata"), "metadata_list"),
    # environment
    P(create(spec(environment_id="0" * 32), status=404), "env_unknown"),
    P(create(spec(environment_id="acme/widgets"), status=404), "env_owner_repo"),
    P(
        create(
            lambda w: {"new_task": new(w, environment_id=w.other_env), "input_items": [message()]},
            status=404,
        ),
        "env_foreign",
    ),
    P(create(spec(environment_id="e" * 5000), status=404), "env_very_long"),
    P(create(spec(environment_id="bad\x00id"), contains="NUL"), "env_nul"),
    P(create(spec(environment_id="")), "env_empty"),
    P(create(spec(environment_id=None)), "env_null"),
    P(create(spec(environment_id=5)), "env_number"),
    P(create(spec(environment_id={"id": "x"})), "env_object"),
    P(create(lambda w: {"new_task": {}, "input_items": [message()]}), "env_missing"),
    # branch, model, effort, qa mode
    *[
        P(create(spec(branch=b), contains=BRANCH_MESSAGES.get(name, "branch")), f"branch_{name}")
        for name, b in [
            ("dotdot", "feature..x"),
            ("leading_dash", "-rf"),
            ("space", "my branch"),
            ("lock", "main.lock"),
            ("at", "@"),
            ("at_brace", "main@{1}"),
            ("trailing_slash", "main/"),
            ("double_slash", "a//b"),
            ("tilde", "main~1"),
            ("caret", "main^"),
            ("colon", "a:b"),
            ("question", "a?"),
            ("star", "a*"),
            ("bracket", "a[b"),
            ("backslash", "a\\b"),
            ("control", "a\x01b"),
            ("nul", "a\x00b"),
            ("newline", "main\n"),
            ("dot_component", "a/.b"),
            ("trailing_dot", "main."),
            ("too_long", "b" * 256),
            ("lone_surrogate", "main\udc80"),
        ]
    ],
    P(create(spec(branch=5)), "branch_number"),
    P(create(spec(branch=["main"])), "branch_list"),
    # a valid name that is not a branch of the repository: refused at submit, not later
    P(create(spec(branch="nope"), contains="Branch 'nope' not found in "), "branch_missing"),
    P(
        create(spec(branch="feature/x"), contains="Branch 'feature/x' not found in "),
        "branch_missing_nested",
    ),
    P(create(spec(branch="HEAD"), contains="Branch 'HEAD' not found in "), "branch_head_ref"),
    P(create(spec(model=""), contains="model"), "model_empty"),
    P(create(spec(model="gpt 5"), contains="model"), "model_space"),
    P(create(spec(model="m" * 300), contains="model"), "model_too_long"),
    P(create(spec(model=5)), "model_number"),
    P(create(spec(model="$(rm -rf /)"), contains="model"), "model_shell"),
    P(create(spec(reasoning_effort="extreme"), contains="reasoning_effort"), "effort_unknown"),
    P(create(spec(reasoning_effort=3)), "effort_number"),
    P(create(spec(reasoning_effort="")), "effort_empty"),
    P(create(spec(run_environment_in_qa_mode="yes")), "qa_mode_string"),
    P(create(spec(run_environment_in_qa_mode=1)), "qa_mode_number"),
    # mode combinations
    P(
        create(
            lambda w: {
                "new_task": new(w),
                "follow_up": {"task_id": w.task, "turn_id": w.turn},
                "input_items": [message()],
            },
            contains="one of",
        ),
        "new_task_and_follow_up",
    ),
    P(
        create(
            lambda w: {"new_task": new(w), "review_fix": {}, "input_items": [message()]},
            contains="one of",
        ),
        "new_task_and_review_fix",
    ),
    P(
        create(
            lambda w: {"review_fix": {"task_id": w.task}, "input_items": [message()]},
            contains="review_fix",
        ),
        "review_fix",
    ),
    # follow_up
    P(create(follow(turn_id="turn"), contains="task_id"), "follow_up_no_task_id"),
    P(create(follow(task_id="task"), contains="turn_id"), "follow_up_no_turn_id"),
    P(create(follow(), contains="task_id"), "follow_up_empty"),
    P(create(follow(task_id=5, turn_id="turn")), "follow_up_task_id_number"),
    P(create(follow(task_id="task", turn_id=["turn"])), "follow_up_turn_id_list"),
    P(
        create(follow(task_id="task_e_" + "0" * 32, turn_id="turn"), status=404),
        "follow_up_unknown_task",
    ),
    P(
        create(follow(task_id="task", turn_id="task_e_x~assttrn_e_0"), status=404),
        "follow_up_unknown_turn",
    ),
    P(create(follow(task_id="task", turn_id="turn2"), status=404), "follow_up_turn_of_other_task"),
    P(
        create(follow(task_id="other_task", turn_id="other_turn"), status=404),
        "follow_up_foreign_task",
    ),
    P(create(follow(task_id="task", turn_id="other_turn"), status=404), "follow_up_foreign_turn"),
    P(
        create(follow(task_id="task", turn_id="user_turn"), contains="assistant"),
        "follow_up_user_turn",
    ),
    P(create(follow(task_id="task", turn_id="pending_turn"), status=409), "follow_up_pending_turn"),
    P(
        create(follow(task_id="task", previous_turn_id="user_turn"), contains="assistant"),
        "follow_up_alias_user_turn",
    ),
    P(
        create(follow(task_id="t" * 5000, turn_id="turn"), status=404),
        "follow_up_very_long_task_id",
    ),
    P(
        create(follow(task_id="task", turn_id="u" * 5000), status=404),
        "follow_up_very_long_turn_id",
    ),
    P(create(follow(task_id="task\x00", turn_id="turn"), contains="NUL"), "follow_up_nul_task_id"),
    P(
        create(
            lambda w: {
                "follow_up": {"task_id": w.task, "turn_id": w.turn},
                "input_items": [message(text(""))],
            },
            contains="empty",
        ),
        "follow_up_empty_prompt",
    ),
    P(
        create(
            lambda w: {
                "follow_up": {"task_id": w.task, "turn_id": w.turn},
                "input_items": [message()],
                "metadata": {"best_of_n": 9},
            },
            contains="best_of_n",
        ),
        "follow_up_best_of_n_9",
    ),
    P(
        create(
            lambda w: {
                "follow_up": {"task_id": w.task, "turn_id": w.turn, "model": "a b"},
                "input_items": [message()],
            },
            contains="model",
        ),
        "follow_up_bad_model",
    ),
    # Codex protocol operation shapes sent to the wrong endpoint
    P(
        create(lambda w: {"UserTurn": {"items": [{"type": "text", "text": "hi"}]}}, detail=MISSING),
        "codex_op_shape",
    ),
]


@pytest.mark.parametrize("case", CREATE_CASES)
def test_create_task_bad_input(any_world: World, case: Case) -> None:
    check(any_world, case)


def test_body_over_request_limit_is_413(world: World) -> None:
    blob = b'{"input_items": "' + b"a" * (MAX_BODY_BYTES + 1) + b'"}'
    check(
        world,
        Case(
            "POST", "tasks", content=blob, headers={"content-type": "application/json"}, status=413
        ),
    )
    # without a Content-Length (chunked), the limit applies while the body streams in
    chunks = [b'{"input_items": "'] + [b"a" * (1024 * 1024)] * 13 + [b'"}']
    check(
        world,
        Case(
            "POST",
            "tasks",
            content=lambda w: iter(chunks),
            headers={"content-type": "application/json"},
            status=413,
        ),
    )
    check(
        world,
        Case(
            "POST",
            "environments",
            content=blob,
            headers={"content-type": "application/json"},
            status=413,
        ),
    )


def test_task_limits_accept_the_maximum(server: Server, repo: Path) -> None:
    """The limits are exact: the largest allowed prompt and patch are accepted."""
    api = server.api
    body = {
        "new_task": {"environment_id": api.create_env(repo)["id"]},
        "input_items": [message(text("y" * MAX_PROMPT_CHARS)), patch_item(DIFF)],
        "metadata": {"best_of_n": 4},
    }
    r = api.post("tasks", json=body)
    assert r.status_code == 200, r.text[:300]


# --------------------------------------------------------------------------- ids, lists, queries


def b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def listing(params: Any, **kw: Any) -> Case:
    return Case("GET", "tasks/list", params=params, **kw)


LIST_CASES = [
    P(listing({"cursor": "garbage!!"}, contains="cursor"), "cursor_garbage"),
    P(listing({"cursor": "+RID:~abc#RT:1#TRC:5"}, contains="cursor"), "cursor_cosmos_style"),
    P(listing({"cursor": b64({"a": 1})}, contains="cursor"), "cursor_b64_object"),
    P(listing({"cursor": b64([1])}, contains="cursor"), "cursor_b64_short_list"),
    P(listing({"cursor": b64([1, 2, 3])}, contains="cursor"), "cursor_b64_long_list"),
    P(listing({"cursor": b64(["x", "task"])}, contains="cursor"), "cursor_b64_wrong_types"),
    P(listing({"cursor": b64([True, "task"])}, contains="cursor"), "cursor_b64_bool"),
    P(listing({"cursor": b64([1.0, 5])}, contains="cursor"), "cursor_b64_id_number"),
    P(listing({"cursor": b64("text")}, contains="cursor"), "cursor_b64_string"),
    P(listing({"cursor": b64(b"\xff\xfe\xfd")}, contains="cursor"), "cursor_b64_not_utf8"),
    P(listing({"cursor": b64(b'[1e999999, "x"]')}, contains="cursor"), "cursor_b64_infinite"),
    P(listing({"cursor": b64(b'[NaN, "x"]')}, contains="cursor"), "cursor_b64_nan"),
    P(listing({"cursor": b64([1.0, "x\u0000"])}, contains="cursor"), "cursor_b64_nul_id"),
    P(listing({"cursor": "A"}, contains="cursor"), "cursor_one_char"),
    P(listing({"cursor": "x" * 10_000}, contains="cursor"), "cursor_very_long"),
    P(listing({"limit": 0}, contains="limit"), "limit_0"),
    P(listing({"limit": 101}, contains="limit"), "limit_101"),
    P(listing({"limit": -5}, contains="limit"), "limit_negative"),
    P(listing({"limit": "abc"}, contains="limit"), "limit_abc"),
    P(listing({"limit": "1.5"}, contains="limit"), "limit_float"),
    P(listing({"limit": "9" * 40}, contains="limit"), "limit_huge"),
    P(listing({"limit": ""}, contains="limit"), "limit_empty"),
    P(listing({"task_filter": "bogus"}, contains="task_filter"), "task_filter_bogus"),
    P(listing({"task_filter": "ALL"}, contains="task_filter"), "task_filter_case"),
    P(
        Case("GET", "tasks", params={"cursor": "garbage!!"}, contains="cursor"),
        "feed_cursor_garbage",
    ),
    P(Case("GET", "tasks", params={"limit": 0}, contains="limit"), "feed_limit_0"),
    P(
        Case("GET", "tasks", params={"task_filter": "x"}, contains="task_filter"),
        "feed_task_filter_bogus",
    ),
]

ODD_IDS = {
    "unknown": "task_e_" + "0" * 32,
    "very_long": "task_e_" + "a" * 10_000,
    "quote": "task_e_' OR '1'='1",
    "percent_nul": "task_e_%00",
    "unicode": "task_e_☃",
    "space": "task%20e",
    "dotdot": "..%2F..%2Fetc",
    "semicolon": "task_e_1;DROP TABLE tasks",
    "lone_surrogate_escape": "%ED%A0%80",
    "backslash": "task\\e",
}

TASK_ROUTES = [
    ("GET", "tasks/{id}"),
    ("DELETE", "tasks/{id}"),
    ("POST", "tasks/{id}/archive"),
    ("POST", "tasks/{id}/unarchive"),
    ("POST", "tasks/{id}/mark_read"),
    ("POST", "tasks/{id}/cancel"),
    ("GET", "tasks/{id}/turns"),
]
TURN_ROUTES = [
    ("GET", "tasks/{task}/turns/{id}"),
    ("GET", "tasks/{task}/turns/{id}/sibling_turns"),
    ("POST", "tasks/{task}/turns/{id}/viewed"),
]
ENV_ROUTES = [
    ("GET", "environments/{id}"),
    ("GET", "environments/{id}/with-creator-and-machine"),
    ("PATCH", "environments/{id}"),
    ("DELETE", "environments/{id}"),
    ("POST", "environments/{id}/reset-cache"),
]


def _id_case(method: str, template: str, bad: str) -> Case:
    body: Any = {"label": "renamed"} if method == "PATCH" else NO_BODY
    return Case(
        method,
        lambda w: template.format(id=bad, task=w.task),
        json=body,
        status=400 if "%00" in bad else 404,
    )


ID_CASES = [
    P(_id_case(method, template, bad), f"{method}_{template.replace('/', '_')}_{name}")
    for method, template in TASK_ROUTES + TURN_ROUTES + ENV_ROUTES
    for name, bad in ODD_IDS.items()
]

ACTION_CASES = [
    P(Case("GET", lambda w: f"tasks/{w.task}/turns/{w.turn2}", status=404), "turn_of_other_task"),
    P(
        Case("POST", lambda w: f"tasks/{w.task}/turns/{w.turn2}/viewed", status=404),
        "viewed_turn_of_other_task",
    ),
    P(
        Case(
            "GET",
            lambda w: f"tasks/{w.task}/turns/{w.user_turn}/sibling_turns",
            contains="assistant",
        ),
        "siblings_of_user_turn",
    ),
]


@pytest.mark.parametrize("case", LIST_CASES + ID_CASES + ACTION_CASES)
def test_ids_and_queries_bad_input(world: World, case: Case) -> None:
    check(world, case)


NUL_CASES = [
    P(Case("GET", "tasks/task_e_%00", contains="NUL"), "task_path_nul"),
    P(Case("GET", lambda w: f"tasks/{w.task}/turns/x%00", contains="NUL"), "turn_path_nul"),
    P(Case("PATCH", "environments/%00", json={"label": "x"}, contains="NUL"), "env_path_nul"),
    P(listing({"environment_id": "bad\x00id"}, contains="NUL"), "environment_filter_nul"),
    P(listing({"cursor": b64([1.0, "x\u0000"])}, contains="cursor"), "cursor_nul_id"),
    P(
        Case("POST", "environments", json=lambda w: {"label": "a\x00b", "repos": [str(w.repo)]}),
        "env_label_nul",
    ),
    P(
        Case("POST", "environments", json=lambda w: {"label": "a\ud800b", "repos": [str(w.repo)]}),
        "env_label_lone_surrogate",
    ),
    P(
        Case(
            "POST", "environments", json=lambda w: {"label": "x", "repos": [str(w.repo) + "\x00"]}
        ),
        "env_repo_nul",
    ),
    P(
        Case(
            "POST",
            "environments",
            json=lambda w: {"label": "x", "repos": [str(w.repo)], "secrets": {"A": "\ud800"}},
        ),
        "env_secret_lone_surrogate",
    ),
    P(
        Case("PATCH", lambda w: f"environments/{w.env}", json={"label": "a\x00b"}),
        "env_patch_label_nul",
    ),
    P(
        Case("PATCH", "settings/user", json={"custom_instructions": "a\ud800"}),
        "settings_lone_surrogate",
    ),
]


@pytest.mark.parametrize("case", NUL_CASES)
def test_nul_and_surrogates_on_both_databases(any_world: World, case: Case) -> None:
    """Text no database can store (NUL, unpaired surrogates) is refused up front."""
    check(any_world, case)


# --------------------------------------------------------------------------- environments


def env_body(**over: Any) -> Callable[[World], dict[str, Any]]:
    def build(w: World) -> dict[str, Any]:
        body: dict[str, Any] = {"label": "acme/widgets", "repos": [str(w.repo)]}
        for key, value in over.items():
            if value is DROP:
                body.pop(key, None)
            else:
                body[key] = value(w) if callable(value) else value
        return body

    return build


DROP = object()


def env_create(build: Callable[[World], Any], **kw: Any) -> Case:
    return Case("POST", "environments", json=build, **kw)


def repos(*specs: Any) -> Callable[[World], list[Any]]:
    """Repository entries; callables get the world (for paths made at run time)."""
    return lambda w: [s(w) if callable(s) else s for s in specs]


def _inside_data_dir(w: World) -> str:
    path = w.data_dir / "mirrors" / "evil"
    path.mkdir(parents=True, exist_ok=True)
    git("init", "-q", cwd=path)
    return str(path)


def _symlink_to_data_dir(w: World) -> str:
    link = w.tmp / "innocent"
    if not link.exists():
        link.symlink_to(w.data_dir)
    return str(link)


def _a_file(w: World) -> str:
    path = w.tmp / "plain-file"
    path.write_text("not a repo")
    return str(path)


BAD_REPOS = {
    "relative_path": "widgets",
    "dot_relative": "./widgets",
    "nonexistent_path": "/nonexistent/repo/path",
    "ftp": "ftp://example.com/repo.git",
    "no_host": "https:///repo.git",
    "bare_scheme": "https://",
    "javascript": "javascript:alert(1)",
    "ext_transport": "ext::sh -c touch% /tmp/pwned",
    "empty": "",
    "whitespace": "   ",
    "newline": "https://example.com/a.git\nhttps://evil",
    "file_nonexistent": "file:///nonexistent/repo",
    "data_dir": lambda w: str(w.data_dir),
    "inside_data_dir": _inside_data_dir,
    "dotdot_into_data_dir": lambda w: str(w.tmp / "widgets" / ".." / "data" / "keys"),
    "file_url_data_dir": lambda w: "file://" + str(w.data_dir),
    "symlink_to_data_dir": _symlink_to_data_dir,
    "a_file": _a_file,
    "very_long": "https://example.com/" + "a" * 3000,
    "number": 5,
    "null": None,
    "list": ["https://example.com/a.git"],
    "spec_no_url": {"name": "acme/widgets"},
    "spec_empty_url": {"url": ""},
    "spec_unknown_field": {"url": "https://example.com/a.git", "token": "x"},
    "spec_bad_name": {"url": "https://example.com/a.git", "name": "not a name"},
    "spec_bad_branch": {"url": "https://example.com/a.git", "default_branch": "a..b"},
    "spec_url_number": {"url": 5},
}

ENV_CREATE_CASES = [
    P(env_create(env_body(bogus=1), contains="bogus"), "unknown_field"),
    P(
        env_create(env_body(secret_values={"A": "b"}), contains="secret_values"),
        "unknown_field_near_miss",
    ),
    P(env_create(env_body(label=DROP)), "no_label"),
    P(env_create(env_body(label="")), "label_empty"),
    P(env_create(env_body(label="   "), contains="label"), "label_whitespace"),
    P(env_create(env_body(label="l" * 201)), "label_too_long"),
    P(env_create(env_body(label=5)), "label_number"),
    P(env_create(env_body(label=None)), "label_null"),
    P(env_create(env_body(label=["x"])), "label_list"),
    P(env_create(env_body(repos=DROP)), "no_repos"),
    P(env_create(env_body(repos=[])), "repos_empty"),
    P(env_create(env_body(repos=None)), "repos_null"),
    P(env_create(env_body(repos=lambda w: str(w.repo))), "repos_string"),
    P(env_create(env_body(repos=lambda w: {"url": str(w.repo)})), "repos_object"),
    P(env_create(env_body(repos=lambda w: [str(w.repo)] * 2), contains="twice"), "repos_duplicate"),
    P(
        env_create(env_body(repos=lambda w: [f"https://example.com/r{i}.git" for i in range(11)])),
        "repos_too_many",
    ),
    *[P(env_create(env_body(repos=repos(bad))), f"repo_{name}") for name, bad in BAD_REPOS.items()],
    P(env_create(env_body(description=5)), "description_number"),
    P(env_create(env_body(setup=5)), "setup_number"),
    P(env_create(env_body(setup=[1, 2])), "setup_list_of_numbers"),
    P(env_create(env_body(setup="x" * (256 * 1024 + 1)), contains="setup"), "setup_too_long"),
    P(env_create(env_body(maintenance_setup={"a": 1})), "maintenance_setup_object"),
    P(env_create(env_body(env_vars=[])), "env_vars_list"),
    P(env_create(env_body(env_vars="A=1")), "env_vars_string"),
    P(env_create(env_body(env_vars={"A": 5})), "env_var_value_number"),
    P(env_create(env_body(env_vars={"A": None})), "env_var_value_null"),
    P(env_create(env_body(env_vars={"A": "x" * (64 * 1024 + 1)})), "env_var_value_too_long"),
    P(env_create(env_body(env_vars={f"V{i}": "x" for i in range(201)})), "env_vars_too_many"),
    *[
        P(env_create(env_body(env_vars={name: "x"}), contains="name"), f"env_var_name_{label}")
        for label, name in [
            ("digit_first", "1ABC"),
            ("dash", "A-B"),
            ("empty", ""),
            ("space", "A B"),
            ("equals", "A=B"),
            ("dollar", "$A"),
            ("unicode", "ÄPFEL"),
            ("too_long", "A" * 129),
            ("newline", "A\nB"),
        ]
    ],
    P(env_create(env_body(secrets={"1BAD": "x"}), contains="name"), "secret_name_digit_first"),
    P(env_create(env_body(secrets={"A": 5})), "secret_value_number"),
    P(env_create(env_body(secrets={"A": None})), "secret_value_null"),
    P(env_create(env_body(secrets=["A"])), "secrets_list"),
    P(
        env_create(env_body(agent_network_access={"mode": "sometimes"}), contains="mode"),
        "network_mode_bogus",
    ),
    P(
        env_create(env_body(agent_network_access={"mode": "ON"}), contains="mode"),
        "network_mode_case",
    ),
    P(env_create(env_body(agent_network_access={"mode": 1})), "network_mode_number"),
    P(env_create(env_body(agent_network_access={"mode": None})), "network_mode_null"),
    P(
        env_create(
            env_body(agent_network_access={"mode": "on", "preset_allowlist": "everything"}),
            contains="preset",
        ),
        "network_preset_bogus",
    ),
    P(
        env_create(env_body(agent_network_access={"mode": "on", "allowlist_domains": ["a.com"]})),
        "network_domains_list",
    ),
    P(
        env_create(env_body(agent_network_access={"mode": "on", "safe_methods_only": "sure"})),
        "network_safe_methods_string",
    ),
    P(env_create(env_body(agent_network_access="on")), "network_string"),
    P(
        env_create(env_body(share_settings="public"), contains="share_settings"),
        "share_settings_bogus",
    ),
    P(env_create(env_body(machine_id="gpu-xl"), contains="machine"), "machine_unknown"),
    P(env_create(env_body(is_pinned="maybe")), "is_pinned_string"),
    P(
        env_create(env_body(cache_settings={"post_setup_cache_enabled": "x"})),
        "cache_settings_string",
    ),
    P(
        env_create(env_body(workspace_dir="relative/dir"), contains="workspace_dir"),
        "workspace_dir_relative",
    ),
    P(
        env_create(env_body(workspace_dir="/workspace/../etc"), contains="workspace_dir"),
        "workspace_dir_dotdot",
    ),
    P(env_create(env_body(workspace_dir=5)), "workspace_dir_number"),
    P(env_create(lambda w: [{"label": "x", "repos": [str(w.repo)]}]), "body_array"),
    P(env_create(lambda w: "x"), "body_string"),
    P(env_create(lambda w: None), "body_null"),
    P(
        Case("POST", "environments", content=b"{bad", headers={"content-type": "application/json"}),
        "body_not_json",
    ),
    P(Case("POST", "environments"), "body_empty"),
]


@pytest.mark.parametrize("case", ENV_CREATE_CASES)
def test_environment_create_bad_input(world: World, case: Case) -> None:
    check(world, case)


def env_patch(body: Any, **kw: Any) -> Case:
    return Case("PATCH", lambda w: f"environments/{w.env}", json=body, **kw)


ENV_PATCH_CASES = [
    P(env_patch({"bogus": 1}, contains="bogus"), "unknown_field"),
    P(env_patch({"id": "0" * 32}, contains="id"), "id_field"),
    P(env_patch({"label": ""}), "label_empty"),
    P(env_patch({"label": "  "}, contains="label"), "label_whitespace"),
    P(env_patch({"label": None}, contains="label"), "label_null"),
    P(env_patch({"label": 5}), "label_number"),
    P(env_patch({"label": "l" * 201}), "label_too_long"),
    P(env_patch({"repos": []}), "repos_empty"),
    P(env_patch({"repos": None}, contains="repositor"), "repos_null"),
    P(env_patch({"repos": ["ftp://example.com/a.git"]}), "repos_ftp"),
    P(env_patch({"repos": ["relative"]}), "repos_relative"),
    P(env_patch({"repos": ["/nonexistent/path"]}), "repos_nonexistent"),
    P(env_patch(lambda w: {"repos": [str(w.data_dir)]}), "repos_data_dir"),
    P(env_patch(lambda w: {"repos": [_symlink_to_data_dir(w)]}), "repos_symlink_to_data_dir"),
    P(env_patch({"env_vars": {"BAD-NAME": "x"}}, contains="name"), "env_var_bad_name"),
    P(env_patch({"env_vars": {"A": 1}}), "env_var_number"),
    P(env_patch({"env_vars": "A=1"}), "env_vars_string"),
    P(env_patch({"secrets": {"BAD NAME": "x"}}, contains="name"), "secret_bad_name"),
    P(env_patch({"secrets": {"A": 1}}), "secret_number"),
    P(
        env_patch({"agent_network_access": {"mode": "partial"}}, contains="mode"),
        "network_mode_bogus",
    ),
    P(
        env_patch(
            {"agent_network_access": {"mode": "on", "preset_allowlist": "x"}}, contains="preset"
        ),
        "network_preset_bogus",
    ),
    P(env_patch({"share_settings": "public"}, contains="share_settings"), "share_settings_bogus"),
    P(env_patch({"machine_id": "gpu"}, contains="machine"), "machine_unknown"),
    P(env_patch({"is_pinned": "x"}), "is_pinned_string"),
    P(env_patch({"setup": 5}), "setup_number"),
    P(env_patch({"workspace_dir": "rel"}, contains="workspace_dir"), "workspace_dir_relative"),
    P(env_patch({"label": "fine", "repos": ["ftp://x/y"]}), "good_label_then_bad_repos"),
    P(env_patch({"label": "fine", "env_vars": {"1": "x"}}), "good_label_then_bad_var"),
    P(env_patch({"secrets": {"NEW": "x", "2BAD": "y"}}), "good_secret_then_bad_secret"),
    P(env_patch([{"label": "x"}]), "body_array"),
    P(env_patch("x"), "body_string"),
    P(
        Case(
            "PATCH",
            lambda w: f"environments/{w.env}",
            content=b"{",
            headers={"content-type": "application/json"},
        ),
        "body_not_json",
    ),
    P(
        Case(
            "PATCH", lambda w: f"environments/{w.other_env}", json={"label": "mine now"}, status=404
        ),
        "foreign_env",
    ),
    P(Case("PATCH", "environments/" + "0" * 32, json={"label": "x"}, status=404), "unknown_env"),
]


def _env_view(w: World) -> Any:
    return w.api.get(f"environments/{w.env}").json()


@pytest.mark.parametrize("case", ENV_PATCH_CASES)
def test_environment_patch_bad_input(world: World, case: Case) -> None:
    check(world, case, compare=_env_view)


# --------------------------------------------------------------------------- settings


def settings_patch(body: Any, **kw: Any) -> Case:
    return Case("PATCH", "settings/user", json=body, **kw)


SETTINGS_CASES = [
    P(settings_patch({"bogus": 1}, contains="bogus"), "unknown_field"),
    P(settings_patch({"user_id": "someone-else"}, contains="user_id"), "user_id_field"),
    P(
        settings_patch({"branch_format": "codex/{bogus}"}, contains="{bogus}"),
        "branch_format_unknown_token",
    ),
    P(
        settings_patch({"branch_format": "codex/{Feature}"}, contains="{Feature}"),
        "branch_format_token_case",
    ),
    P(settings_patch({"branch_format": "b" * 101}), "branch_format_too_long"),
    P(settings_patch({"branch_format": ""}), "branch_format_empty"),
    P(settings_patch({"branch_format": "a..b/{feature}"}), "branch_format_dotdot"),
    P(settings_patch({"branch_format": "has space/{feature}"}), "branch_format_space"),
    P(settings_patch({"branch_format": "-x/{feature}"}), "branch_format_leading_dash"),
    P(settings_patch({"branch_format": "x/{feature}.lock"}), "branch_format_lock"),
    P(settings_patch({"branch_format": "x/{feature}/"}), "branch_format_trailing_slash"),
    P(
        settings_patch({"branch_format": "codex/{feature"}, contains="{"),
        "branch_format_unmatched_brace",
    ),
    P(
        settings_patch({"branch_format": "codex/feature}"}, contains="}"),
        "branch_format_stray_brace",
    ),
    P(settings_patch({"branch_format": None}, contains="null"), "branch_format_null"),
    P(settings_patch({"branch_format": 5}), "branch_format_number"),
    P(settings_patch({"custom_instructions": "c" * 100_001}), "custom_instructions_too_long"),
    P(settings_patch({"custom_instructions": 5}), "custom_instructions_number"),
    P(
        settings_patch({"git_diff_mode": "sideways"}, contains="git_diff_mode"),
        "git_diff_mode_bogus",
    ),
    P(
        settings_patch({"code_review_preference": "sometimes"}, contains="code_review_preference"),
        "code_review_bogus",
    ),
    P(settings_patch({"alpha_opt_in": "maybe"}), "alpha_opt_in_string"),
    P(settings_patch({"alpha_opt_in": None}, contains="null"), "alpha_opt_in_null"),
    P(settings_patch({"git_diff_mode": "unified", "branch_format": "{nope}"}), "good_then_bad"),
    P(settings_patch([]), "body_array"),
    P(settings_patch("x"), "body_string"),
    P(
        Case(
            "PATCH", "settings/user", content=b"nope", headers={"content-type": "application/json"}
        ),
        "body_not_json",
    ),
]


def _settings_view(w: World) -> Any:
    return w.api.get("settings/user").json()


@pytest.mark.parametrize("case", SETTINGS_CASES)
def test_settings_patch_bad_input(world: World, case: Case) -> None:
    check(world, case, compare=_settings_view)


# --------------------------------------------------------------------------- fuzz


class Fuzzer:
    """Random JSON values, biased towards the shapes and values the server looks at."""

    def __init__(self, seed: int, w: World) -> None:
        self.r = random.Random(seed)
        self.strings = [
            "",
            " ",
            "\x00",
            "a\x00b",
            "\ud800",
            "x" * 300,
            "☃",
            "../..",
            "/",
            "{feature}",
            "main",
            "-rf",
            "message",
            "text",
            "user",
            "pre_apply_patch",
            DIFF,
            "on",
            "off",
            "all",
            w.env,
            w.task,
            w.turn,
            w.user_turn,
            w.other_env,
            w.other_task,
            str(w.repo),
            str(w.data_dir),
            "https://example.com/a.git",
            "ftp://x",
            "task_e_" + "0" * 32,
        ]
        self.keys = [
            "new_task",
            "follow_up",
            "review_fix",
            "input_items",
            "metadata",
            "best_of_n",
            "environment_id",
            "branch",
            "model",
            "reasoning_effort",
            "run_environment_in_qa_mode",
            "task_id",
            "turn_id",
            "previous_turn_id",
            "type",
            "role",
            "content",
            "content_type",
            "text",
            "output_diff",
            "diff",
            "label",
            "repos",
            "url",
            "name",
            "default_branch",
            "env_vars",
            "secrets",
            "setup",
            "agent_network_access",
            "mode",
            "preset_allowlist",
            "allowlist_domains",
            "share_settings",
            "workspace_dir",
            "machine_id",
            "is_pinned",
            "branch_format",
            "custom_instructions",
            "git_diff_mode",
            "A",
            "1BAD",
        ]

    def value(self, depth: int = 0) -> Any:
        r = self.r
        kind = r.choice(["str", "str", "int", "float", "bool", "null", "list", "dict", "dict"])
        if depth >= 4 and kind in ("list", "dict"):
            kind = "str"
        if kind == "str":
            return r.choice(self.strings)
        if kind == "int":
            return r.choice([0, 1, 2, 4, 5, -1, 10**20, r.randint(-1000, 1000)])
        if kind == "float":
            return r.choice([0.5, 1.0, -2.5, 1e308, r.random()])
        if kind == "bool":
            return r.choice([True, False])
        if kind == "null":
            return None
        if kind == "list":
            return [self.value(depth + 1) for _ in range(r.randint(0, 3))]
        return {r.choice(self.keys): self.value(depth + 1) for _ in range(r.randint(0, 4))}

    def mutate(self, base: Any, depth: int = 0) -> Any:
        """``base`` with some parts replaced, dropped or added."""
        r = self.r
        if r.random() < 0.15:
            return self.value(depth)
        if isinstance(base, dict):
            out = {}
            for k, v in base.items():
                roll = r.random()
                if roll < 0.1:
                    continue
                out[k] = self.mutate(v, depth + 1) if roll < 0.6 else v
            if r.random() < 0.3:
                out[r.choice(self.keys)] = self.value(depth + 1)
            return out
        if isinstance(base, list):
            out_list = [self.mutate(v, depth + 1) for v in base if r.random() > 0.1]
            if r.random() < 0.3:
                out_list.append(self.value(depth + 1))
            return out_list
        return base


def _task_shape(w: World) -> dict[str, Any]:
    return {
        "new_task": {
            "environment_id": w.env,
            "branch": "main",
            "run_environment_in_qa_mode": False,
        },
        "input_items": [message(), patch_item(DIFF)],
        "metadata": {"best_of_n": 2},
    }


def _follow_shape(w: World) -> dict[str, Any]:
    return {"follow_up": {"task_id": w.task, "turn_id": w.turn}, "input_items": [message()]}


def _env_shape(w: World) -> dict[str, Any]:
    return {
        "label": "fuzz",
        "repos": [str(w.repo), {"url": str(w.repo), "name": "a/b", "default_branch": "main"}],
        "env_vars": {"A": "1"},
        "secrets": {"S": "2"},
        "setup": ["echo hi"],
        "agent_network_access": {
            "mode": "on",
            "preset_allowlist": "all",
            "allowlist_domains": "a.com",
        },
        "workspace_dir": "/workspace",
    }


def _settings_shape(w: World) -> dict[str, Any]:
    return {
        "branch_format": "codex/{feature}",
        "git_diff_mode": "unified",
        "custom_instructions": "x",
    }


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzzed_bodies_never_500(fresh_world: World, seed: int) -> None:
    w = fresh_world
    fuzz = Fuzzer(seed, w)
    targets: list[tuple[str, Callable[[World], str], Callable[[World], dict[str, Any]]]] = [
        ("POST", lambda w: "tasks", _task_shape),
        ("POST", lambda w: "tasks", _follow_shape),
        ("POST", lambda w: "environments", _env_shape),
        ("PATCH", lambda w: f"environments/{w.env}", _env_shape),
        ("PATCH", lambda w: "settings/user", _settings_shape),
    ]
    failures = []
    for i in range(150):
        method, path, shape = targets[i % len(targets)]
        body = fuzz.mutate(shape(w)) if fuzz.r.random() < 0.85 else fuzz.value()
        r = w.api.request(
            method, path(w), content=dumps(body), headers={"content-type": "application/json"}
        )
        detail = r.json().get("detail") if r.status_code >= 400 else "ok"
        if r.status_code >= 500 or not (isinstance(detail, str) and detail):
            failures.append(
                f"{method} {path(w)} {json.dumps(body)[:300]} -> {r.status_code} {r.text[:200]}"
            )
    assert failures == []
    # The server still works afterwards.
    assert w.api.get("tasks/list", params={"task_filter": "all"}).status_code == 200
