"""Claiming an attempt: ``pending → in_progress`` (conditional, so two executors never run
one turn) and the :class:`Claim` the attempt runs from, read in the claiming transaction.

``Claims`` holds what claiming needs (settings, database, bus, this executor's id, the
secrets key); the engine calls it and nothing else writes the claim.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.gitauth import GitAuth
from openwham.service import environments, gitcreds
from openwham.service.diffs import output_diff
from openwham.service.environments import (
    is_reserved_var,
    repo_dirs,
    repo_info,
    repo_url,
    run_environment,
)
from openwham.service.errors import BadRequest
from openwham.service.keys import SecretBox, secrets_key
from openwham.store import events, turnstate
from openwham.store import models as m
from openwham.store.db import Database
from openwham.store.events import EventBus
from openwham.store.status import TurnStatus

from .recorder import latest_event
from .standby import AgentKey
from .titles import TitleJob

SETTING_UP = "Setting up"


@dataclass(frozen=True)
class Resume:
    """Where a follow-up continues: the previous attempt's Codex conversation and tree."""

    previous_turn_id: str
    thread_id: str
    base: str  # the task's original base commit: the follow-up's diff is against it too
    tree: str | None  # the previous attempt's whole change against ``base`` (None: none)
    #: a multi-repository attempt's: each repository's base (``repo_bases`` of the previous
    #: attempt: key -> {dir, branch, sha}) and whole change (key -> diff; unchanged: absent)
    repo_bases: dict[str, dict[str, str]] = field(default_factory=dict)
    repo_trees: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RepoCheckout:
    """One repository of a multi-repository environment: cloned into ``workspace/<dir>``
    at the task's branch where it has that branch, else at its ``default_branch``."""

    key: str
    url: str
    dir: str
    default_branch: str
    auth: GitAuth | None = field(default=None, repr=False)  # host git's, for its remote


@dataclass
class Claim:
    """What an attempt needs, read when it is claimed."""

    task_id: str
    turn_id: str
    body: dict[str, Any]
    prompt: str
    patch: str | None
    branch: str
    repo_key: str
    repo_url: str
    qa_mode: bool
    model: str
    reasoning_effort: str | None
    custom_instructions: str | None
    needs_title: bool
    tries: int
    resume: Resume | str | None = None  # a follow-up's starting point (str: why there is none)
    attempts: int = 1  # the task's attempts for this prompt (best-of-N): standbys to refill
    title: TitleJob | None = None  # the title being made (first attempt of a new task)
    setup_script: str = ""
    env_vars: dict[str, str] = field(default_factory=dict)  # setup and agent
    secrets: dict[str, str] = field(default_factory=dict)  # setup only (decrypted)
    secrets_problem: str | None = None
    #: the post-setup cache (``sandbox.snapshots``): the environment it belongs to ("" for a
    #: deleted one: no cache), whether it is on, and the environment's invalidation key
    env_id: str = ""
    setup_cache: bool = False
    cache_invalidation_key: str = ""
    cache_generation: str = ""  # :func:`cache_generation` of the environment's row
    maintenance_script: str = ""  # run instead of the setup script on a cache hit
    mcp_servers: str = ""  # AgentKey.mcp_servers
    network: str = ""  # AgentKey.network
    git_auth: GitAuth | None = field(default=None, repr=False)  # host git's, for the remote
    run_id: str | None = None  # this claim's fencing token (store.turnstate): the run's writes
    #: every repository of a multi-repository environment, the first one first (``()``: one
    #: repository, which is the workspace itself)
    repos: tuple[RepoCheckout, ...] = ()
    #: the user turn whose prompt the attempt answers (its best-of-N siblings share it)
    prompt_turn_id: str = ""

    @property
    def plain(self) -> bool:
        """No setup script, variables or secrets, one repository: any sandbox for the key
        will do (several repositories get a standby only from a post-setup snapshot)."""
        return not (self.setup_script.strip() or self.env_vars or self.secrets or self.repos)

    @property
    def key(self) -> AgentKey:
        return AgentKey(
            repo_key=self.repo_key,
            repo_url=self.repo_url,
            branch=self.branch,
            qa_mode=self.qa_mode,
            model=self.model,
            reasoning_effort=self.reasoning_effort,
            custom_instructions=self.custom_instructions,
            mcp_servers=self.mcp_servers,
            network=self.network,
        )


def mcp_config(env_body: dict[str, Any]) -> str:
    """The environment's MCP servers as canonical JSON (``""`` without any): part of the
    standby key, so a standby's Codex never runs with another environment's servers."""
    servers = env_body.get("mcp_servers")
    return json.dumps(servers, sort_keys=True, separators=(",", ":")) if servers else ""


def network_config(env_body: dict[str, Any]) -> str:
    """The agent's internet access as canonical JSON (``""`` when off, the default): part of
    the standby key, so a standby never runs under another policy."""
    net = env_body.get("agent_network_access") or {}
    if not isinstance(net, dict) or net.get("mode") != "on":
        return ""
    try:
        domains = environments.allowlist_entries(str(net.get("allowlist_domains") or ""))
    except BadRequest:  # stored before validation was this strict: nothing of it
        domains = []
    preset = net.get("preset_allowlist") or "none"
    config = {
        "preset": preset if preset in environments.NETWORK_PRESETS else "none",
        "domains": sorted(domains),
        "safe_methods_only": bool(net.get("safe_methods_only")),
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


@dataclass
class Claims:
    """Claims pending attempts for one executor (``executor_id`` goes on each claim)."""

    settings: Settings
    db: Database
    bus: EventBus
    executor_id: str
    _box: SecretBox | None = field(default=None, init=False, repr=False)

    def standby_key(self, turn_id: str) -> AgentKey | None:
        """The standby a pending attempt would take, read without claiming it (the queue
        executor routes its job to a worker holding one); ``None`` when it would take none
        (a follow-up, a starting diff, variables, secrets or several repositories without a
        setup script, a setup script without the post-setup cache). An
        environment with a setup script and the cache on: the key of a standby started from
        its snapshot (:func:`standby_setup`, from the row: no secret is decrypted)."""
        with self.db.sessions() as s:
            turn = s.get(m.Turn, turn_id)
            if turn is None or turn.turn_status != TurnStatus.PENDING or not turn.parent_id:
                return None
            task = s.get(m.Task, turn.task_id)
            user_turn = s.get(m.Turn, turn.parent_id)
            if task is None or user_turn is None or user_turn.parent_id:
                return None
            if _inputs(user_turn)[1]:
                return None
            env, env_body = run_environment(s, task, turn)
            script = _script(env_body.get("setup"))
            repos = list(env_body.get("repos") or [])
            cache = dict(env_body.get("cache_settings") or {})
            setup = ""
            if script.strip():
                if env is None or not cache.get("post_setup_cache_enabled"):
                    return None
                generation = cache_generation(env_body, dict(env.secrets))
                maintenance = _script(env_body.get("maintenance_setup"))
                setup = standby_setup(env.id, generation, maintenance)
            else:  # a plain one: one repository, no variables or secrets
                secrets = env is not None and bool(env.secrets)
                if _usable_vars(env_body.get("env_vars")) or secrets or len(repos) > 1:
                    return None
            run = dict(turn.body.get("run") or {})
            repo_key = repos[0] if repos else ""
            info = repo_info(env_body, repo_key)
            user = s.get(m.User, task.user_id)
            instructions = (user.settings or {}).get("custom_instructions") if user else None
            branch = turn.body.get("branch") or task.branch or info.get("default_branch") or ""
            return AgentKey(
                repo_key=repo_key,
                repo_url=repo_url(env_body, repo_key),
                branch=str(branch),
                qa_mode=bool(run.get("qa_mode")),
                model=str(run.get("model") or self.settings.model),
                reasoning_effort=run.get("reasoning_effort"),
                custom_instructions=instructions if isinstance(instructions, str) else None,
                mcp_servers=mcp_config(env_body),
                network=network_config(env_body),
                setup=setup,
            )

    def claim(self, turn_id: str) -> Claim | None:
        """Claim ``turn_id`` and read what it needs; ``None`` when it was not pending."""
        now = time.time()
        with self.db.sessions() as s:  # reads only: the claim is written by the writer
            turn = s.get(m.Turn, turn_id)
            if turn is None or turn.role != "assistant" or turn.turn_status != TurnStatus.PENDING:
                return None
            task = s.get(m.Task, turn.task_id)
            user_turn = s.get(m.Turn, turn.parent_id) if turn.parent_id else None
            assert task is not None
            body = dict(turn.body)
            run = dict(body.get("run") or {})
            tries = int(run.get("tries") or 0) + 1
            run.update(executor=self.executor_id, tries=tries, started_at=now)
            body["run"] = run
            body["latest_event"] = latest_event(SETTING_UP)
            run_id = turnstate.new_run_id()
            prompt, patch = _inputs(user_turn)
            resume = (
                _resume_point(s, user_turn.parent_id)
                if user_turn is not None and user_turn.parent_id
                else None
            )
            env, env_body = run_environment(s, task, turn)
            repos = list(env_body.get("repos") or [])
            repo_key = repos[0] if repos else ""
            info = repo_info(env_body, repo_key)
            user = s.get(m.User, task.user_id)
            instructions = (user.settings or {}).get("custom_instructions") if user else None
            needs_title = (
                not task.has_generated_title
                and turn.attempt_placement in (0, None)
                and task.num_follow_ups == 0
            )
            cache = dict(env_body.get("cache_settings") or {})
            sealed = dict(env.secrets) if env is not None else {}
            url = repo_url(env_body, repo_key)
            credential = gitcreds.match(s, task.account_id, url) if url else None
            checkouts = []
            if len(repos) > 1:
                for key, directory in repo_dirs(env_body).items():
                    each = repo_url(env_body, key)
                    found = gitcreds.match(s, task.account_id, each) if each else None
                    default = str(repo_info(env_body, key).get("default_branch") or "main")
                    checkouts.append((RepoCheckout(key, each, directory, default), found))
            claim = Claim(
                task_id=task.id,
                turn_id=turn_id,
                body=body,
                prompt=prompt,
                patch=patch,
                branch=str(body.get("branch") or task.branch or info.get("default_branch") or ""),
                repo_key=repo_key,
                repo_url=repo_url(env_body, repo_key),
                qa_mode=bool(run.get("qa_mode")),
                model=str(run.get("model") or self.settings.model),
                reasoning_effort=run.get("reasoning_effort"),
                custom_instructions=instructions if isinstance(instructions, str) else None,
                needs_title=needs_title,
                tries=tries,
                resume=resume,
                setup_script=_script(env_body.get("setup")),
                env_vars=_usable_vars(env_body.get("env_vars")),
                env_id=env.id if env is not None else "",
                setup_cache=env is not None and bool(cache.get("post_setup_cache_enabled")),
                cache_invalidation_key=str(cache.get("cache_invalidation_key") or ""),
                cache_generation=cache_generation(env_body, sealed) if env is not None else "",
                maintenance_script=_script(env_body.get("maintenance_setup")),
                attempts=_attempts_for(s, turn),
                mcp_servers=mcp_config(env_body),
                network=network_config(env_body),
                run_id=run_id,
                prompt_turn_id=turn.parent_id or "",
            )

        def write(s: Session) -> bool:
            """The claim, conditional on the attempt still pending (nothing written if not),
            and its first status line: in the group commit with other attempts' writes (the
            claims of a burst share transactions instead of queueing for the lock)."""
            if not turnstate.claim(s, turn_id, body=body, run=run_id, now=now):
                return False
            events.append(
                s,
                claim.task_id,
                turn_id,
                events.TASK_TURN_EVENT,
                events.status_payload(SETTING_UP, TurnStatus.IN_PROGRESS),
            )
            return True

        if not self.db.writes.run(write):
            return None
        self.bus.publish(turn_id)
        try:
            claim.secrets = _usable_vars(self._secret_box().open_all(sealed))
            if credential is not None:
                claim.git_auth = gitcreds.opened(credential, self._secret_box())
            claim.repos = tuple(
                dataclasses.replace(
                    checkout,
                    auth=gitcreds.opened(found, self._secret_box()) if found else None,
                )
                for checkout, found in checkouts
            )
        except RuntimeError as exc:
            claim.secrets_problem = str(exc)
        return claim

    def _secret_box(self) -> SecretBox:
        if self._box is None:
            self._box = SecretBox(secrets_key(self.settings))
        return self._box


def _attempts_for(s: Session, turn: m.Turn) -> int:
    """How many attempts answer ``turn``'s prompt (its best-of-N siblings and itself)."""
    if turn.parent_id is None:
        return 1
    count = s.scalar(
        select(func.count())
        .select_from(m.Turn)
        .where(m.Turn.parent_id == turn.parent_id, m.Turn.role == "assistant")
    )
    return max(1, int(count or 1))


def cache_generation(body: dict[str, Any], sealed: dict[str, Any]) -> str:
    """What an environment's post-setup snapshots depend on, as its row holds it (the
    invalidation key reset-cache changes, the setup script, variables, sealed secrets and
    repositories), hashed: a snapshot records the generation it was taken at, so a worker
    that reads the row can tell its snapshots are stale without the secrets' key
    (``Workspaces.drop_stale_caches``). A secret set again to the value it holds keeps its
    sealed token (``service.environments.update``), so it is no change."""
    cache = dict(body.get("cache_settings") or {})
    parts = {
        "invalidation": str(cache.get("cache_invalidation_key") or ""),
        "enabled": bool(cache.get("post_setup_cache_enabled")),
        "setup": body.get("setup"),
        "env_vars": body.get("env_vars"),
        "secrets": sealed,
        "repos": body.get("repos"),
    }
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def standby_setup(env_id: str, generation: str, maintenance: str) -> str:
    """``AgentKey.setup`` of a standby started from an environment's post-setup snapshot:
    the environment, its cache generation (:func:`cache_generation`: its setup script,
    variables, sealed secrets, repositories and invalidation key) and the maintenance script,
    hashed. The engine (``Workspaces.standby_key``) and the queue's routing
    (``Claims.standby_key``, which decrypts nothing) compute it alike; the worker that takes
    the standby still checks its snapshot is the claim's (the real snapshot key) and fresh."""
    parts = {"environment": env_id, "generation": generation, "maintenance": maintenance}
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _script(value: Any) -> str:
    """A setup or maintenance script as the environment's row holds it (lines), as text."""
    if not value:
        return ""
    return "\n".join(str(x) for x in value) if isinstance(value, list) else str(value)


def _usable_vars(values: Any) -> dict[str, str]:
    """An environment's variables or secrets without the names openwham sets itself (the API
    refuses them; this guards rows written before it did)."""
    if not isinstance(values, dict):
        return {}
    return {
        str(k): str(v)
        for k, v in values.items()
        if isinstance(v, str) and not is_reserved_var(str(k))
    }


def _resume_point(s: Session, previous_turn_id: str) -> Resume | str:
    """Where a follow-up of ``previous_turn_id`` starts, or why it cannot. Its tree is the
    previous attempt's diff (each attempt's diff is against the task's original base, so it
    holds the whole change); an Ask-mode attempt changed nothing, so its tree is the one it
    started from."""
    previous = s.get(m.Turn, previous_turn_id)
    if previous is None or previous.turn_status != TurnStatus.COMPLETED:
        return "The attempt this follow-up continues did not complete"
    thread_id = (previous.body.get("run") or {}).get("thread_id")
    base = previous.body.get("base_commit_sha")
    if not isinstance(thread_id, str) or not thread_id or not isinstance(base, str):
        return "The attempt this follow-up continues kept no Codex session to resume"
    tree: str | None = None
    turn: m.Turn | None = previous
    for _ in range(10_000):  # the chain of follow-ups, newest first
        if turn is None:
            break
        tree = (output_diff(turn.body.get("output_items")) or {}).get("diff")
        if tree or not (turn.body.get("run") or {}).get("qa_mode"):
            break
        user = s.get(m.Turn, turn.parent_id) if turn.parent_id else None
        turn = s.get(m.Turn, user.parent_id) if user is not None and user.parent_id else None
    bases = previous.body.get("repo_bases")
    repo_bases = dict(bases) if isinstance(bases, dict) else {}
    repo_trees: dict[str, str] = {}
    for key, item in ((turn.body.get("repo_diffs") if turn is not None else None) or {}).items():
        if isinstance(item, dict) and isinstance(item.get("diff"), str) and item["diff"]:
            repo_trees[str(key)] = item["diff"]
    return Resume(previous.id, thread_id, base, tree, repo_bases, repo_trees)


def _inputs(user_turn: m.Turn | None) -> tuple[str, str | None]:
    """The prompt text and the ``pre_apply_patch`` diff of a user turn."""
    if user_turn is None:
        return "", None
    texts: list[str] = []
    patch: str | None = None
    for item in user_turn.body.get("input_items") or []:
        if item.get("type") == "message":
            for fragment in item.get("content") or []:
                if isinstance(fragment, str):
                    texts.append(fragment)
                elif isinstance(fragment, dict) and isinstance(fragment.get("text"), str):
                    texts.append(fragment["text"])
        elif item.get("type") == "pre_apply_patch":
            diff = (item.get("output_diff") or {}).get("diff")
            if isinstance(diff, str) and diff:
                patch = diff
    return "\n\n".join(texts), patch
