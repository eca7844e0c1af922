"""PR branches: ``POST tasks/{id}/turns/{turn_id}/pr`` commits an attempt's change on a
branch named by the user's ``branch_format`` and pushes it to the environment's remote (a
local bare repository here); follow-ups add commits to the same branch."""

from __future__ import annotations

import shlex
from pathlib import Path

from conftest import Server, completed_task, git, make_repo, wait_for_task
from openwham.store import models as m
from support.scripted_model import Patch, Say, ScriptedModel, Shell

FIX = """\
*** Begin Patch
*** Update File: calc.py
@@
 def add(a, b):
-    return a - b
+    return a + b
*** End Patch"""
MORE = """\
*** Begin Patch
*** Add File: NOTES.md
+add() adds.
*** End Patch"""


def bare_remote(tmp_path: Path) -> Path:
    work = make_repo(tmp_path / "work")
    remote = tmp_path / "remote.git"
    git("clone", "-q", "--bare", str(work), str(remote), cwd=tmp_path)
    return remote


def test_a_pr_branch_is_pushed_recorded_and_updated_by_a_follow_up(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    api = engine_server.api
    remote = bare_remote(tmp_path)
    base = git("rev-parse", "main", cwd=remote).strip()
    r = api.patch("settings/user", json={"branch_format": "codex/{feature}-{date}"})
    assert r.status_code == 200, r.text
    env = api.create_env(str(remote))
    task_id, turn_id, _ = completed_task(
        api,
        scripted_model,
        env["id"],
        "Fix the add function please",
        [Patch(FIX), Say("Fixed add.")],
    )

    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 200, r.text
    entry = r.json()
    pr = entry["pull_request"]
    branch = pr["head"]
    assert branch.startswith("codex/fix-the-add-function-please-20") and len(branch) == 44
    assert entry["assistant_turn_id"] == turn_id and entry["codex_updated_sha"] == pr["head_sha"]
    assert (pr["state"], pr["number"], pr["base"], pr["base_sha"]) == ("pushed", 0, "main", base)
    # the remote has the branch: one commit on the base with exactly the attempt's change
    head = git("rev-parse", branch, cwd=remote).strip()
    assert head == pr["head_sha"]
    assert git("rev-parse", f"{branch}~1", cwd=remote).strip() == base
    assert git("log", "-1", "--format=%s%n%n%b%an <%ae>", branch, cwd=remote).startswith(
        "Fix the add function please\n\nFixed add.\n"
    )
    assert git("show", f"{branch}:calc.py", cwd=remote) == "def add(a, b):\n    return a + b\n"
    assert git("rev-parse", "main", cwd=remote).strip() == base  # nothing else moved

    # recorded on the task, in the list and on the turn
    details = api.get(f"tasks/{task_id}").json()
    assert details["task"]["external_pull_requests"] == [entry]
    meta = details["task"]["denormalized_metadata"]
    assert (meta["pushed_branch_name"], meta["last_pushed_turn_id"]) == (branch, turn_id)
    (item,) = [t for t in api.get("tasks/list").json()["items"] if t["id"] == task_id]
    # no pull request was opened: lists leave the branch out of pull_requests (Codex's TUI
    # hides a task with any as a code review)
    assert item["pull_requests"] == []
    assert details["current_assistant_turn"]["pull_request_status"] == "pushed"
    # asking again for the same attempt changes nothing
    again = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert again.status_code == 200 and again.json() == entry
    assert git("rev-parse", branch, cwd=remote).strip() == head

    # a follow-up's change goes on top, on the same branch
    # (the script index counts tool outputs: the resumed conversation brings the first one)
    scripted_model.script = [Say("(not reached)"), Patch(MORE), Say("Added notes.")]
    follow = api.follow_up(task_id, turn_id, "Add a note")
    turn2 = follow["turn"]["id"]
    assert wait_for_task(api, task_id)["current_assistant_turn"]["turn_status"] == "completed"
    r = api.post(f"tasks/{task_id}/turns/{turn2}/pr")
    assert r.status_code == 200, r.text
    assert r.json()["pull_request"]["head"] == branch
    assert git("rev-parse", f"{branch}~1", cwd=remote).strip() == head
    assert git("show", f"{branch}:NOTES.md", cwd=remote) == "add() adds.\n"
    assert git("show", f"{branch}:calc.py", cwd=remote) == "def add(a, b):\n    return a + b\n"
    meta = api.get(f"tasks/{task_id}").json()["task"]["denormalized_metadata"]
    assert meta["last_pushed_turn_id"] == turn2
    # its commit: the title, then every answer of the conversation, each after its prompt
    title = api.get(f"tasks/{task_id}").json()["task"]["title"]
    assert git("log", "-1", "--format=%B", branch, cwd=remote) == (
        f"{title}\n\n"
        "Prompt: Fix the add function please\n\nFixed add.\n\n"
        "Prompt: Add a note\n\nAdded notes.\n\n"
    )
    assert r.json()["pull_request"]["body"] == (
        "Prompt: Fix the add function please\n\nFixed add.\n\nPrompt: Add a note\n\nAdded notes."
    )


def test_pr_requests_that_cannot_push_are_refused_clearly(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    api = engine_server.api
    remote = bare_remote(tmp_path)
    env = api.create_env(str(remote))
    task_id, turn_id, details = completed_task(
        api, scripted_model, env["id"], "Look only", [Shell("true"), Say("Nothing to change.")]
    )
    branches_before = git("branch", "--list", cwd=remote)

    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 409 and "nothing to push" in r.json()["detail"]
    user_turn = details["current_user_turn"]["id"]
    r = api.post(f"tasks/{task_id}/turns/{user_turn}/pr")
    assert r.status_code == 400 and "assistant turn" in r.json()["detail"]
    assert api.post(f"tasks/{task_id}/turns/nope/pr").status_code == 404
    assert api.post(f"tasks/task_e_nope/turns/{turn_id}/pr").status_code == 404
    other = api.as_(engine_server.other_account_token())
    assert other.post(f"tasks/{task_id}/turns/{turn_id}/pr").status_code == 404
    assert git("branch", "--list", cwd=remote) == branches_before


def test_a_taken_branch_name_gets_a_suffix_and_a_moved_task_branch_is_left_alone(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    api = engine_server.api
    remote = bare_remote(tmp_path)
    work = tmp_path / "work"
    # someone else's branch under the name openwham will choose
    git("checkout", "-q", "-b", "codex/fix-add", cwd=work)
    (work / "other.txt").write_text("theirs\n")
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "theirs", cwd=work)
    git("push", "-q", str(remote), "codex/fix-add", cwd=work)
    theirs = git("rev-parse", "HEAD", cwd=work).strip()
    env = api.create_env(str(remote))
    task_id, turn_id, _ = completed_task(
        api, scripted_model, env["id"], "Fix add", [Patch(FIX), Say("Fixed.")]
    )

    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 200, r.text
    branch = r.json()["pull_request"]["head"]
    assert branch.startswith("codex/fix-add-") and len(branch) == len("codex/fix-add-") + 6
    assert git("rev-parse", "codex/fix-add", cwd=remote).strip() == theirs  # untouched

    # the task's branch moves on the remote; the next push does not overwrite it
    git("fetch", "-q", str(remote), f"{branch}:{branch}", cwd=work)
    git("checkout", "-q", branch, cwd=work)
    (work / "later.txt").write_text("later\n")
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "later", cwd=work)
    git("push", "-q", str(remote), branch, cwd=work)
    moved = git("rev-parse", "HEAD", cwd=work).strip()
    scripted_model.script = [Say("(not reached)"), Patch(MORE), Say("More.")]
    follow = api.follow_up(task_id, turn_id, "More")
    assert wait_for_task(api, task_id)["current_assistant_turn"]["turn_status"] == "completed"
    r = api.post(f"tasks/{task_id}/turns/{follow['turn']['id']}/pr")
    assert r.status_code == 409 and "left as it is" in r.json()["detail"], r.text
    assert git("rev-parse", branch, cwd=remote).strip() == moved


SECRET = "tok-push-5ecret-77"


def test_a_change_with_a_secret_is_refused_naming_the_secret_and_file_not_its_value(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    """The recorded diff has [redacted] where the value was: pushing it would be neither
    the agent's change nor safe, and pushing the real one would publish the secret. An
    encoded value counts too (here base64, in a second file)."""
    api = engine_server.api
    remote = bare_remote(tmp_path)
    env = api.create_env(
        str(remote),
        setup=['printf %s "$API_TOKEN" > ~/token.txt'],
        secrets={"API_TOKEN": SECRET},
    )
    script = (
        "printf 'token=%s\\n' \"$(cat ~/token.txt)\" > settings.ini && "
        "base64 ~/token.txt > encoded.txt && echo 'unrelated' > notes.txt && echo written"
    )
    task_id, turn_id, details = completed_task(
        api, scripted_model, env["id"], "Write the settings", [Shell(script), Say("Done.")]
    )
    assert (
        "+token=[redacted]"
        in details["current_assistant_turn"]["output_items"][-1]["output_diff"]["diff"]
    )
    branches_before = git("branch", "--list", cwd=remote)

    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "'API_TOKEN' in 'settings.ini'" in detail and "'API_TOKEN' in 'encoded.txt'" in detail
    assert "notes.txt" not in detail and SECRET not in r.text
    assert git("branch", "--list", cwd=remote) == branches_before  # nothing pushed
    # the record of it is not served
    assert "diff_secrets" not in api.get(f"tasks/{task_id}/turns/{turn_id}").text
    assert "diff_secrets" not in api.get(f"tasks/{task_id}").text


def test_a_change_without_secrets_is_pushed_exactly_even_with_a_redaction_mark_in_it(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    """An environment with secrets, an agent that does not use them: its change (here text
    that merely looks like a redaction) goes to the remote byte for byte."""
    api = engine_server.api
    remote = bare_remote(tmp_path)
    env = api.create_env(str(remote), secrets={"API_TOKEN": SECRET})
    text = "password: [redacted]\nnot a tok-push secret\n"
    task_id, turn_id, _ = completed_task(
        api,
        scripted_model,
        env["id"],
        "Document redaction",
        [Shell(f"printf %s {shlex.quote(text)} > REDACTION.md"), Say("Done.")],
    )
    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 200, r.text
    branch = r.json()["pull_request"]["head"]
    assert git("show", f"{branch}:REDACTION.md", cwd=remote) == text


def test_an_old_attempt_with_redaction_marks_and_no_secret_record_is_not_pushed(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    """Attempts recorded before the engine noted which secrets a change holds: the marks are
    all there is to go by, and pushing them would push ``[redacted]`` files."""
    api = engine_server.api
    remote = bare_remote(tmp_path)
    env = api.create_env(str(remote))
    task_id, turn_id, _ = completed_task(
        api, scripted_model, env["id"], "Mark", [Shell("echo '[redacted]' > x.txt"), Say("Ok.")]
    )
    with engine_server.app_state.db.session() as s:
        row = s.get(m.Turn, turn_id)
        assert row is not None and row.body.get("diff_secrets") == []
        row.body = {k: v for k, v in row.body.items() if k != "diff_secrets"}
    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 409 and "[redacted]" in r.json()["detail"], r.text
