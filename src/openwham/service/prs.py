"""PR branches: what ``POST tasks/{id}/turns/{turn_id}/pr`` pushes, and how it is recorded.

The push itself (a commit of the attempt's diff on its base, sent to the environment's git
remote) is the engine's (``engine.prs``); this module decides the branch and the commit's
parent and message before it, and records the result after it. One task has one branch:
the first push names it from the user's ``branch_format``; pushing a later attempt (a
follow-up, another attempt of best-of-N) adds a commit on top of the last one pushed, whose
tree is that attempt's whole change, so the branch always shows the chosen attempt's result
and its history shows what was pushed when.

The push alone records ``pull_request.state`` ``"pushed"`` and ``number`` ``0``; with a
forge connection ``commands.prs`` then opens the pull request and :func:`record_forge` puts
the forge's number, URL and state in its place.

A push is idempotent across crashes: before git talks to the remote, the plan (branch, parent
and commit time) is kept on the task (:func:`reserve`, ``pr_push``). A server killed after the
push but before :func:`record` leaves it there; asking again for the same attempt reuses it,
so the commit is the same object and goes to the same branch (a no-op on the remote if the
first push got through), instead of a second branch for the same change. Asking for another
attempt of the task finishes the cut-short push first (:func:`unfinished`), so the new commit
goes on top of it on the same branch.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from openwham.redaction import MARK
from openwham.store import models as m
from openwham.store.status import TurnStatus

from . import settings as user_settings
from .accounts import Principal
from .diffs import output_diff
from .environments import repo_url, run_environment
from .errors import BadRequest, Conflict, ServiceError
from .repos import validate_branch_name
from .tasks import get_task_row, get_turn_row
from .text import shorten

FEATURE_CHARS = 60
BRANCH_CHARS = 60
_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]+")


def _slug(text: str, limit: int) -> str:
    """``text`` as a branch-name part: lower case, ``-`` between words, at most ``limit``."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = ""
    for word in words:
        candidate = f"{out}-{word}" if out else word
        if len(candidate) > limit:
            break
        out = candidate
    return out or (words[0][:limit] if words else "changes")


def _safe_ref_part(text: str, limit: int) -> str:
    part = _UNSAFE.sub("-", text)[:limit]
    part = re.sub(r"\.{2,}|/{2,}|@\{", "-", part).strip("./-")
    return part.removesuffix(".lock") or "branch"


def branch_name(fmt: str, *, title: str, base_branch: str, now: float) -> str:
    """The branch a task's change is pushed to, from a ``branch_format`` like
    ``codex/{feature}`` (placeholders as ``settings/configs/user-preferences`` lists them)."""
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    alphabet = string.ascii_lowercase + string.digits
    values = {
        "{feature}": _slug(title, FEATURE_CHARS),
        "{branch}": _safe_ref_part(base_branch, BRANCH_CHARS),
        "{uuid}": "".join(secrets.choice(alphabet) for _ in range(6)),
        "{ts}": str(int(now)),
        "{date}": when.strftime("%Y-%m-%d"),
        "{time}": when.strftime("%H-%M-%S"),
    }
    name = fmt
    for token, value in values.items():
        name = name.replace(token, value)
    name = name.strip("/")
    try:
        return validate_branch_name(name)
    except BadRequest:
        return f"codex/{values['{feature}']}"


@dataclass(frozen=True)
class PushPlan:
    """Everything the engine needs to push one attempt's change."""

    task_id: str
    turn_id: str
    repo_key: str
    repo_url: str
    base: str
    diff: str
    parent: str | None  # the last commit pushed for this task, or None (then: base)
    branch: str
    new_branch: bool
    message: str
    author: tuple[str, str]
    at: float  # the commit's author and committer time: a retried push makes the same commit
    existing: dict[str, Any] | None = None  # this attempt is what the branch holds already
    #: one repository of a multi-repository attempt (``plans``): its branch's base, and the
    #: ``external_pull_requests`` entry its push is recorded as; ``""``: a single repository
    base_branch: str = ""
    entry_id: str = ""


def plans(db: Session, principal: Principal, task_id: str, turn_id: str) -> list[PushPlan]:
    """What pushing the attempt takes: one plan (:func:`plan`) for a single repository, else
    one per repository the attempt changed (:func:`_repo_plans`), in the environment's order."""
    task = get_task_row(db, principal, task_id)
    turn = get_turn_row(db, task, turn_id)
    if isinstance(turn.body.get("repo_bases"), dict):
        return _repo_plans(db, principal, task, turn)
    return [plan(db, principal, task_id, turn_id)]


def entry_id(task_id: str, repo_key: str = "") -> str:
    """The ``external_pull_requests`` entry of a task (of one of its repositories)."""
    base = f"pr_{task_id.removeprefix('task_e_')[:24]}"
    return f"{base}-{repo_key.removeprefix('repo-')[:12]}" if repo_key else base


def _repo_plans(db: Session, principal: Principal, task: m.Task, turn: m.Turn) -> list[PushPlan]:
    """A multi-repository attempt's pushes: every changed repository (its ``repo_diffs``)
    gets a commit on one branch of the task's name, on top of what the task pushed there
    before (``repo_pushes``: key -> branch and commit). A push a crash cut short
    (``pr_push`` with ``repos``) is planned again the same way."""
    if turn.role != "assistant":
        raise BadRequest("A PR is made from an assistant turn (an attempt), not a user turn")
    if turn.turn_status != TurnStatus.COMPLETED:
        raise Conflict(f"Turn {turn.turn_status}: only a completed attempt has a change to push")
    bases = turn.body.get("repo_bases") or {}
    changed = {
        str(k): v
        for k, v in (turn.body.get("repo_diffs") or {}).items()
        if isinstance(v, dict) and isinstance(v.get("diff"), str) and v["diff"]
    }
    if not changed:
        raise Conflict("This attempt changed no files: there is nothing to push")
    _refuse_secrets(turn, "\n".join(v["diff"] for v in changed.values()))
    _, env_body = run_environment(db, task, turn)
    pushed = task.body.get("repo_pushes")
    pushes: dict[str, Any] = dict(pushed) if isinstance(pushed, dict) else {}
    unfinished = task.body.get("pr_push")
    again = (
        isinstance(unfinished, dict)
        and unfinished.get("turn_id") == turn.id
        and isinstance(unfinished.get("repos"), dict)
        and isinstance(unfinished.get("at"), int | float)
    )
    done = task.body.get("last_pushed_turn_id") == turn.id and not again
    title = task.title or "Changes"
    at = float(unfinished["at"]) if again and isinstance(unfinished, dict) else time.time()
    name = task.body.get("pushed_branch_name")
    if not isinstance(name, str) or not name:
        fmt = user_settings.get(principal).branch_format or "codex/{feature}"
        base_branch = str(turn.body.get("branch") or task.branch or "")
        name = branch_name(fmt, title=title, base_branch=base_branch or "main", now=at)
    entries = {
        str(e.get("id")): e
        for e in task.body.get("external_pull_requests") or []
        if isinstance(e, dict)
    }
    message = f"{title}\n\n{conversation_body(db, turn)}".strip() + "\n"
    user = principal.user
    out = []
    keys = [str(k) for k in env_body.get("repos") or []]
    for key in sorted(changed, key=lambda k: keys.index(k) if k in keys else len(keys)):
        item, base_info = changed[key], bases.get(key) or {}
        url = repo_url(env_body, key)
        if not url:
            raise Conflict(
                f"The repository {key} this attempt changed is no longer in the environment"
            )
        state: dict[str, Any] = pushes[key] if isinstance(pushes.get(key), dict) else {}
        if again and isinstance(unfinished, dict):
            reserved = unfinished["repos"].get(key) or {}
            branch = str(reserved.get("branch") or name)
            new, parent = bool(reserved.get("new_branch")), reserved.get("parent")
        elif state.get("branch"):
            branch, new, parent = str(state["branch"]), False, state.get("commit")
        else:
            branch, new, parent = name, True, None
        eid = entry_id(task.id, key)
        out.append(
            PushPlan(
                task_id=task.id,
                turn_id=turn.id,
                repo_key=key,
                repo_url=url,
                base=str(item.get("base_commit_sha") or base_info.get("sha") or ""),
                diff=item["diff"],
                parent=parent if isinstance(parent, str) and parent else None,
                branch=branch,
                new_branch=new,
                message=message,
                author=(user.name or "openwham", user.email or "openwham@localhost"),
                at=at,
                existing=entries.get(eid) if done else None,
                base_branch=str(base_info.get("branch") or ""),
                entry_id=eid,
            )
        )
    return out


def plan(db: Session, principal: Principal, task_id: str, turn_id: str) -> PushPlan:
    """Check that the attempt has a change to push and decide branch, parent and message."""
    task = get_task_row(db, principal, task_id)
    turn = get_turn_row(db, task, turn_id)
    if turn.role != "assistant":
        raise BadRequest("A PR is made from an assistant turn (an attempt), not a user turn")
    if turn.turn_status != TurnStatus.COMPLETED:
        raise Conflict(f"Turn {turn.turn_status}: only a completed attempt has a change to push")
    diff_item = output_diff(turn.body.get("output_items")) or {}
    diff, base = diff_item.get("diff"), diff_item.get("base_commit_sha")
    if not isinstance(diff, str) or not diff or not isinstance(base, str):
        raise Conflict("This attempt changed no files: there is nothing to push")
    _refuse_secrets(turn, diff)
    _, env_body = run_environment(db, task, turn)
    repo_key = str(diff_item.get("repo_id") or (env_body.get("repos") or [""])[0])
    url = repo_url(env_body, repo_key)
    if not url:
        raise Conflict("The environment of this task has no git remote to push to")
    pushed = task.body.get("pushed_branch_name")
    parent = task.body.get("last_pushed_commit")
    existing = None
    if task.body.get("last_pushed_turn_id") == turn.id:
        existing = next(iter(task.body.get("external_pull_requests") or []), None)
    title = task.title or "Changes"
    at = time.time()
    unfinished = task.body.get("pr_push")
    if (
        existing is None
        and isinstance(unfinished, dict)
        and unfinished.get("turn_id") == turn.id
        and isinstance(unfinished.get("branch"), str)
        and isinstance(unfinished.get("at"), int | float)
    ):  # a push of this attempt that a crash cut short: the same branch, parent and commit
        branch, new = unfinished["branch"], bool(unfinished.get("new_branch"))
        parent, at = unfinished.get("parent"), float(unfinished["at"])
    elif isinstance(pushed, str) and pushed:
        branch, new = pushed, False
    else:
        fmt = user_settings.get(principal).branch_format or "codex/{feature}"
        base_branch = str(turn.body.get("branch") or task.branch or base)
        branch, new = branch_name(fmt, title=title, base_branch=base_branch, now=at), True
        parent = None
    message = f"{title}\n\n{conversation_body(db, turn)}".strip() + "\n"
    user = principal.user
    return PushPlan(
        task_id=task.id,
        turn_id=turn.id,
        repo_key=repo_key,
        repo_url=url,
        base=base,
        diff=diff,
        parent=parent if isinstance(parent, str) and parent else None,
        branch=branch,
        new_branch=new,
        message=message,
        author=(user.name or "openwham", user.email or "openwham@localhost"),
        at=at,
        existing=existing,
    )


def unfinished(
    db: Session, principal: Principal, task_id: str, turn_id: str
) -> list[PushPlan] | None:
    """The push of another attempt of this task that a crash cut short, to finish before
    pushing ``turn_id`` (the branch may hold its commit already: the next one goes on top);
    ``None`` if there is none, or it can no longer be pushed (then it is dropped)."""
    task = get_task_row(db, principal, task_id)
    earlier = task.body.get("pr_push")
    if not isinstance(earlier, dict) or earlier.get("turn_id") in (None, turn_id):
        return None
    try:
        return plans(db, principal, task_id, str(earlier["turn_id"]))
    except ServiceError:  # deleted, no longer completed, holds a secret: nothing to finish
        drop_unfinished(db, principal, task_id)
        return None


def drop_unfinished(db: Session, principal: Principal, task_id: str) -> None:
    """Forget a push a crash cut short (the caller commits)."""
    task = get_task_row(db, principal, task_id)
    task.body = {k: v for k, v in task.body.items() if k != "pr_push"}


def reserve_all(db: Session, principal: Principal, plans_: list[PushPlan]) -> None:
    """:func:`reserve` for a multi-repository attempt's plans: all of them at once, before
    the first push (their turn, time and each repository's branch and parent)."""
    if not plans_ or not plans_[0].entry_id:
        for one in plans_:
            reserve(db, principal, one)
        return
    task = get_task_row(db, principal, plans_[0].task_id)
    task.body = {
        **task.body,
        "pr_push": {
            "turn_id": plans_[0].turn_id,
            "at": plans_[0].at,
            "repos": {
                p.repo_key: {"branch": p.branch, "new_branch": p.new_branch, "parent": p.parent}
                for p in plans_
            },
        },
    }


def reserve(db: Session, principal: Principal, plan_: PushPlan) -> None:
    """Keep the plan on the task before pushing (the caller commits), so that a push a crash
    cut short is finished the same way when it is asked for again (:func:`plan`)."""
    task = get_task_row(db, principal, plan_.task_id)
    task.body = {
        **task.body,
        "pr_push": {
            "turn_id": plan_.turn_id,
            "branch": plan_.branch,
            "new_branch": plan_.new_branch,
            "parent": plan_.parent,
            "at": plan_.at,
        },
    }


def _refuse_secrets(turn: m.Turn, diff: str) -> None:
    """409 when the attempt's change holds a secret's value (in any encoding the redactor
    knows). The stored diff has ``[redacted]`` in its place, which is not the agent's change,
    and pushing the value would publish the secret: neither is pushed. The engine recorded
    which secrets and files (``diff_secrets``, names only) when the attempt finished; an
    attempt recorded before that is judged by the redaction marks in its diff. A change
    without secrets is the stored diff exactly as the agent made it."""
    found = turn.body.get("diff_secrets")
    if isinstance(found, list) and found:
        where = "; ".join(
            f"secret {str(f.get('secret'))!r} in {str(f.get('file'))!r}"
            for f in found[:10]
            if isinstance(f, dict)
        )
        raise Conflict(
            f"This change contains the value of an environment secret ({where}), so it is "
            "not pushed: remove the secret from the change (a follow-up can) and push that"
        )
    if found is None and MARK in diff:
        raise Conflict(
            f"This change has {MARK} where a secret's value was; it was recorded before "
            "openwham kept track of which secret, and is not pushed: run the task again"
        )


PROMPT_LABEL_CHARS = 72


def _answer(turn: m.Turn) -> str:
    """An attempt's final answer: its ``message`` output item (else the ``pr`` item's)."""
    items = [i for i in turn.body.get("output_items") or [] if isinstance(i, dict)]
    for item in items:
        if item.get("type") == "message":
            parts = [
                str(c.get("text") or "")
                for c in item.get("content") or []
                if isinstance(c, dict) and c.get("content_type", "text") == "text"
            ]
            if any(parts):
                return "\n".join(p for p in parts if p).strip()
    return next(
        (str(i.get("pr_message") or "").strip() for i in items if i.get("type") == "pr"), ""
    )


def _prompt(user: m.Turn) -> str:
    """A user turn's prompt as one line for a label, cut at a word with "…"."""
    texts = []
    for item in user.body.get("input_items") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            for frag in item.get("content") or []:
                text = frag if isinstance(frag, str) else (frag or {}).get("text")
                if isinstance(text, str):
                    texts.append(text)
    return shorten(" ".join(texts), PROMPT_LABEL_CHARS)


def conversation_body(db: Session, turn: m.Turn) -> str:
    """The commit body for ``turn``: every answer of the conversation that led to it, in
    order. A task without follow-ups has just its answer; with follow-ups each answer is
    introduced by the prompt it answered (``Prompt: …``), so the branch's commit tells the
    whole story, not only the last step."""
    steps: list[tuple[str, str]] = []
    seen: set[str] = set()
    current: m.Turn | None = turn
    while current is not None and current.id not in seen and current.role == "assistant":
        seen.add(current.id)
        user = db.get(m.Turn, current.parent_id) if current.parent_id else None
        steps.append((_prompt(user) if user is not None else "", _answer(current)))
        current = db.get(m.Turn, user.parent_id) if user is not None and user.parent_id else None
    steps.reverse()
    if len(steps) == 1:
        return steps[0][1]
    return "\n\n".join(
        f"Prompt: {prompt}\n\n{answer}".rstrip() if prompt else answer for prompt, answer in steps
    )


def record(
    db: Session, principal: Principal, plan_: PushPlan, *, branch: str, commit: str
) -> dict[str, Any]:
    """Store the pushed branch on the task (``external_pull_requests``, the metadata's
    ``pushed_branch_name`` / ``last_pushed_turn_id``) and the turn; returns the entry."""
    task = get_task_row(db, principal, plan_.task_id)
    turn = get_turn_row(db, task, plan_.turn_id)
    pull_request = {
        "number": 0,
        "url": plan_.repo_url,
        "state": "pushed",
        "merged": False,
        "mergeable": False,
        "draft": False,
        "title": task.title,
        "body": plan_.message.split("\n\n", 1)[1].strip() if "\n\n" in plan_.message else "",
        "base": plan_.base_branch or str(turn.body.get("branch") or task.branch or ""),
        "head": branch,
        "base_sha": plan_.base,
        "head_sha": commit,
    }
    entry = {
        "id": plan_.entry_id or entry_id(plan_.task_id),
        "assistant_turn_id": plan_.turn_id,
        "pull_request": pull_request,
        "codex_updated_sha": commit,
    }
    if plan_.entry_id:
        return _record_repo(db, task, turn, plan_, entry)
    body = dict(task.body)
    body.pop("pr_push", None)
    body.update(
        external_pull_requests=[entry],
        pushed_branch_name=branch,
        last_pushed_turn_id=plan_.turn_id,
        last_pushed_commit=commit,
    )
    task.body = body
    task.updated_at = time.time()
    turn.body = {**turn.body, "pull_request_status": "pushed", "pull_request_data": pull_request}
    return entry


def _record_repo(
    db: Session, task: m.Task, turn: m.Turn, plan_: PushPlan, entry: dict[str, Any]
) -> dict[str, Any]:
    """One repository's push of a multi-repository attempt: its entry replaces the one of
    the same id in ``external_pull_requests`` (kept in the environment's order, a forge's
    number and URL kept: the push updates that pull request), ``repo_pushes`` keeps its
    branch and commit. ``pr_push`` stays until :func:`finish_repos`."""
    pull_request = entry["pull_request"]
    entries = [e for e in task.body.get("external_pull_requests") or [] if isinstance(e, dict)]
    old = next((e for e in entries if e.get("id") == entry["id"]), None)
    if old is not None and int((old.get("pull_request") or {}).get("number") or 0) > 0:
        kept = {k: v for k, v in old["pull_request"].items() if k in ("number", "url", "state")}
        entry = {**entry, "pull_request": {**pull_request, **kept}}
    if old is None:
        entries.append(entry)
    else:
        entries[entries.index(old)] = entry
    pushes = dict(task.body.get("repo_pushes") or {})
    pushes[plan_.repo_key] = {
        "branch": entry["pull_request"]["head"],
        "commit": entry["codex_updated_sha"],
    }
    task.body = {**task.body, "external_pull_requests": entries, "repo_pushes": pushes}
    task.updated_at = time.time()
    return entry


def finish_repos(db: Session, principal: Principal, plans_: list[PushPlan]) -> None:
    """Every repository of a multi-repository attempt is pushed: the task says so (its
    ``pushed_branch_name``, ``last_pushed_turn_id``; the attempt's ``pull_request_status``
    and first entry), and the reservation goes."""
    if not plans_ or not plans_[0].entry_id:
        return
    task = get_task_row(db, principal, plans_[0].task_id)
    turn = get_turn_row(db, task, plans_[0].turn_id)
    entries = [e for e in task.body.get("external_pull_requests") or [] if isinstance(e, dict)]
    mine = [e for e in entries if e.get("assistant_turn_id") == turn.id]
    first = (mine or entries or [{}])[0].get("pull_request") or {}
    body = {k: v for k, v in task.body.items() if k != "pr_push"}
    body.update(
        pushed_branch_name=body.get("pushed_branch_name") or plans_[0].branch,
        last_pushed_turn_id=turn.id,
    )
    task.body = body
    turn.body = {
        **turn.body,
        "pull_request_status": first.get("state") or "pushed",
        "pull_request_data": first,
    }


# --------------------------------------------------------------------------- forge pull requests

FORGE_KEY = "forge_pr"  # task.body: the forge's pull request (not rendered)


FORGE_REPOS_KEY = "forge_prs"  # task.body: a multi-repository task's, by repository key


def forge_pr(
    db: Session, principal: Principal, task_id: str, repo_key: str = ""
) -> dict[str, Any] | None:
    """The forge pull request recorded for the task (connection, repository, number); with
    ``repo_key``, for that repository of a multi-repository task."""
    task = get_task_row(db, principal, task_id)
    found = (
        (task.body.get(FORGE_REPOS_KEY) or {}).get(repo_key)
        if repo_key
        else task.body.get(FORGE_KEY)
    )
    return dict(found) if isinstance(found, dict) else None


def forge_records(task: m.Task) -> list[tuple[str, dict[str, Any]]]:
    """Every forge pull request recorded for the task: ``("", record)`` for a single
    repository's, ``(repo key, record)`` for each of a multi-repository task's."""
    out: list[tuple[str, dict[str, Any]]] = []
    single = task.body.get(FORGE_KEY)
    if isinstance(single, dict):
        out.append(("", dict(single)))
    for key, record_ in (task.body.get(FORGE_REPOS_KEY) or {}).items():
        if isinstance(record_, dict):
            out.append((str(key), dict(record_)))
    return out


def pr_text(db: Session, task: m.Task, turn: m.Turn, link: str | None) -> tuple[str, str]:
    """A pull request's title (the task's) and body: the agent's answers along the chain,
    then a link back to the task."""
    body = conversation_body(db, turn).strip()
    if link:
        body = f"{body}\n\n---\nOpened by openwham from task {link}".strip()
    return task.title or "Changes", body


def record_forge(
    db: Session,
    task: m.Task,
    turn_id: str | None,
    *,
    connection_id: str,
    repo_path: str,
    pr: dict[str, Any],
    now: float,
    repo_key: str = "",
) -> dict[str, Any]:
    """Put the forge's pull request (``pr``: number, url, state, merged, draft, title, body,
    head, base, head_sha) in the task's ``external_pull_requests`` entry and on the attempt
    that was pushed; ``turn_id`` ``None`` for a refresh (the entry's attempt). ``repo_key``:
    that repository's entry of a multi-repository task (the attempt shows its first one).
    Returns the entry."""
    entries = [e for e in task.body.get("external_pull_requests") or [] if isinstance(e, dict)]
    wanted = entry_id(task.id, repo_key) if repo_key else None
    index = next((i for i, e in enumerate(entries) if e.get("id") == wanted), None) if wanted else 0
    if not entries or index is None:
        raise Conflict("The task has no pushed branch to open a pull request for")
    entry = dict(entries[index])
    merged = {**(entry.get("pull_request") or {}), **pr}
    entry["pull_request"] = merged
    body = dict(task.body)
    body["external_pull_requests"] = [*entries[:index], entry, *entries[index + 1 :]]
    recorded = {
        "connection_id": connection_id,
        "repo_path": repo_path,
        "number": pr["number"],
        "state": pr.get("state"),
        "checked_at": now,
    }
    if repo_key:
        body[FORGE_REPOS_KEY] = {**(body.get(FORGE_REPOS_KEY) or {}), repo_key: recorded}
    else:
        body[FORGE_KEY] = recorded
    task.body = body
    turn = db.get(m.Turn, turn_id or str(entry.get("assistant_turn_id") or ""))
    mine = [e for e in entries if e.get("assistant_turn_id") == entry.get("assistant_turn_id")]
    if repo_key and mine and mine[0].get("id") != entry.get("id"):
        turn = None  # the attempt shows its first repository's pull request
    if turn is not None and turn.task_id == task.id:
        turn.body = {
            **turn.body,
            "pull_request_status": pr.get("state"),
            "pull_request_data": merged,
        }
    return entry
