"""Big diffs do not bloat the API: lists carry diff stats only, details cut the inline diff at
``WHAM_INLINE_DIFF_MAX_BYTES`` (``truncated: true``), ``…/turns/{id}/diff`` serves it whole,
and the SDK, ``wham task diff``/``apply`` and the official Codex CLI get it whole.

Results are written straight into the store, as the engine would (no sandbox needed)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from conftest import Api, Server, cli_user, git, make_repo, make_server, run_cli
from openwham.client import AsyncWhamClient, WhamClient, WhamError, turn_diff
from openwham.service.diffs import diff_stats, truncate_diff
from openwham.store import models as m
from support.app_thread import AppThread
from support.browser import sign_in

CAP = 1 << 20
CODEX_AGENT = "codex_cli_rs/0.151.0 (Debian 12.0.0; x86_64) xterm (codex_cloud_tasks_diff)"


def big_diff(size: int, name: str = "big.txt") -> str:
    """A diff adding a file of about ``size`` bytes, with a change to ``calc.py`` first."""
    line_count = max(1, size // 100)
    body = "".join(f"+line {i:06d} " + "x" * 86 + "\n" for i in range(line_count))
    return (
        "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n"
        "@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b\n"
        f"diff --git a/{name} b/{name}\nnew file mode 100644\n--- /dev/null\n+++ b/{name}\n"
        f"@@ -0,0 +1,{line_count} @@\n{body}"
    )


def finish_with_diff(server: Server, turn_id: str, diff: str) -> None:
    """Complete an attempt with ``diff`` as its result, as the engine's recorder does."""
    stats = diff_stats(diff)
    with server.app_state.db.session() as s:
        turn = s.get(m.Turn, turn_id)
        assert turn is not None
        turn.turn_status = "completed"
        turn.body = {
            **turn.body,
            "output_items": [
                {"type": "message", "role": "assistant", "content": ["Done."]},
                {
                    "type": "pr",
                    "pr_title": "Big change",
                    "pr_message": "Adds a big file",
                    "output_diff": {
                        "type": "output_diff",
                        "diff": diff,
                        **stats.model_dump(),
                    },
                },
            ],
        }


def task_with_diff(server: Server, api: Api, env_id: str, diff: str) -> tuple[str, str]:
    created = api.create_task(env_id, "Add a big file")
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    finish_with_diff(server, turn_id, diff)
    return task_id, turn_id


def pr_diff(turn: dict[str, Any]) -> dict[str, Any]:
    [pr] = [i for i in turn["output_items"] if i["type"] == "pr"]
    return dict(pr["output_diff"])


@pytest.fixture
def env_id(any_server: Server, repo: Path) -> str:
    return str(any_server.api.create_env(repo)["id"])


# --------------------------------------------------------------------------- cutting


def git_apply_check(repo: Path, patch: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "apply", "--check", "-"], cwd=repo, input=patch, capture_output=True, text=True
    )


@pytest.mark.parametrize("cap", [1024, 1500, 4096, 10_000, 65_536])
def test_a_cut_diff_is_a_prefix_under_the_cap_that_git_refuses(repo: Path, cap: int) -> None:
    diff = big_diff(200_000)
    assert git_apply_check(repo, diff).returncode == 0  # the whole one applies
    cut = truncate_diff(diff, cap)
    assert cut and diff.startswith(cut) and cut.endswith("\n")
    assert len(cut.encode()) <= cap
    assert len(cut.encode()) > cap - 300  # cut near the cap, not at a file boundary
    refused = git_apply_check(repo, cut)
    assert refused.returncode != 0 and "corrupt patch" in refused.stderr


def test_a_cut_that_falls_between_files_still_ends_inside_a_hunk(repo: Path) -> None:
    diff = big_diff(50_000)
    first_file_end = diff.index("diff --git a/big.txt")
    # the cap lands exactly after calc.py's complete hunk: a patch of calc.py alone would apply
    cut = truncate_diff(diff, first_file_end)
    assert diff.startswith(cut) and len(cut) < first_file_end
    assert "corrupt patch" in git_apply_check(repo, cut).stderr


def test_a_diff_under_the_cap_and_one_without_a_hunk_in_reach() -> None:
    diff = big_diff(5_000)
    assert truncate_diff(diff, len(diff.encode())) == diff
    headers = "diff --git a/x b/x\nnew file mode 100644\n--- /dev/null\n+++ b/x\n"
    long_headers = headers * 100 + "@@ -0,0 +1 @@\n+x\n"
    assert truncate_diff(long_headers, 1024) == ""  # headers alone could create empty files


def test_multibyte_text_is_cut_at_a_line_and_counted_in_bytes() -> None:
    line = "+" + "é" * 60 + "\n"
    diff = "diff --git a/u b/u\n--- a/u\n+++ b/u\n@@ -0,0 +1,500 @@\n" + line * 500
    cut = truncate_diff(diff, 5000)
    assert len(cut.encode()) <= 5000 and diff.startswith(cut) and cut.endswith("\n")


# --------------------------------------------------------------------------- the API


def test_lists_carry_the_stats_and_never_the_diff(
    any_server: Server, env_id: str, repo: Path
) -> None:
    api = any_server.api
    small_id, _ = task_with_diff(any_server, api, env_id, big_diff(2_000))
    small_list = api.get("tasks/list").content
    big = big_diff(3 * CAP)
    big_id, _ = task_with_diff(any_server, api, env_id, big)
    lists = api.get("tasks/list")
    assert lists.status_code == 200
    items = {i["id"]: i for i in lists.json()["items"]}
    stats = items[big_id]["task_status_display"]["latest_turn_status_display"]["diff_stats"]
    assert stats == {"files_modified": 2, "lines_added": 3 * CAP // 100 + 1, "lines_removed": 1}
    assert items[small_id]["task_status_display"]["latest_turn_status_display"]["diff_stats"][
        "lines_added"
    ] == (2_000 // 100 + 1)
    # the list's size does not depend on the diff's: a second task adds one entry, whatever
    # its diff holds (the 3 MiB diff's entry is the size of the 2 KB one's, to a few digits)
    one_entry = len(small_list) - len(b'{"items":[],"cursor":null}')
    assert len(lists.content) < len(small_list) + one_entry + 64
    assert b"line 000000" not in lists.content

    # the feed is a list too: the attempt without its diff, the stats kept
    feed = api.get("tasks")
    assert feed.status_code == 200 and len(feed.content) < 20_000
    [entry] = [i for i in feed.json()["items"] if i["task"]["id"] == big_id]
    carried = pr_diff(entry["turn"])
    assert carried["diff"] == "" and carried["truncated"] is True
    assert (
        carried["diff_bytes"] == len(big.encode())
        and carried["lines_added"] == stats["lines_added"]
    )
    assert entry["task"]["denormalized_metadata"]["diff_stats"] == stats


def test_details_cut_the_diff_and_the_diff_endpoint_has_it_whole(
    any_server: Server, env_id: str
) -> None:
    api = any_server.api
    big = big_diff(3 * CAP)
    task_id, turn_id = task_with_diff(any_server, api, env_id, big)

    details = api.get(f"tasks/{task_id}")
    # the attempt is both current_assistant_turn and current_diff_task_turn: the cut diff twice
    assert details.status_code == 200 and len(details.content) < 2.1 * CAP
    body = details.json()
    for key in ("current_diff_task_turn", "current_assistant_turn"):
        carried = pr_diff(body[key])
        assert carried["truncated"] is True and carried["diff_bytes"] == len(big.encode())
        assert big.startswith(carried["diff"]) and 0 < len(carried["diff"].encode()) <= CAP
    # the turn endpoints cut it the same way
    for path, pick in [
        (f"tasks/{task_id}/turns/{turn_id}", lambda j: j["turn"]),
        (f"tasks/{task_id}/turns", lambda j: j["turn_mapping"][turn_id]["turn"]),
    ]:
        r = api.get(path)
        assert r.status_code == 200 and len(r.content) < 1.1 * CAP, path
        assert pr_diff(pick(r.json()))["truncated"] is True

    whole = api.get(f"tasks/{task_id}/turns/{turn_id}/diff")
    assert whole.status_code == 200
    assert whole.headers["content-type"] == "text/x-diff; charset=utf-8"
    assert whole.text == big
    # under the other path style too
    assert api.styled("/api/codex").get(f"tasks/{task_id}/turns/{turn_id}/diff").text == big


def test_a_diff_under_the_cap_is_inline_whole_in_the_captured_shape(
    any_server: Server, env_id: str
) -> None:
    api = any_server.api
    diff = big_diff(20_000)
    task_id, turn_id = task_with_diff(any_server, api, env_id, diff)
    carried = pr_diff(api.get(f"tasks/{task_id}").json()["current_diff_task_turn"])
    assert carried["diff"] == diff
    assert "truncated" not in carried and "diff_bytes" not in carried
    assert api.get(f"tasks/{task_id}/turns/{turn_id}/diff").text == diff


def test_the_official_codex_cli_gets_the_whole_diff_inline(any_server: Server, env_id: str) -> None:
    """``codex apply`` and ``codex cloud diff/apply`` read only the inline diff."""
    api = any_server.api
    big = big_diff(2 * CAP)
    task_id, turn_id = task_with_diff(any_server, api, env_id, big)
    for headers in ({"User-Agent": CODEX_AGENT}, {"originator": "codex_cli_rs"}):
        details = api.get(f"tasks/{task_id}", headers=headers).json()
        carried = pr_diff(details["current_diff_task_turn"])
        assert carried["diff"] == big and "truncated" not in carried
        siblings = api.get(f"tasks/{task_id}/turns/{turn_id}/sibling_turns", headers=headers)
        assert siblings.status_code == 200


def test_a_smaller_cap_is_a_setting(tmp_path: Path, sqlite_url: str, repo: Path) -> None:
    for server in make_server(tmp_path, sqlite_url, inline_diff_max_bytes=4096):
        env = server.api.create_env(repo)
        diff = big_diff(20_000)
        task_id, _ = task_with_diff(server, server.api, env["id"], diff)
        carried = pr_diff(server.api.get(f"tasks/{task_id}").json()["current_diff_task_turn"])
        assert carried["truncated"] is True and len(carried["diff"].encode()) <= 4096


def test_the_diff_endpoint_refuses_bad_ids_other_accounts_and_turns_without_a_diff(
    any_server: Server, env_id: str
) -> None:
    api = any_server.api
    task_id, turn_id = task_with_diff(any_server, api, env_id, big_diff(2_000))
    pending = api.create_task(env_id, "Still queued")
    user_turn = api.get(f"tasks/{task_id}").json()["current_user_turn"]["id"]
    cases = {
        f"tasks/task_e_{'0' * 32}/turns/{turn_id}/diff": 404,
        f"tasks/{task_id}/turns/nope/diff": 404,
        f"tasks/{task_id}/turns/{'x' * 5000}/diff": 404,
        f"tasks/{pending['task']['id']}/turns/{turn_id}/diff": 404,  # a turn of another task
        f"tasks/{pending['task']['id']}/turns/{pending['turn']['id']}/diff": 404,  # no diff yet
        f"tasks/{task_id}/turns/{user_turn}/diff": 404,  # a prompt without a starting patch
    }
    for path, status in cases.items():
        r = api.get(path)
        assert r.status_code == status, (path, r.text)
        assert r.headers["content-type"].startswith("application/json"), path
    no_diff_yet = f"tasks/{pending['task']['id']}/turns/{pending['turn']['id']}/diff"
    assert "still running" in api.get(no_diff_yet).json()["detail"]
    other = api.as_(any_server.other_account_token())
    r = other.get(f"tasks/{task_id}/turns/{turn_id}/diff")
    assert r.status_code == 404
    assert r.json() == api.get(f"tasks/task_e_{'0' * 32}/turns/{turn_id}/diff").json()
    assert api.as_(None).get(f"tasks/{task_id}/turns/{turn_id}/diff").status_code == 401


def test_on_sqlite_the_turn_body_is_the_last_column(server: Server) -> None:
    """Lists read turn columns only; on SQLite a column stored after a multi-MB body costs a
    walk over its overflow pages (measured: list throughput fell 4x with 4 MB diffs)."""
    with server.app_state.db.session() as s:
        columns = [row[1] for row in s.execute(text("PRAGMA table_info(turns)"))]
    assert columns[-1] == "body" and "diff_lines_added" in columns


def test_a_big_starting_patch_is_cut_like_a_diff(any_server: Server, env_id: str) -> None:
    """``pre_apply_patch`` (up to 5 MiB) comes back in every details answer's prompt."""
    api = any_server.api
    patch = big_diff(2 * CAP)
    item = {"type": "pre_apply_patch", "output_diff": {"diff": patch}}
    body = {
        "new_task": {"environment_id": env_id},
        "input_items": [
            {
                "type": "message",
                "role": "user",
                "content": [{"content_type": "text", "text": "Go"}],
            },
            item,
        ],
    }
    r = api.post("tasks", json=body)
    assert r.status_code == 200, r.text
    task_id, user_turn = r.json()["task"]["id"], r.json()["user_turn"]["id"]
    details = api.get(f"tasks/{task_id}")
    assert details.status_code == 200 and len(details.content) < 1.1 * CAP
    [carried] = [
        i
        for i in details.json()["current_user_turn"]["input_items"]
        if i["type"] == "pre_apply_patch"
    ]
    assert carried["output_diff"]["truncated"] is True
    assert patch.startswith(carried["output_diff"]["diff"])
    whole = api.get(f"tasks/{task_id}/turns/{user_turn}/diff")
    assert whole.status_code == 200 and whole.text == patch
    official = api.get(f"tasks/{task_id}", headers={"User-Agent": CODEX_AGENT}).json()
    [carried] = [
        i for i in official["current_user_turn"]["input_items"] if i["type"] == "pre_apply_patch"
    ]
    assert carried["output_diff"]["diff"] == patch


# --------------------------------------------------------------------------- SDK and CLI


@pytest.fixture
def app_url(server: Server) -> Iterator[str]:
    thread = AppThread()
    url = thread.start(server.api.client.app)
    yield url
    thread.stop()


def test_the_sdk_twins_and_the_cli_get_the_whole_diff(
    server: Server, app_url: str, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "origin")
    env = server.api.create_env(repo)
    big = big_diff(2 * CAP)
    task_id, turn_id = task_with_diff(server, server.api, env["id"], big)
    token = server.api.token or ""

    with WhamClient(app_url, token=token) as wham:
        details = wham.get_task(task_id)
        assert details.current_diff_task_turn is not None
        [item] = [i for i in details.current_diff_task_turn.output_items if i.type == "pr"]
        assert item.output_diff.truncated is True  # type: ignore[union-attr]
        assert wham.diff(task_id) == big
        assert wham.turn_diff(task_id, turn_id) == big
        checkout = tmp_path / "sdk-checkout"
        git("clone", "-q", str(repo), str(checkout), cwd=tmp_path)
        result = wham.apply(task_id, checkout)
        assert result.status == "success", result
        assert len((checkout / "big.txt").read_text().splitlines()) == big.count("\n+line")

    async def aio() -> tuple[str, str]:
        async with AsyncWhamClient(app_url, token=token) as client:
            return await client.diff(task_id), await client.turn_diff(task_id, turn_id)

    assert asyncio.run(aio()) == (big, big)

    env_vars = cli_user(tmp_path / "home", app_url, token)
    out = run_cli(env_vars, "task", "diff", task_id)
    assert out.returncode == 0, out.stderr
    assert out.stdout == big
    checkout = tmp_path / "cli-checkout"
    git("clone", "-q", str(repo), str(checkout), cwd=tmp_path)
    out = run_cli(env_vars, "task", "apply", task_id, "--repo", str(checkout))
    assert out.returncode == 0, out.stderr
    assert "return a + b" in (checkout / "calc.py").read_text()
    lines = (checkout / "big.txt").read_text().splitlines()
    assert len(lines) == big.count("\n+line") and lines[-1].startswith("line ")


# --------------------------------------------------------------------------- web UI


def test_the_web_ui_shows_a_big_diff_cut_and_offers_it_whole(server: Server, repo: Path) -> None:
    env = server.api.create_env(repo)
    big = big_diff(3 * CAP)
    task_id, turn_id = task_with_diff(server, server.api, env["id"], big)
    small_id, _ = task_with_diff(server, server.api, env["id"], big_diff(2_000))
    client = server.api.client
    sign_in(client, server.api.token or "")

    listing = client.get("/")
    assert listing.status_code == 200 and len(listing.content) < 100_000
    assert f"+{3 * CAP // 100 + 1}" in listing.text  # the stats, from the list

    page = client.get(f"/tasks/{task_id}")
    assert page.status_code == 200
    assert len(page.content) < 2.5 * CAP * 2  # the cut diff laid out, not 3 MiB of it twice
    assert "only its first" in page.text and "Download the whole diff" in page.text
    assert "git apply <<'" not in page.text  # no partial patch to paste
    assert f"+{3 * CAP // 100 + 1}" in page.text  # the whole diff's stats, not the shown part's
    url = f"/tasks/{task_id}/turns/{turn_id}/diff"
    assert f'href="{url}"' in page.text
    whole = client.get(url)
    assert whole.status_code == 200 and whole.text == big
    assert whole.headers["content-type"] == "text/x-diff; charset=utf-8"
    assert whole.headers["content-disposition"].startswith("attachment;")

    small = client.get(f"/tasks/{small_id}")
    assert "only its first" not in small.text and "git apply <<'" in small.text

    # another account's session gets the same 404 as an id that does not exist
    other = httpx.Client(transport=client._transport, base_url=str(client.base_url))
    sign_in(other, server.other_account_token())
    assert other.get(url).status_code == 404
    assert client.get(f"/tasks/{task_id}/turns/nope/diff").status_code == 404


# --------------------------------------------------------------------------- SDK edge cases


def _details_with(item: dict[str, Any], turn_id: str | None = "task_e_1~assttrn_e_1") -> Any:
    turn = {"type": "assistant", "turn_status": "completed", "output_items": [item]}
    if turn_id:
        turn["id"] = turn_id
    return {"task": {"id": "task_e_1"}, "current_assistant_turn": turn}


def _cut(diff: str = "") -> dict[str, Any]:
    return {
        "type": "pr",
        "output_diff": {"diff": diff, "truncated": True, "diff_bytes": 12_345_678},
    }


def test_the_sdk_fetches_a_cut_diff_even_when_nothing_of_it_is_inline() -> None:
    whole = big_diff(3_000)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path.endswith("/diff"):
            return httpx.Response(200, text=whole, headers={"content-type": "text/x-diff"})
        return httpx.Response(200, json=_details_with(_cut()))

    with WhamClient("http://wham.test", token="t", transport=httpx.MockTransport(handler)) as c:
        assert c.diff("task_e_1") == whole
    assert seen[-1] == "/api/codex/tasks/task_e_1/turns/task_e_1~assttrn_e_1/diff"


def test_the_sdk_never_passes_a_cut_diff_for_the_whole_one() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=_details_with(_cut(big_diff(3_000)[:500]), turn_id=None))

    with WhamClient("http://wham.test", token="t", transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(WhamError, match="cut the diff"):
            c.diff("task_e_1")
        details = c.get_task("task_e_1")
    with pytest.raises(WhamError, match="cut its diff"):
        turn_diff(details.current_assistant_turn)
