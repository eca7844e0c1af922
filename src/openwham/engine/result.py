"""An attempt's result: :class:`Results` finishes an attempt from what its agent reported and
the diff (the launcher's, or computed anew in a sandbox of its own), with the PR output item
of its diff; and what its records are cleaned of."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from openwham.gateway import Gateway
from openwham.redaction import Redactor, secrets_in_diff
from openwham.sandbox.bwrap import SandboxResult
from openwham.sandbox.disk import DiskBudget
from openwham.sandbox.provider import SandboxProvider
from openwham.service.diffs import diff_stats
from openwham.store import models as m
from openwham.store.db import Database
from openwham.store.status import TurnStatus

from . import diff as diffs
from .agent import AgentRun, apply_updates
from .claim import Claim
from .control import AttemptFailed, Control, over_disk
from .recorder import TurnRecorder
from .titling import Titles

log = logging.getLogger(__name__)

COMPLETED = "Completed"


@dataclass
class Results:
    """What finishing an attempt needs: the database (the PR item's title), the gateway (the
    attempt's usage and last upstream error), the titles (settled before the terminal event)
    and the sandbox provider (a diff computed anew)."""

    db: Database
    gateway: Gateway
    titles: Titles
    sandbox: SandboxProvider

    def finish(
        self,
        claim: Claim,
        rec: TurnRecorder,
        control: Control,
        agent: AgentRun,
        result: SandboxResult | None,
        base: str,
        attempt_dir: Path,
        disk_budget: DiskBudget | None = None,
        repos: dict[str, dict[str, str]] | None = None,
    ) -> str:
        """Finish the attempt from what the agent reported and the diff the launcher wrote
        (``result`` is ``None`` when the sandbox is still closing down after both).
        ``repos``: a multi-repository workspace's (key -> {dir, branch, sha}): the first
        one's diff is the ``pr`` item as always, and every changed one's is in the turn's
        ``repo_diffs`` (key -> OutputDiff)."""
        translator, run = agent.translator, agent.run
        self.gateway.revoke(claim.turn_id)
        usage = self.gateway.usage(claim.turn_id)
        self.titles.ensure(claim, control=control)
        if claim.title is not None and claim.title.usage is not None:
            run["title_usage"] = claim.title.usage  # the title request's tokens
        # the thread id: a follow-up resumes this conversation (codex.resume_argv)
        killed_reason = result.killed_reason if result is not None else None
        if control.interrupted and result is not None:  # for operators: did it end by itself
            how = "its agent ended the turn" if killed_reason is None else killed_reason
            log.info("attempt %s, interrupted on a cancel: %s", claim.turn_id, how)
        rec.set(run={**run, "usage": dataclasses.asdict(usage), "thread_id": translator.thread_id})
        outcome = translator.finish(
            result.exit_code if result is not None else None,
            killed_reason=killed_reason,
            upstream_error=self.gateway.last_error(claim.turn_id),
            stderr=_without(result.stderr, agent.written_marker) if result is not None else "",
        )
        apply_updates(rec, list(outcome.updates))
        control.check()
        if result is not None and result.disk_reason is not None:
            raise over_disk(result.disk_reason)
        if outcome.status != "completed" and result is not None and result.stalled:
            raise AttemptFailed("sandbox_stalled", f"The agent's sandbox {result.killed_reason}")
        if outcome.status != "completed":
            error = outcome.error
            raise AttemptFailed(
                error.code if error else "agent_error",
                error.message if error else "The agent failed",
            )

        answer = outcome.final_message or ""
        items: list[dict[str, Any]] = []
        if answer:
            items.append(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"content_type": "text", "text": answer}],
                }
            )
        if not claim.qa_mode:
            diff = self._diff(claim, base, attempt_dir, killed_reason, disk_budget, repos)
            named = redactor(self.gateway, claim, named=True)
            if diff.text:
                items.append(pr_item(self.db, claim, base, diff.text, answer))
                # the stored diff is redacted: remember (names and files only) which
                # secrets the real change holds, so a push can refuse it (service.prs)
                rec.set(diff_secrets=secrets_in_diff(named, diff.text))
            if repos:
                title = task_title(self.db, claim)
                changed: dict[str, Any] = {}
                found: list[dict[str, str]] = []
                for i, ((key, repo), text) in enumerate(
                    zip(repos.items(), diff.repos, strict=True)
                ):
                    if text:  # a starting diff is the first repository's
                        patch_base = repo["sha"] if claim.patch and i == 0 else None
                        changed[key] = output_diff(key, repo["sha"], text, title, patch_base)
                        found += [
                            {**f, "file": f"{repo['dir']}/{f['file']}"}
                            for f in secrets_in_diff(named, text)
                        ]
                rec.set(repo_diffs=changed or None, diff_secrets=found)
        control.check()
        return rec.finish(TurnStatus.COMPLETED, text=COMPLETED, output_items=items)

    def _diff(
        self,
        claim: Claim,
        base: str,
        attempt_dir: Path,
        killed_reason: str | None,
        disk_budget: DiskBudget | None,
        repos: dict[str, dict[str, str]] | None = None,
    ) -> diffs.Diff:
        each = [(r["dir"], r["sha"]) for r in (repos or {}).values()]
        try:
            if self.gateway.continued_after_final(claim.turn_id):
                # the launcher's diff started at a response that did not end the turn
                # after all; the sandbox has ended since, so compute it anew
                log.warning("attempt %s: the agent went on after its diff", claim.turn_id)
                return diffs.workspace_diff(
                    attempt_dir / "workspace",
                    base,
                    scratch=attempt_dir,
                    disk=disk_budget,
                    sandbox=self.sandbox,
                    repos=each or None,
                )
            # written by the launcher's `after` script (codex.WRITTEN_MARKER)
            if each:
                out = attempt_dir / "out"
                return diffs.read_results(out, len(each), killed_reason=killed_reason)
            return diffs.read_result(attempt_dir / "out", killed_reason=killed_reason)
        except diffs.DiskExceeded as exc:
            raise over_disk(str(exc)) from exc
        except diffs.DiffError as exc:
            raise AttemptFailed("diff_error", str(exc)) from exc


def _without(text: str, line: str) -> str:
    """``text`` without the lines equal to ``line``."""
    return "\n".join(x for x in text.split("\n") if x != line)


def redactor(gateway: Gateway | None, claim: Claim, *, named: bool = False) -> Redactor:
    """What an attempt's records are cleaned of: the environment's secrets and the model
    upstream's credentials (an upstream error could echo them into Codex's own error), each
    also in its encodings. ``named``: keyed by the secret's name (for ``secrets_in_diff``)."""
    values: dict[str, str] = {}
    upstream = gateway.upstream.secrets() if gateway is not None else []
    for i, value in enumerate(upstream):
        values[f"(the model upstream's credential {i + 1})" if named else value] = value
    for name, value in claim.secrets.items():
        values[name if named else value] = value
    return Redactor(values)


def task_title(db: Database, claim: Claim) -> str:
    with db.sessions() as s:
        return s.scalar(select(m.Task.title).where(m.Task.id == claim.task_id)) or "Changes"


def pr_item(db: Database, claim: Claim, base: str, diff: str, answer: str) -> dict[str, Any]:
    """The ``pr`` output item of a diff, titled by the task."""
    title = task_title(db, claim)
    return {
        "type": "pr",
        "pr_title": title,
        "pr_message": answer,
        "output_diff": output_diff(
            claim.repo_key, base, diff, title, base if claim.patch else None
        ),
    }


def output_diff(
    repo_id: str, base: str, diff: str, title: str, patch_base: str | None
) -> dict[str, Any]:
    """One repository's diff in Codex cloud's OutputDiff shape."""
    stats = diff_stats(diff)
    return {
        "type": "output_diff",
        "repo_id": repo_id,
        "base_commit_sha": base,
        "preapply_patch_base_commit_sha": patch_base,
        "diff": diff,
        "external_storage_diff": None,
        "files_modified": stats.files_modified,
        "lines_added": stats.lines_added,
        "lines_removed": stats.lines_removed,
        "commit_message": title,
    }
