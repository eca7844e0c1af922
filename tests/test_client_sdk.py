"""The SDK's core without a server: path styles, retries, typed errors, SSE reconnect, the
captured chatgpt.com payloads, attempts order, local apply and environment choice."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter

from conftest import reference_dir
from openwham.client import (
    AsyncWhamClient,
    BadRequest,
    Conflict,
    NotFound,
    PatchDoesNotApply,
    RateLimited,
    ServerError,
    TransportError,
    UnexpectedAnswer,
    UnknownEnvironment,
    WhamClient,
    WhamError,
    turn_diff,
    turn_messages,
)
from openwham.client.apply import apply_diff
from openwham.client.resolve import choose, github_repo
from openwham.client.sse import StreamEvent, StreamReader
from openwham.client.urls import api_root, task_id_from, task_url
from openwham.wire import (
    CodeReviewSettingsPage,
    Environment,
    EnvironmentWithCreatorAndMachine,
    GitHubBranchPage,
    GitHubInstallationEvents,
    GitHubInstallations,
    GitHubInstallationsV2,
    GitHubRepository,
    GitHubUserHandle,
    UserPreferencesConfig,
)

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, base: str = "http://wham.test", **kw: Any) -> WhamClient:
    c = WhamClient(base, token="t0k", transport=httpx.MockTransport(handler), **kw)
    c._sleep = lambda s: None  # type: ignore[method-assign]
    return c


def aclient(handler: Handler, base: str = "http://wham.test") -> AsyncWhamClient:
    c = AsyncWhamClient(base, token="t0k", transport=httpx.MockTransport(handler))

    async def no_sleep(s: float) -> None:
        return None

    c._sleep = no_sleep  # type: ignore[method-assign]
    return c


# ----------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("base", "root"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/api/codex"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/api/codex"),
        ("http://127.0.0.1:8080/backend-api", "http://127.0.0.1:8080/backend-api/wham"),
        ("https://chatgpt.com", "https://chatgpt.com/backend-api/wham"),
        ("https://chat.openai.com/", "https://chat.openai.com/backend-api/wham"),
        ("https://chatgpt.com/backend-api/", "https://chatgpt.com/backend-api/wham"),
    ],
)
def test_path_style_follows_the_base_url_like_the_codex_cli(base: str, root: str) -> None:
    assert api_root(base) == root
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"items": [], "cursor": None})

    with client(handler, base) as c:
        c.list_tasks(limit=5)
    assert seen == [f"{root}/tasks/list?limit=5&task_filter=current"]


def test_task_urls_and_ids() -> None:
    assert task_url("http://h:1/backend-api", "task_e_1") == "http://h:1/codex/tasks/task_e_1"
    assert task_url("https://chatgpt.com", "task_e_1") == "https://chatgpt.com/codex/tasks/task_e_1"
    assert task_id_from("http://h:1/codex/tasks/task_e_9?x=1#y") == "task_e_9"
    assert task_id_from(" task_e_9 ") == "task_e_9"
    with pytest.raises(ValueError, match="not an http"):
        api_root("ftp://nope")
    with pytest.raises(WhamError, match="not an http"):
        WhamClient("localhost:8080")


def test_headers_token_and_account() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"plan_type": "pro"})

    with client(handler, account_id="acct-1") as c:
        assert c.usage().plan_type == "pro"
    assert seen[0].headers["authorization"] == "Bearer t0k"
    assert seen[0].headers["chatgpt-account-id"] == "acct-1"


# ----------------------------------------------------------------------------- errors, retries


def test_an_answer_of_the_wrong_shape_is_a_typed_error() -> None:
    wrong = client(lambda r: httpx.Response(200, json={"nope": 1}))
    with wrong as c, pytest.raises(UnexpectedAnswer, match=r"GET .*/usage .*plan_type"):
        c.usage()
    html = client(lambda r: httpx.Response(200, text="<html>"))
    with html as c, pytest.raises(UnexpectedAnswer, match="not JSON"):
        c.usage()


def test_typed_errors_carry_status_and_detail() -> None:
    answers = {
        "/api/codex/tasks/x": (404, {"detail": "Task not found"}),
        "/api/codex/tasks/list": (400, {"detail": "limit must be 1..100"}),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        status, body = answers[request.url.path]
        return httpx.Response(status, json=body)

    with client(handler, retries=0) as c:
        with pytest.raises(NotFound) as nf:
            c.get_task("x")
        assert nf.value.status == 404 and nf.value.detail == "Task not found"
        assert "Task not found" in str(nf.value)
        with pytest.raises(BadRequest):
            c.list_tasks(limit=500)


def test_reads_are_retried_on_5xx_429_and_network_errors() -> None:
    answers: list[Any] = [
        httpx.ConnectError("refused"),
        httpx.Response(503, text="busy"),
        httpx.Response(429, headers={"Retry-After": "2"}, json={"detail": "slow down"}),
        httpx.Response(200, json={"items": [], "cursor": None}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    slept: list[float] = []
    with client(handler) as c:
        c._sleep = slept.append  # type: ignore[method-assign]
        assert c.list_tasks().items == []
    assert len(slept) == 3
    assert slept[2] == 2.0  # Retry-After honoured


def test_retries_give_up_with_the_last_error() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(500, json={"detail": "boom"})

    with client(handler, retries=2) as c, pytest.raises(ServerError):
        c.get_task("task_e_1")
    assert calls == 3

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with client(down, retries=1) as c, pytest.raises(TransportError, match="cannot reach"):
        c.usage()


def test_creating_a_task_is_never_retried() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503, json={"detail": "no sandbox"})

    with client(handler) as c, pytest.raises(ServerError):
        c.create_task("hi", "env")
    assert calls == 1

    def limited(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"detail": {"message": "rate limited"}})

    with client(limited) as c, pytest.raises(RateLimited, match="rate limited"):
        c.create_task("hi", "env")


def test_create_body_matches_codex_cloud_exec() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=_load("examples", "task_create_response.json"))

    with client(handler) as c:
        c.create_task("Prompt", "env_123", branch="release/1.0", attempts=3, starting_diff="D")
        c.create_task("Ask", "env_123", ask=True)
        with pytest.raises(WhamError):
            c.create_task("x", "env", attempts=5)
    assert bodies[0] == {
        "new_task": {
            "environment_id": "env_123",
            "run_environment_in_qa_mode": False,
            "branch": "release/1.0",
        },
        "input_items": [
            {
                "type": "message",
                "role": "user",
                "content": [{"content_type": "text", "text": "Prompt"}],
            },
            {"type": "pre_apply_patch", "output_diff": {"diff": "D"}},
        ],
        "metadata": {"best_of_n": 3},
    }
    assert "metadata" not in bodies[1]
    assert bodies[1]["new_task"]["run_environment_in_qa_mode"] is True
    assert len(bodies) == 2


# ----------------------------------------------------------------------------- captured payloads


def _load(folder: str, name: str) -> Any:
    return json.loads((reference_dir() / folder / name).read_text())


WITH_CREATOR = EnvironmentWithCreatorAndMachine
PAYLOADS: dict[str, tuple[str, Callable[[WhamClient], Any]]] = {
    "tasks_list_all.json": ("tasks/list", lambda c: c.list_tasks(task_filter="all")),
    "tasks_list_current.json": ("tasks/list", lambda c: c.list_tasks()),
    "tasks_list_archived.json": ("tasks/list", lambda c: c.list_tasks(task_filter="archived")),
    "tasks_list_limit1_all.json": ("tasks/list", lambda c: c.list_tasks(limit=1)),
    "wham-examples_tasks-list.json": ("tasks/list", lambda c: c.list_tasks()),
    "task_details_sample.json": ("tasks/t", lambda c: c.get_task("t")),
    "wham-examples_task-bundle.json": ("tasks/t", lambda c: c.get_task("t")),
    "task_create_response.json": ("tasks", lambda c: c.create_task("p", "e")),
    "turn_mapping_sample.json": ("tasks/t/turns", lambda c: c.turns("t")),
    "wham-examples_turn-mapping.json": ("tasks/t/turns", lambda c: c.turns("t")),
    "wham-examples_task-turn-detail.json": ("tasks/t/turns/u", lambda c: c.get_turn("t", "u")),
    "wham-examples_tasks-response.json": ("tasks", lambda c: c.task_feed()),
    "wham-examples_tasks-rate-limit.json": ("tasks/rate_limit", lambda c: c.task_rate_limit()),
    "rate_limit_plus.json": ("tasks/rate_limit", lambda c: c.task_rate_limit()),
    "settings_user.json": ("settings/user", lambda c: c.settings()),
    "wham-examples_settings-user.json": ("settings/user", lambda c: c.settings()),
    "environments_list.json": ("environments", lambda c: c.list_environments()),
    "wham-examples_environments-list.json": ("environments", lambda c: c.list_environments()),
    "environments_recent.json": ("environments/recent", lambda c: c.recent_environments()),
    "environment_detail.json": ("environments/e", lambda c: c.get_environment("e")),
    "machines_list.json": ("machines", lambda c: c.machines()),
    "wham-examples_machines.json": ("machines", lambda c: c.machines()),
    "turn_viewed_success.json": ("tasks/t/archive", lambda c: c.archive("t")),
    "environment_detail_with_creator.json": (
        "environments/e/with-creator-and-machine",
        lambda c: c.get(
            "environments/e/with-creator-and-machine", EnvironmentWithCreatorAndMachine
        ),
    ),
    "wham-examples_environment-with-creator.json": (
        "environments/e/with-creator-and-machine",
        lambda c: c.get(
            "environments/e/with-creator-and-machine", EnvironmentWithCreatorAndMachine
        ),
    ),
    "wham-examples_github-branches-search.json": (
        "github/branches",
        lambda c: c.get("github/branches", GitHubBranchPage),
    ),
    "wham-examples_github-installations-events.json": (
        "github/ev",
        lambda c: c.get("github/ev", GitHubInstallationEvents),
    ),
    "wham-examples_github-installations-v2.json": (
        "github/v2",
        lambda c: c.get("github/v2", GitHubInstallationsV2),
    ),
    "wham-examples_github-installations.json": (
        "github/i",
        lambda c: c.get("github/i", GitHubInstallations),
    ),
    "wham-examples_github-repository.json": (
        "github/r",
        lambda c: c.get("github/r", GitHubRepository),
    ),
    "wham-examples_settings-code-review.json": (
        "settings/code-review",
        lambda c: c.get("settings/code-review", CodeReviewSettingsPage),
    ),
    "wham-examples_settings-config-user-preferences.json": (
        "settings/configs/user-preferences",
        lambda c: c.get("settings/configs/user-preferences", UserPreferencesConfig),
    ),
    "wham-examples_task-suggestions-github-user-handle.json": (
        "task-suggestions/h",
        lambda c: c.get("task-suggestions/h", GitHubUserHandle),
    ),
}
NOT_PAYLOADS = {"samples_metadata.json"}  # capture metadata, not an answer


def test_every_captured_payload_is_covered() -> None:
    names = {p.name for p in (reference_dir() / "examples").glob("*.json")}
    assert names - NOT_PAYLOADS - set(PAYLOADS) == {"sibling_turns_sample.json"}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_sdk_parses_captured_chatgpt_payloads(name: str) -> None:
    path, call = PAYLOADS[name]
    body = _load("examples", name)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/backend-api/wham/{path}"
        return httpx.Response(200, json=body)

    with client(handler, "https://chatgpt.com") as c:
        result = call(c)
    assert result is not None


FIXTURES = ["task_details_with_diff.json", "task_details_with_error.json"]


def test_attempts_and_results_from_captured_payloads() -> None:
    details = _load("examples", "task_details_sample.json")
    siblings = _load("examples", "sibling_turns_sample.json")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/sibling_turns"):
            return httpx.Response(200, json=siblings)
        return httpx.Response(200, json=details)

    with client(handler, "https://chatgpt.com/backend-api") as c:
        attempts = c.attempts("task_e_x")
    placements = [t.attempt_placement for t in attempts]
    assert placements == sorted(placements) and len(attempts) >= 2

    with_diff = _load("openai-codex-fixtures", "task_details_with_diff.json")
    with client(lambda r: httpx.Response(200, json=with_diff)) as c:
        found = c.get_task("t")
        diff = c.diff("t")
    assert diff == turn_diff(found.current_diff_task_turn)
    assert diff.startswith("diff --git")
    failed = _load("openai-codex-fixtures", "task_details_with_error.json")
    with client(lambda r: httpx.Response(200, json=failed)) as c:
        details_failed = c.get_task("t")
        assert c.diff("t").startswith("diff --git a/lib.rs")  # a pr item's output_diff
    turn = details_failed.current_assistant_turn
    assert turn is not None and turn.error is not None
    assert turn.error.code == "APPLY_FAILED"
    assert turn_messages(turn) == []
    assert turn_messages(found.current_assistant_turn) == ["Assistant response"]
    empty = {"task": {"id": "t"}, "current_assistant_turn": {"turn_status": "failed"}}
    nodiff = client(lambda r: httpx.Response(200, json=empty))
    with nodiff as c, pytest.raises(Conflict, match="it failed without one"):
        c.diff("t")


# ----------------------------------------------------------------------------- SSE


def _frame(n: int, item_type: str, payload: dict[str, Any]) -> str:
    data = {"id": str(n), "item_type": item_type, "payload": payload, item_type: payload}
    return f"id: {n}\nevent: message\ndata: {json.dumps(data)}\n\n"


class Broken(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that sends some frames, then the connection drops."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __iter__(self) -> Iterator[bytes]:
        yield self.text.encode()
        raise httpx.ReadError("connection reset")

    async def __aiter__(self) -> Any:
        yield self.text.encode()
        raise httpx.ReadError("connection reset")


def _stream_handler(seen: list[str | None]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("last-event-id"))
        if len(seen) == 1:
            body = ": keepalive\n\n" + _frame(
                1, "task_turn_event", {"text": "Working", "turn_status": "in_progress"}
            )
            body += _frame(2, "work_log_message", {"id": "m", "author": {"role": "assistant"}})
            return httpx.Response(200, stream=Broken(body))
        assert request.headers["last-event-id"] == "2"
        body = _frame(3, "log", {"line": "x"}) + _frame(
            4, "task_turn_event", {"text": "Completed", "turn_status": "completed"}
        )
        return httpx.Response(200, text=body)

    return handler


def test_stream_reconnects_from_the_last_event_id() -> None:
    seen: list[str | None] = []
    with client(_stream_handler(seen)) as c:
        events = list(c.stream("task_e_1", "task_e_1~assttrn_e_1"))
    assert [e.id for e in events] == ["1", "2", "3", "4"]
    assert [e.item_type for e in events] == [
        "task_turn_event",
        "work_log_message",
        "log",
        "task_turn_event",
    ]
    assert events[-1].is_terminal and not events[0].is_terminal
    assert seen == [None, "2"]


def test_async_stream_reconnects_too() -> None:
    seen: list[str | None] = []

    async def run() -> list[str | None]:
        async with aclient(_stream_handler(seen)) as c:
            return [e.id async for e in c.stream("task_e_1", "task_e_1~assttrn_e_1")]

    assert asyncio.run(run()) == ["1", "2", "3", "4"]
    assert seen == [None, "2"]


def test_stream_gives_up_after_repeated_failures() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down")

    with client(handler) as c, pytest.raises(TransportError, match="event stream"):
        list(c.stream("t", "u"))


def test_stream_reader_parses_multiline_and_ignores_comments() -> None:
    reader = StreamReader()
    lines = [": hi", "id: 7", 'data: {"item_type": "log",', 'data: "payload": {"line": "a"}}', ""]
    events = [e for line in lines if (e := reader.feed(line)) is not None]
    assert len(events) == 1 and events[0].payload == {"line": "a"} and reader.last_event_id == "7"


def _event(item_type: str, payload: dict[str, Any]) -> StreamEvent:
    return StreamEvent(id="1", item_type=item_type, payload=payload)


def _work(role: str, content: dict[str, Any], **fields: Any) -> StreamEvent:
    return _event(
        "work_log_message", {"id": "m", "author": {"role": role}, "content": content, **fields}
    )


def test_every_kind_of_stream_event_reads_as_text() -> None:
    code = {"content_type": "code", "language": "unknown"}
    failed = {"text": "Failed", "turn_status": "failed", "error": {"message": "Setup failed"}}
    cases = [
        (_event("task_turn_event", {"text": "Working", "turn_status": "in_progress"}), "Working"),
        (_event("task_turn_event", failed), "Failed: Setup failed"),
        (_event("task_turn_event", {"turn_status": "completed"}), "completed"),
        (_event("task_title_generated", {"title": "Fix add()"}), "Title: Fix add()"),
        (_event("log", {"key": {"type": "UserSetupScript"}, "line": "ok"}), "setup: ok"),
        (_event("log", {"text": "Recovered: again"}), "Recovered: again"),
        (_work("user", {"content_type": "text", "parts": ["Fix add()"]}), "Prompt: Fix add()"),
        (
            _work(
                "assistant", {**code, "text": '{"cmd": "pytest -q"}'}, recipient="container.exec"
            ),
            "$ pytest -q",
        ),
        (
            _work(
                "assistant",
                {**code, "text": '{"cmd": ["bash", "-lc", "ls -a"]}'},
                recipient="container.exec",
            ),
            "$ ls -a",
        ),
        (
            _work(
                "assistant",
                {**code, "text": '{"cmd": ["git", "log", "a b"]}'},
                recipient="container.exec",
            ),
            "$ git log 'a b'",
        ),
        (
            _work("assistant", {**code, "text": "M calc.py\nA new.py"}, recipient="apply_patch"),
            "Edited calc.py, Added new.py",
        ),
        (
            _work("assistant", {**code, "text": '{"q": "x"}'}, recipient="web.search"),
            'web.search {"q": "x"}',
        ),
        (
            _work(
                "tool",
                {"content_type": "terminal_output", "parts": ["1 passed\n"]},
                metadata={"exit_code": 0},
            ),
            "1 passed",
        ),
        (
            _work(
                "tool",
                {"content_type": "terminal_output", "parts": ["boom\n"]},
                metadata={"exit_code": 2},
            ),
            "boom\n(exit 2)",
        ),
        (_work("tool", {"content_type": "terminal_output", "parts": [""]}), "(no output)"),
        (
            _work(
                "assistant",
                {"content_type": "text", "parts": ["Hmm"]},
                metadata={"reasoning_status": "is_reasoning"},
            ),
            "Thinking: Hmm",
        ),
        (
            _work(
                "assistant", {"content_type": "text", "parts": [{"text": "Done."}]}, channel="final"
            ),
            "Done.",
        ),
        (_event("something_new", {"a": 1}), 'something_new: {"a": 1}'),
    ]
    for event, text in cases:
        assert event.text == text, event


# ----------------------------------------------------------------------------- apply


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "co"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "f.txt").write_text("a\nb\nc\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "init")
    return repo


@pytest.fixture
def patch(checkout: Path) -> str:
    """A real ``git diff`` (with blob ids, which ``--3way`` needs): f.txt changed, new.txt
    added; the checkout is left as it was."""
    (checkout / "f.txt").write_text("a\nB\nc\n")
    (checkout / "new.txt").write_text("hello\n")
    _git(checkout, "add", "-A")
    diff = _git(checkout, "diff", "--cached", "--full-index")
    _git(checkout, "reset", "-q", "--hard")
    return diff


def test_apply_cleanly_and_check_first(checkout: Path, patch: str) -> None:
    checked = apply_diff(patch, checkout, check=True)
    assert checked.status == "success" and checked.checked_only
    assert not (checkout / "new.txt").exists()  # --check changes nothing
    result = apply_diff(patch, checkout / ".")
    assert result.status == "success"
    assert sorted(result.applied) == ["f.txt", "new.txt"]
    assert (checkout / "new.txt").read_text() == "hello\n"
    assert "A  new.txt" in _git(checkout, "status", "--short")  # staged, like codex apply


def test_apply_with_conflicts_is_partial(checkout: Path, patch: str) -> None:
    (checkout / "f.txt").write_text("a\nZ\nc\n")
    _git(checkout, "commit", "-qam", "theirs")
    result = apply_diff(patch, checkout)
    assert result.status == "partial"
    assert result.conflicts == ["f.txt"] and result.applied == ["new.txt"]
    assert "<<<<<<<" in (checkout / "f.txt").read_text()


def test_a_patch_that_cannot_apply_changes_nothing(checkout: Path, patch: str) -> None:
    _git(checkout, "rm", "-q", "f.txt")
    _git(checkout, "commit", "-qm", "gone")
    with pytest.raises(PatchDoesNotApply) as e:
        apply_diff(patch, checkout)
    assert e.value.result.skipped == ["f.txt"]
    assert _git(checkout, "status", "--short") == ""
    assert not (checkout / "new.txt").exists()
    with pytest.raises(WhamError, match="not a unified"):
        apply_diff("hello", checkout)
    with pytest.raises(WhamError, match="not inside a git repository"):
        apply_diff(patch, checkout.parent)


# ----------------------------------------------------------------------------- environments

ENVS = TypeAdapter(list[Environment])


def _envs(*specs: dict[str, Any]) -> list[Environment]:
    return ENVS.validate_python([{"id": f"e{i}", **s} for i, s in enumerate(specs)])


def test_environment_choice_follows_the_codex_cli_order() -> None:
    envs = _envs(
        {"label": "Alpha", "task_count": 1},
        {"label": "beta", "task_count": 9},
        {"label": "gamma", "is_pinned": True},
    )
    assert choose(envs, [], "alpha").id == "e0"  # label, case-insensitive
    assert choose(envs, [], "e1").id == "e1"  # id
    assert choose(envs, [envs[1]], None).id == "e1"  # the single candidate
    assert choose(envs, [], None).id == "e2"  # the pinned one
    assert choose(envs, envs[:2], None).id == "e1"  # the most tasks
    with pytest.raises(UnknownEnvironment, match="known: Alpha, beta, gamma"):
        choose(envs, [], "delta")
    with pytest.raises(UnknownEnvironment, match="ambiguous"):
        choose(_envs({"label": "x"}, {"label": "X"}), [], "x")
    with pytest.raises(UnknownEnvironment, match="no environments"):
        choose([], [], None)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://github.com/acme/widgets.git", ("acme", "widgets")),
        ("git@github.com:acme/widgets.git", ("acme", "widgets")),
        ("ssh://git@github.com/acme/widgets", ("acme", "widgets")),
        ("https://gitlab.com/acme/widgets.git", None),
        ("/srv/git/widgets", None),
    ],
)
def test_github_remotes(url: str, expected: tuple[str, str] | None) -> None:
    assert github_repo(url) == expected


def test_resolve_uses_github_remotes_and_local_clone_urls(checkout: Path, tmp_path: Path) -> None:
    _git(checkout, "remote", "add", "origin", "git@github.com:acme/widgets.git")
    _git(checkout, "remote", "add", "local", str(tmp_path / "srv" / "tools.git"))
    envs = [
        {"id": "e0", "label": "other", "task_count": 50},
        {"id": "e1", "label": "widgets"},
        {
            "id": "e2",
            "label": "tools",
            "repo_map": {"r": {"name": "tools", "clone_url": str(tmp_path / "srv" / "tools")}},
        },
    ]
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path.endswith("/by-repo/github/acme/widgets"):
            return httpx.Response(200, json=[envs[1]])
        return httpx.Response(200, json=envs)

    with client(handler) as c:
        # two candidates (by-repo and clone URL), neither pinned: the one with most tasks
        found = c.resolve_environment(repo=checkout)
        assert found.id in ("e1", "e2")
        assert "/api/codex/environments/by-repo/github/acme/widgets" in calls
        assert c.resolve_environment("TOOLS").id == "e2"
        with pytest.raises(UnknownEnvironment, match="known: other, tools, widgets"):
            c.resolve_environment("nope")
