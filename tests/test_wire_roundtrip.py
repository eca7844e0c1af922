"""Every captured WHAM payload parses into openwham.wire models and re-serialises unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from openwham import wire
from openwham.wire import (
    AssistantTurn,
    CodeReviewSettingsPage,
    CreateTaskRequest,
    CreateTaskResponse,
    Environment,
    EnvironmentCreate,
    EnvironmentUpdate,
    EnvironmentWithCreatorAndMachine,
    FollowUp,
    GitHubBranchPage,
    GitHubInstallationEvents,
    GitHubInstallations,
    GitHubInstallationsV2,
    GitHubRepository,
    GitHubUserHandle,
    Machine,
    MessageInputItem,
    MessageOutputItem,
    OutputDiffItem,
    PartialRepoSnapshotItem,
    PreApplyPatchInputItem,
    PrOutputItem,
    RepoSpec,
    SiblingTurnsResponse,
    SuccessResponse,
    TaskDetails,
    TaskFeedPage,
    TaskListPage,
    TaskRateLimit,
    TerminalChunkCitation,
    TextFragment,
    TurnMapping,
    TurnResponse,
    UnknownObject,
    UserPreferencesConfig,
    UserSettings,
    UserSettingsPatch,
    UserTurn,
    WorklogMessage,
)

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "wham-reference"

# file name -> model (or TypeAdapter for bare arrays)
EXAMPLES: dict[str, Any] = {
    "environment_detail.json": Environment,
    "environment_detail_with_creator.json": EnvironmentWithCreatorAndMachine,
    "environments_list.json": TypeAdapter(list[Environment]),
    "environments_recent.json": TypeAdapter(list[Environment]),
    "machines_list.json": TypeAdapter(list[Machine]),
    "rate_limit_plus.json": TaskRateLimit,
    "settings_user.json": UserSettings,
    "sibling_turns_sample.json": SiblingTurnsResponse,
    "task_create_response.json": CreateTaskResponse,
    "task_details_sample.json": TaskDetails,
    "tasks_list_all.json": TaskListPage,
    "tasks_list_archived.json": TaskListPage,
    "tasks_list_current.json": TaskListPage,
    "tasks_list_limit1_all.json": TaskListPage,
    "turn_mapping_sample.json": TurnMapping,
    "turn_viewed_success.json": SuccessResponse,
    "wham-examples_environment-with-creator.json": EnvironmentWithCreatorAndMachine,
    "wham-examples_environments-list.json": TypeAdapter(list[Environment]),
    "wham-examples_github-branches-search.json": GitHubBranchPage,
    "wham-examples_github-installations-events.json": GitHubInstallationEvents,
    "wham-examples_github-installations-v2.json": GitHubInstallationsV2,
    "wham-examples_github-installations.json": GitHubInstallations,
    "wham-examples_github-repository.json": GitHubRepository,
    "wham-examples_machines.json": TypeAdapter(list[Machine]),
    "wham-examples_settings-code-review.json": CodeReviewSettingsPage,
    "wham-examples_settings-config-user-preferences.json": UserPreferencesConfig,
    "wham-examples_settings-user.json": UserSettings,
    "wham-examples_task-bundle.json": TaskDetails,
    "wham-examples_task-suggestions-github-user-handle.json": GitHubUserHandle,
    "wham-examples_task-turn-detail.json": TurnResponse,
    "wham-examples_tasks-list.json": TaskListPage,
    "wham-examples_tasks-rate-limit.json": TaskRateLimit,
    "wham-examples_tasks-response.json": TaskFeedPage,
    "wham-examples_turn-mapping.json": TurnMapping,
}
FIXTURES: dict[str, Any] = {
    "task_details_with_diff.json": TaskDetails,
    "task_details_with_error.json": TaskDetails,
}
NOT_WIRE = {"samples_metadata.json"}  # the capture catalogue of the source repository

CASES = [("examples", n, m) for n, m in EXAMPLES.items()] + [
    ("openai-codex-fixtures", n, m) for n, m in FIXTURES.items()
]

# Unknown keys that samples legitimately carry inside known models (everything else must be
# a declared field, so a misspelt field name in a model shows up here).
ALLOWED_EXTRAS = {
    ("WorklogMessageMetadata", "l1239dk1"),
    ("Machine", "limits"),  # synthetic sample: machine {label, limits{cpu, memory_gb}}
}


def _load(folder: str, name: str) -> Any:
    return json.loads((REFERENCE / folder / name).read_text(encoding="utf-8"))


def _parse(model: Any, data: Any) -> Any:
    if isinstance(model, TypeAdapter):
        return model.validate_python(data)
    return model.model_validate(data)


def _dump(model: Any, value: Any) -> Any:
    opts: dict[str, Any] = {"mode": "json", "by_alias": True, "exclude_unset": True}
    if isinstance(model, TypeAdapter):
        return model.dump_python(value, **opts)
    return value.model_dump(**opts)


def _walk(value: Any) -> list[BaseModel]:
    """Every model instance inside ``value`` (depth first)."""
    found: list[BaseModel] = []
    stack = [value]
    while stack:
        cur = stack.pop()
        if isinstance(cur, BaseModel):
            found.append(cur)
            stack.extend(getattr(cur, f) for f in type(cur).model_fields)
        elif isinstance(cur, list | tuple):
            stack.extend(cur)
        elif isinstance(cur, dict):
            stack.extend(cur.values())
    return found


def test_reference_folder_is_complete() -> None:
    """Every JSON file shipped in the reference folders is covered by the mapping below."""
    ref = REFERENCE
    for folder, mapping in (("examples", EXAMPLES), ("openai-codex-fixtures", FIXTURES)):
        present = {p.name for p in (ref / folder).glob("*.json")}
        assert present - NOT_WIRE == set(mapping), f"unmapped or missing files in {folder}"


@pytest.mark.parametrize(("folder", "name", "model"), CASES, ids=[c[1] for c in CASES])
def test_roundtrip(folder: str, name: str, model: Any) -> None:
    data = _load(folder, name)
    parsed = _parse(model, data)
    assert _dump(model, parsed) == data


@pytest.mark.parametrize(("folder", "name", "model"), CASES, ids=[c[1] for c in CASES])
def test_known_models_declare_sample_fields(folder: str, name: str, model: Any) -> None:
    parsed = _parse(model, _load(folder, name))
    extras = {
        (type(obj).__name__, key)
        for obj in _walk(parsed)
        if not isinstance(obj, UnknownObject)
        for key in obj.model_extra or {}
    }
    assert extras <= ALLOWED_EXTRAS


def test_task_details_sample_picks_specific_classes() -> None:
    details = TaskDetails.model_validate(_load("examples", "task_details_sample.json"))
    user = details.current_user_turn
    assert isinstance(user, UserTurn)
    assert isinstance(user.input_items[0], MessageInputItem)
    assert isinstance(user.input_items[0].content[0], TextFragment)
    turn = details.current_assistant_turn
    assert isinstance(turn, AssistantTurn)
    message, snapshot = turn.output_items
    assert isinstance(message, MessageOutputItem)
    assert isinstance(snapshot, PartialRepoSnapshotItem)
    assert [type(f) for f in message.content] == [
        TextFragment,
        TerminalChunkCitation,
        TextFragment,
    ]
    assert turn.worklog.messages
    assert all(isinstance(m, WorklogMessage) for m in turn.worklog.messages)
    code = turn.worklog.messages[2]
    assert code.content.content_type == "code" and code.channel == "analysis"
    assert turn.environment is not None and turn.environment.repo_map
    assert turn.logs is not None and turn.logs.logs[0].key.type == "UserSetupScript"
    assert turn.proxy_events and turn.proxy_events[0].domain == "registry.npmjs.org"


def test_task_bundle_pre_apply_patch_and_error() -> None:
    details = TaskDetails.model_validate(_load("examples", "wham-examples_task-bundle.json"))
    assert details.current_user_turn is not None
    patch = details.current_user_turn.input_items[1]
    assert isinstance(patch, PreApplyPatchInputItem)
    assert patch.output_diff.diff.startswith("diff --git")
    assert patch.output_diff.external_storage_diff is not None
    turn = details.current_assistant_turn
    assert turn is not None and turn.error is not None
    assert turn.error.code == "failed_to_apply_patch_error"


def test_official_client_fixtures_pick_specific_classes() -> None:
    with_error = TaskDetails.model_validate(
        _load("openai-codex-fixtures", "task_details_with_error.json")
    )
    assert with_error.current_assistant_turn is not None
    (pr,) = with_error.current_assistant_turn.output_items
    assert isinstance(pr, PrOutputItem)
    assert pr.output_diff.diff.startswith("diff --git")
    assert with_error.current_assistant_turn.error is not None
    assert with_error.current_assistant_turn.error.code == "APPLY_FAILED"

    with_diff = TaskDetails.model_validate(
        _load("openai-codex-fixtures", "task_details_with_diff.json")
    )
    assert with_diff.current_diff_task_turn is not None
    (diff_item,) = with_diff.current_diff_task_turn.output_items
    assert isinstance(diff_item, OutputDiffItem) and diff_item.diff
    assert with_diff.current_assistant_turn is not None
    assert isinstance(with_diff.current_assistant_turn.output_items[0], MessageOutputItem)


def test_turn_mapping_discriminates_turns() -> None:
    mapping = TurnMapping.model_validate(_load("examples", "turn_mapping_sample.json"))
    kinds = sorted(type(e.turn).__name__ for e in mapping.turn_mapping.values())
    assert kinds == ["AssistantTurn"] * 4 + ["UserTurn"]
    placements = sorted(
        e.turn.attempt_placement
        for e in mapping.turn_mapping.values()
        if isinstance(e.turn, AssistantTurn)
    )
    assert placements == [0, 1, 2, 3]


def test_unknown_item_types_survive_roundtrip() -> None:
    data = {
        "id": "task_e_1~assttrn_e_1",
        "output_items": [
            {"type": "hologram", "payload": {"x": [1, 2]}, "note": None},
            {"type": "message", "content": ["bare", {"content_type": "sticker", "id": 7}]},
        ],
        "input_items": [{"type": "voice_memo", "seconds": 3}],
        "brand_new_field": {"nested": True},
    }
    turn = AssistantTurn.model_validate(data)
    assert isinstance(turn.output_items[0], UnknownObject)
    assert isinstance(turn.input_items[0], UnknownObject)
    message = turn.output_items[1]
    assert isinstance(message, MessageOutputItem)
    assert message.content[0] == "bare"
    assert isinstance(message.content[1], UnknownObject)
    out = turn.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert out == data


def test_follow_up_accepts_previous_turn_id() -> None:
    by_alias = FollowUp.model_validate({"task_id": "task_e_1", "previous_turn_id": "t~a"})
    assert by_alias.turn_id == "t~a"
    assert by_alias.model_dump(mode="json", by_alias=True) == {
        "task_id": "task_e_1",
        "turn_id": "t~a",
    }
    assert FollowUp.model_validate({"task_id": "x", "turn_id": "y"}).turn_id == "y"
    req = CreateTaskRequest.model_validate(
        {
            "follow_up": {"task_id": "task_e_1", "previous_turn_id": "t~a"},
            "input_items": [{"type": "message", "role": "user", "content": ["hi"]}],
        }
    )
    assert req.follow_up is not None and req.follow_up.turn_id == "t~a"
    assert isinstance(req.input_items[0], MessageInputItem)


# Field list of wham-api.md §4.3.
ASSISTANT_TURN_KEYS = {
    "type",
    "id",
    "role",
    "attempt_placement",
    "sibling_turn_ids",
    "turn_status",
    "input_items",
    "output_items",
    "worklog",
    "error",
    "latest_event",
    "child_turns",
    "conversation_id",
    "pull_request_status",
    "pull_request_data",
    "created_at",
    "internal_only_rollouts",
    "environment_id",
    "environment",
    "branch",
    "base_commit_sha",
    "previous_turn_id",
    "logs",
    "proxy_events",
    "debug_metadata",
    "discarded",
}


def test_server_constructed_assistant_turn_emits_every_field() -> None:
    turn = AssistantTurn(
        id="task_e_1~assttrn_e_1",
        turn_status="completed",
        output_items=[
            MessageOutputItem(content=[TextFragment(text="done")]),
            PrOutputItem(pr_title="t", pr_message="m"),
        ],
    )
    out = turn.model_dump(mode="json")
    assert set(out) >= ASSISTANT_TURN_KEYS
    assert out["type"] == "assistant" and out["role"] == "assistant"
    assert out["pull_request_status"] == "not_created"
    assert out["worklog"] == {"messages": []}
    assert out["output_items"][0] == {
        "type": "message",
        "role": "assistant",
        "content": [{"content_type": "text", "text": "done"}],
    }
    assert out["output_items"][1]["output_diff"]["type"] == "output_diff"


def test_create_task_response_rate_limit_without_windows() -> None:
    resp = CreateTaskResponse.model_validate(_load("examples", "task_create_response.json"))
    out = resp.model_dump(mode="json", exclude={"rate_limit": {"windows"}})
    assert "windows" not in out["rate_limit"]
    assert out["rate_limit"]["user_plan_type"] == "plus"


def test_environment_create_is_strict() -> None:
    ok = EnvironmentCreate.model_validate(
        {"label": "demo", "repos": ["/srv/git/demo", {"url": "https://x/y.git", "name": "o/r"}]}
    )
    assert [type(r) for r in ok.repos] == [str, RepoSpec]
    assert [r.url for r in ok.repo_specs()] == ["/srv/git/demo", "https://x/y.git"]
    with pytest.raises(ValidationError):
        EnvironmentCreate.model_validate({"label": "demo", "repos": ["/r"], "env_var": {}})
    with pytest.raises(ValidationError):
        EnvironmentCreate.model_validate({"label": "demo", "repos": [{"url": "/r", "nmae": "x"}]})
    with pytest.raises(ValidationError):
        EnvironmentCreate.model_validate({"label": "", "repos": ["/r"]})
    with pytest.raises(ValidationError):
        EnvironmentCreate.model_validate({"label": "demo", "repos": []})
    with pytest.raises(ValidationError):
        EnvironmentCreate.model_validate({"label": "demo", "repos": ["/r"] * 11})


def test_environment_update_is_strict_and_partial() -> None:
    patch = EnvironmentUpdate.model_validate({"secrets": {"A": None, "B": "v"}})
    assert patch.model_fields_set == {"secrets"}
    assert patch.secrets == {"A": None, "B": "v"}
    with pytest.raises(ValidationError):
        EnvironmentUpdate.model_validate({"lable": "typo"})


def test_user_settings_patch_limits() -> None:
    assert UserSettingsPatch.model_validate({"branch_format": "x" * 100}).branch_format
    with pytest.raises(ValidationError):
        UserSettingsPatch.model_validate({"branch_format": "x" * 101})
    with pytest.raises(ValidationError):
        UserSettingsPatch.model_validate({"custom_instructions": "x" * 100_001})
    with pytest.raises(ValidationError):
        UserSettingsPatch.model_validate({"alpha_opt_in": True, "unknown": 1})


def test_everything_is_exported() -> None:
    for name in wire.__all__:
        assert hasattr(wire, name), name
    models = {
        name
        for module in (
            wire.common,
            wire.content,
            wire.items,
            wire.worklog,
            wire.turns,
            wire.tasks,
            wire.environments,
            wire.usage,
            wire.settings,
            wire.accounts,
            wire.requests,
            wire.github,
        )
        for name, obj in vars(module).items()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == module.__name__
    }
    assert models <= set(wire.__all__)
