"""The scripted Responses server drives the real, pinned Codex CLI to run commands and edits.

This is the model stand-in every execution test builds on; here it runs Codex directly in a
scratch git repository (the sandboxed runtime comes with the execution engine).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import git
from support.codex_exec import run_codex_exec
from support.scripted_model import Patch, Say, ScriptedModel, Shell

PATCH = "*** Begin Patch\n*** Add File: notes/b.txt\n+bee\n*** End Patch"


@pytest.fixture
def model() -> Iterator[ScriptedModel]:
    server = ScriptedModel().start()
    try:
        yield server
    finally:
        server.stop()


# gpt-5.5 is offered the freeform apply_patch tool; an unknown slug edits through the shell.
@pytest.mark.parametrize("slug", ["gpt-5.5", "openwham-test-model"])
def test_codex_runs_scripted_commands_and_edits(
    model: ScriptedModel, tmp_path: Path, slug: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", cwd=work)
    model.script = [Shell("echo hello > a.txt && cat a.txt"), Patch(PATCH), Say("All done.")]

    events = run_codex_exec(
        tmp_path / "home",
        work,
        base_url=model.url,
        slug=slug,
        key="k-123",
        prompt="Create the files",
    ).events

    assert (work / "a.txt").read_text() == "hello\n"
    assert (work / "notes" / "b.txt").read_text() == "bee\n"
    done = [e["item"] for e in events if e["type"] == "item.completed"]
    commands = [i for i in done if i["type"] == "command_execution"]
    assert commands[0]["aggregated_output"] == "hello\n" and commands[0]["exit_code"] == 0
    changes = [c for i in done if i["type"] == "file_change" for c in i["changes"]]
    assert changes == [{"path": str(work / "notes" / "b.txt"), "kind": "add"}]
    assert [i["text"] for i in done if i["type"] == "agent_message"] == ["All done."]
    assert events[-1]["type"] == "turn.completed"
    assert len(model.requests) == 3
    assert all(h["authorization"] == "Bearer k-123" for h in model.headers)
    assert model.requests[0]["model"] == slug and model.requests[0]["stream"] is True
