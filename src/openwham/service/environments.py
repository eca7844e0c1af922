"""Environments: create, update, list and render (secrets are write-only and encrypted)."""

from __future__ import annotations

import hmac
import posixpath
import re
import time
import uuid
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from openwham import ids
from openwham.config import Settings
from openwham.gitpaths import LocalRepoPolicy
from openwham.store import models as m
from openwham.wire import (
    AgentNetworkAccess,
    Environment,
    EnvironmentCreate,
    EnvironmentCreator,
    EnvironmentUpdate,
    EnvironmentWithCreatorAndMachine,
    GitHubRepo,
    Machine,
    McpServer,
)

from . import repos
from .accounts import Principal
from .errors import BadRequest, NotFound
from .keys import SecretBox

REDACTED = "<REDACTED>"
MAX_VARS = 200
MAX_VAR_VALUE = 64 * 1024
MAX_SCRIPT = 256 * 1024
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
NETWORK_MODES = ("off", "on")
NETWORK_PRESETS = ("none", "common_dependencies", "all")
SHARE_SETTINGS = ("private", "workspace")
DEFAULT_WORKSPACE_DIR = "/workspace"
MAX_WORKSPACE_DIR = 1024
MAX_MCP_SERVERS = 16
_REPO_DIR = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")
MAX_MCP_ARGS = 64
MAX_MCP_TEXT = 4096
MAX_MCP_TIMEOUT = 600.0
# Codex's rule for server names (they become tool namespaces: ``mcp__<name>``)
_MCP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

MACHINE = Machine(
    id="universal",
    label="universal",
    cpu_limit=None,
    memory_limit_mb=None,
    disk_limit_mb=None,
    image="bubblewrap",
)


def get_row(db: Session, principal: Principal, env_id: str) -> m.Environment:
    """The environment if it belongs to the caller's account; 404 otherwise (no existence hint)."""
    row = db.get(m.Environment, env_id) if len(env_id) <= 200 else None
    if row is None or row.account_id != principal.account_id:
        raise NotFound("Environment not found")
    return row


RESERVED_VARS = frozenset(
    {"HOME", "CODEX_HOME", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"}
    | {"no_proxy", "NO_PROXY"}
)
RESERVED_PREFIX = "OPENWHAM_"


def is_reserved_var(name: str) -> bool:
    """Names the sandbox sets itself (home, Codex's home, the proxy, openwham's own)."""
    return name in RESERVED_VARS or name.upper().startswith(RESERVED_PREFIX)


# Names that change how programs are loaded or run rather than what they work on: set for a
# whole sandbox they would act on every program in it, openwham's own steps too (the setup
# shell, git in the diff step, Codex and its tools), and one of them once broke a diff.
# Refused at create/update; docs/api.md lists them with the reasons.
LOADER_VARS = {
    # the dynamic loader: code injected into every program, libraries swapped
    "LD_PRELOAD": "loads code into every program",
    "LD_LIBRARY_PATH": "replaces the libraries every program loads",
    "LD_AUDIT": "loads code into every program",
    "LD_DEBUG": "changes what every program prints",
    "LD_BIND_NOW": "changes how every program is loaded",
    "GCONV_PATH": "loads code into programs that convert text",
    "MALLOC_CHECK_": "changes every program's memory allocator",
    # shells: files sourced, and how scripts are split and traced
    "BASH_ENV": "makes every bash script source a file first",
    "ENV": "makes every sh script source a file first",
    "SHELLOPTS": "changes how every bash script runs",
    "BASHOPTS": "changes how every bash script runs",
    "IFS": "changes how every shell script splits words",
    "PS4": "is evaluated by every traced shell script",
    "CDPATH": "changes where scripts' cd commands go",
    "PROMPT_COMMAND": "runs a command in every bash shell",
    "PATH": "changes which programs run (set it in the setup script instead)",
    # interpreters: code run at start-up, modules swapped
    "PYTHONSTARTUP": "runs code in Python",
    "PYTHONPATH": "replaces the modules Python (and openwham's forwarder) loads",
    "PYTHONHOME": "replaces Python's standard library",
    "PYTHONINSPECT": "changes how Python runs",
    "NODE_OPTIONS": "loads code into every Node.js program",
    "PERL5OPT": "loads code into every Perl program",
    "PERL5LIB": "replaces the modules Perl loads",
    "PERLLIB": "replaces the modules Perl loads",
    "RUBYOPT": "loads code into every Ruby program",
    "RUBYLIB": "replaces the libraries Ruby loads",
    "JAVA_TOOL_OPTIONS": "loads agents into every JVM",
    "_JAVA_OPTIONS": "loads agents into every JVM",
}
LOADER_PREFIXES = {
    "GIT_": "changes which repository and settings git uses (openwham's diff runs git)",
    "LD_": "changes how the dynamic loader loads every program",
}


def loader_var_reason(name: str) -> str | None:
    """Why ``name`` may not be an environment's variable or secret, or ``None``."""
    if name in LOADER_VARS:
        return LOADER_VARS[name]
    return next((why for p, why in LOADER_PREFIXES.items() if name.startswith(p)), None)


def _check_vars(kind: str, values: dict[str, Any], *, allow_null: bool) -> None:
    if len(values) > MAX_VARS:
        raise BadRequest(f"At most {MAX_VARS} {kind} are allowed")
    for name, value in values.items():
        if not _VAR_NAME.match(name):
            raise BadRequest(f"Invalid {kind[:-1]} name {name!r}: use letters, digits and _")
        if is_reserved_var(name) and not (value is None and allow_null):
            raise BadRequest(
                f"{kind[:-1].capitalize()} name {name!r} is reserved: openwham sets it in the "
                "sandbox"
            )
        reason = loader_var_reason(name)
        if reason is not None and not (value is None and allow_null):
            raise BadRequest(
                f"{kind[:-1].capitalize()} name {name!r} is not allowed: it {reason} "
                "(docs/api.md lists the refused names)"
            )
        if value is None and allow_null:
            continue
        if not isinstance(value, str):
            raise BadRequest(f"{kind[:-1].capitalize()} {name!r} must be a string")
        if len(value) > MAX_VAR_VALUE or "\0" in value:
            raise BadRequest(f"{kind[:-1].capitalize()} {name!r} is too long or contains NUL")


def _script(value: str | list[str] | None, field: str) -> list[str] | None:
    if value is None:
        return None
    lines = [value] if isinstance(value, str) else list(value)
    if sum(len(x) for x in lines) > MAX_SCRIPT:
        raise BadRequest(f"{field} is longer than {MAX_SCRIPT} characters")
    return lines


MAX_ALLOWLIST = 500
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def allowlist_entries(text: str) -> list[str]:
    """The agent allowlist's entries (``allowlist_domains``: separated by commas, spaces or
    lines), lower-cased: ``example.com`` (that name only) or ``*.example.com`` (its
    subdomains). A 400 names the first entry that is neither."""
    entries: list[str] = []
    for raw in re.split(r"[\s,]+", text.strip()):
        if not raw:
            continue
        entry = raw.lower().rstrip(".")
        name = entry.removeprefix("*.")
        labels = name.split(".")
        if (
            len(name) > 253
            or len(labels) < 2
            or not all(_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()
        ):
            raise BadRequest(
                f"agent_network_access.allowlist_domains: {raw[:100]!r} is not a domain name "
                "(example.com for that name, *.example.com for its subdomains)"
            )
        if entry not in entries:
            entries.append(entry)
    if len(entries) > MAX_ALLOWLIST:
        raise BadRequest(f"agent_network_access.allowlist_domains: at most {MAX_ALLOWLIST} domains")
    return entries


def _network(value: AgentNetworkAccess | None) -> dict[str, Any]:
    """The agent's internet access as stored, or a 400: mode, preset, the allowlist's
    domains (normalised to one per line) and the method rule."""
    net = value or AgentNetworkAccess(
        mode="off", preset_allowlist="none", allowlist_domains="", safe_methods_only=None
    )
    data = net.model_dump(mode="json")
    if data.get("mode") not in NETWORK_MODES:
        raise BadRequest("agent_network_access.mode must be 'on' or 'off'")
    preset = data.get("preset_allowlist") or "none"
    if preset not in NETWORK_PRESETS:
        raise BadRequest(f"agent_network_access.preset_allowlist must be one of {NETWORK_PRESETS}")
    data["preset_allowlist"] = preset
    domains = data.get("allowlist_domains") or ""
    if not isinstance(domains, str):
        raise BadRequest("agent_network_access.allowlist_domains must be a string")
    data["allowlist_domains"] = "\n".join(allowlist_entries(domains))
    safe = data.get("safe_methods_only")
    if safe is not None and not isinstance(safe, bool):
        raise BadRequest("agent_network_access.safe_methods_only must be true, false or null")
    return data


def _mcp_text(value: str, what: str, *, limit: int = MAX_MCP_TEXT) -> str:
    if not value.strip() or len(value) > limit or any(c in value for c in "\0\n\r"):
        raise BadRequest(f"{what} must be 1 to {limit} characters on one line")
    return value


def _mcp_servers(value: dict[str, McpServer] | None) -> dict[str, Any] | None:
    """The environment's MCP servers as stored, or a 400 naming what is wrong. Their ``env``
    reaches only the server's process (Codex starts it with that environment), which runs
    with the agent's rights, so loader variables such as ``PYTHONPATH`` are allowed there;
    names the sandbox sets itself are not."""
    if not value:
        return None
    if len(value) > MAX_MCP_SERVERS:
        raise BadRequest(f"At most {MAX_MCP_SERVERS} MCP servers are allowed")
    out: dict[str, Any] = {}
    for name, server in value.items():
        where = f"mcp_servers.{name}"
        if not _MCP_NAME.match(name):
            raise BadRequest(f"Invalid MCP server name {name!r}: 1 to 64 letters, digits, _ and -")
        if (server.command is None) == (server.url is None):
            raise BadRequest(f"{where} needs exactly one of command (stdio) and url (HTTP)")
        if server.url is not None:
            url = _mcp_text(server.url, f"{where}.url", limit=2000)
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise BadRequest(f"{where}.url must be an http:// or https:// URL")
            if parsed.username or parsed.password:
                raise BadRequest(f"{where}.url must not contain credentials")
            if server.args or server.env or server.cwd:
                raise BadRequest(f"{where}: args, env and cwd are for a stdio command")
        else:
            _mcp_text(server.command or "", f"{where}.command")
            if len(server.args) > MAX_MCP_ARGS:
                raise BadRequest(f"{where}.args: at most {MAX_MCP_ARGS} arguments")
            for arg in server.args:
                if len(arg) > MAX_MCP_TEXT or "\0" in arg:
                    raise BadRequest(f"{where}.args: an argument is too long or contains NUL")
            if server.cwd is not None and not posixpath.isabs(
                _mcp_text(server.cwd, f"{where}.cwd")
            ):
                raise BadRequest(f"{where}.cwd must be an absolute path in the sandbox")
            if len(server.env) > MAX_VARS:
                raise BadRequest(f"{where}.env: at most {MAX_VARS} variables")
            for key, val in server.env.items():
                if not _VAR_NAME.match(key):
                    raise BadRequest(f"{where}.env: invalid variable name {key!r}")
                if is_reserved_var(key):
                    raise BadRequest(
                        f"{where}.env: {key!r} is reserved: openwham sets it in the sandbox"
                    )
                if len(val) > MAX_VAR_VALUE or "\0" in val:
                    raise BadRequest(f"{where}.env: {key!r} is too long or contains NUL")
        for field in ("startup_timeout_sec", "tool_timeout_sec"):
            seconds = getattr(server, field)
            if seconds is not None and not 0 < seconds <= MAX_MCP_TIMEOUT:
                raise BadRequest(f"{where}.{field} must be above 0 and at most {MAX_MCP_TIMEOUT:g}")
        out[name] = server.model_dump(mode="json", exclude_defaults=True)
    return out


def _check_mcp_network(payload: dict[str, Any]) -> None:
    """An HTTP MCP server is reached through the agent's egress: refused while it is off."""
    servers = payload.get("mcp_servers") or {}
    mode = (payload.get("agent_network_access") or {}).get("mode")
    remote = sorted(name for name, spec in servers.items() if spec.get("url"))
    if remote and mode != "on":
        raise BadRequest(
            f"MCP server {remote[0]!r} has a url, which the agent reaches through its internet "
            "access: turn agent_network_access on (and allow its host) or use a stdio command"
        )


def _repo_fields(specs: list[Any], policy: LocalRepoPolicy) -> tuple[list[str], dict[str, Any]]:
    if not specs:
        raise BadRequest("An environment needs at least one repository")
    keys: list[str] = []
    repo_map: dict[str, Any] = {}
    for spec in specs:
        try:
            key, repo = repos.describe(spec, policy=policy)
        except ValidationError as exc:  # e.g. an empty URL string
            raise BadRequest("Repository URL must be a git URL or an absolute local path") from exc
        if key in repo_map:
            raise BadRequest(f"Repository listed twice: {repo.clone_url}")
        keys.append(key)
        repo_map[key] = repo.model_dump(mode="json")
    if len(keys) > 1:
        _check_repo_dirs(keys, repo_map)
    return keys, repo_map


def _check_repo_dirs(keys: list[str], repo_map: dict[str, Any]) -> None:
    """Several repositories are cloned side by side, each into the directory of its name
    (:func:`repo_dirs`): refuse a name that is no plain directory name, and two that would
    share one directory (compared case-insensitively, so a checkout on a case-insensitive
    file system cannot mix them either). (At most 10 repositories: the wire model.)"""
    seen: dict[str, str] = {}
    for key in keys:
        info = repo_map[key]
        name, url = str(info.get("name") or ""), str(info.get("clone_url") or "")
        if not _REPO_DIR.match(name):
            raise BadRequest(
                f"Repository {url} is named {name!r}, which cannot be its directory in the "
                'workspace: give it a name such as owner/repo ({"url": …, "name": …})'
            )
        if name.lower() in seen:
            raise BadRequest(
                f"Repositories {seen[name.lower()]} and {url} would both be cloned into "
                f"the workspace's directory {name!r}: give one of them another name "
                '({"url": …, "name": "owner/other"})'
            )
        seen[name.lower()] = url


def repo_dirs(env_body: dict[str, Any]) -> dict[str, str]:
    """Where each repository is in the workspace, relative to it: ``""`` for the one
    repository of a single-repository environment (the workspace is its checkout, as
    always), else each repository's name (``workspace_dir/<name>``; distinct, checked at
    save: :func:`_check_repo_dirs`)."""
    keys = [str(k) for k in env_body.get("repos") or []]
    if len(keys) <= 1:
        return dict.fromkeys(keys, "")
    return {k: str(repo_info(env_body, k).get("name") or k) for k in keys}


def _policy(db: Session, account_id: str, settings: Settings) -> LocalRepoPolicy:
    return repos.local_policy(
        db, account_id, settings.resolved_data_dir, settings.local_repo_root_paths
    )


def check_repo_paths(db: Session, row: m.Environment, settings: Settings) -> None:
    """Judge the environment's local repositories again, as git is about to open them: the
    directories may have changed since the environment was saved (a ``.git`` file or
    alternates pointing into the data directory, a root no longer configured)."""
    policy = _policy(db, row.account_id, settings)
    for key in row.body.get("repos") or []:
        url = repo_url(row.body, str(key))
        if url.startswith("/") and (reason := policy.refusal(url)) is not None:
            raise BadRequest(reason)


def _check_workspace_dir(value: str | None) -> str:
    """An absolute, normalised path inside the sandbox (never ``/`` itself)."""
    path = value or DEFAULT_WORKSPACE_DIR
    if (
        not path.startswith("/")
        or len(path) > MAX_WORKSPACE_DIR
        or posixpath.normpath(path) != path.rstrip("/")
        or path.startswith("//")
        or path.rstrip("/") == ""
        or any(ord(c) < 0x20 for c in path)
    ):
        raise BadRequest(
            "workspace_dir must be an absolute, normalised path such as /workspace "
            "(no '..', not '/')"
        )
    return path.rstrip("/")


def _check_label(label: str) -> str:
    label = label.strip()
    if not label or len(label) > 200:
        raise BadRequest("label must be 1 to 200 characters")
    return label


def create(
    db: Session, principal: Principal, body: EnvironmentCreate, box: SecretBox, settings: Settings
) -> m.Environment:
    label = _check_label(body.label)
    _check_vars("env_vars", body.env_vars, allow_null=False)
    _check_vars("secrets", body.secrets, allow_null=False)
    if body.share_settings not in SHARE_SETTINGS:
        raise BadRequest(f"share_settings must be one of {SHARE_SETTINGS}")
    if body.machine_id not in (None, MACHINE.id):
        raise BadRequest(f"Unknown machine_id {body.machine_id!r}; available: {MACHINE.id}")
    keys, repo_map = _repo_fields(list(body.repos), _policy(db, principal.account_id, settings))
    now = time.time()
    payload: dict[str, Any] = {
        "description": body.description or "",
        "machine_id": MACHINE.id,
        "workspace_dir": _check_workspace_dir(body.workspace_dir),
        "repos": keys,
        "repo_map": repo_map,
        "setup": _script(body.setup, "setup") or [],
        "maintenance_setup": _script(body.maintenance_setup, "maintenance_setup"),
        "auto_setup_settings": (
            body.auto_setup_settings.model_dump(mode="json") if body.auto_setup_settings else None
        ),
        "cache_settings": {
            "post_setup_cache_enabled": (
                body.cache_settings is None or body.cache_settings.post_setup_cache_enabled
            ),
            "cache_invalidation_key": uuid.uuid4().hex,
        },
        "env_vars": dict(body.env_vars),
        "agent_network_access": _network(body.agent_network_access),
        "share_settings": body.share_settings,
        "share_targets": [],
    }
    if (servers := _mcp_servers(body.mcp_servers)) is not None:
        payload["mcp_servers"] = servers
    _check_mcp_network(payload)
    row = m.Environment(
        id=ids.new_environment_id(),
        account_id=principal.account_id,
        creator_id=principal.user_id,
        label=label,
        is_pinned=bool(body.is_pinned),
        body=payload,
        secrets={k: box.seal(v) for k, v in body.secrets.items()},
        created_at=now,
        updated_at=now,
        last_used_at=None,
    )
    db.add(row)
    db.flush()
    return row


def update(
    db: Session,
    principal: Principal,
    env_id: str,
    patch: EnvironmentUpdate,
    box: SecretBox,
    settings: Settings,
) -> m.Environment:
    """Partial update: given fields replace; ``secrets`` merge (a null value deletes one)."""
    row = get_row(db, principal, env_id)
    given = patch.model_fields_set
    payload = dict(row.body)
    if "label" in given:
        if patch.label is None:
            raise BadRequest("label cannot be null")
        row.label = _check_label(patch.label)
    if "description" in given:
        payload["description"] = patch.description or ""
    if "repos" in given:
        policy = _policy(db, principal.account_id, settings)
        keys, repo_map = _repo_fields(list(patch.repos or []), policy)
        payload["repos"], payload["repo_map"] = keys, repo_map
    if "setup" in given:
        payload["setup"] = _script(patch.setup, "setup") or []
    if "maintenance_setup" in given:
        payload["maintenance_setup"] = _script(patch.maintenance_setup, "maintenance_setup")
    if "env_vars" in given:
        _check_vars("env_vars", patch.env_vars or {}, allow_null=False)
        payload["env_vars"] = dict(patch.env_vars or {})
    if "agent_network_access" in given:
        payload["agent_network_access"] = _network(patch.agent_network_access)
    if "mcp_servers" in given:
        payload.pop("mcp_servers", None)
        if (servers := _mcp_servers(patch.mcp_servers)) is not None:
            payload["mcp_servers"] = servers
    _check_mcp_network(payload)
    if "share_settings" in given:
        if patch.share_settings not in SHARE_SETTINGS:
            raise BadRequest(f"share_settings must be one of {SHARE_SETTINGS}")
        payload["share_settings"] = patch.share_settings
    if "auto_setup_settings" in given:
        payload["auto_setup_settings"] = (
            patch.auto_setup_settings.model_dump(mode="json") if patch.auto_setup_settings else None
        )
    if "cache_settings" in given and patch.cache_settings is not None:
        cache = dict(payload.get("cache_settings") or {})
        cache["post_setup_cache_enabled"] = bool(patch.cache_settings.post_setup_cache_enabled)
        payload["cache_settings"] = cache
    if "workspace_dir" in given:
        payload["workspace_dir"] = _check_workspace_dir(patch.workspace_dir)
    if "machine_id" in given and patch.machine_id not in (None, MACHINE.id):
        raise BadRequest(f"Unknown machine_id {patch.machine_id!r}; available: {MACHINE.id}")
    if "is_pinned" in given:
        row.is_pinned = bool(patch.is_pinned)
    if "secrets" in given:
        changes = patch.secrets or {}
        _check_vars("secrets", changes, allow_null=True)
        sealed = dict(row.secrets)
        for name, value in changes.items():
            if value is None:
                sealed.pop(name, None)
            elif not _same_secret(box, sealed.get(name), value):
                sealed[name] = box.seal(value)
        if len(sealed) > MAX_VARS:
            raise BadRequest(f"At most {MAX_VARS} secrets are allowed")
        row.secrets = sealed
    row.body = payload
    row.updated_at = time.time()
    db.flush()
    return row


def _same_secret(box: SecretBox, token: str | None, value: str) -> bool:
    """Whether the sealed ``token`` holds ``value`` (then it is kept: sealing again makes
    another token, which would count as a change of the environment's post-setup cache
    generation and run the setup script again). Fernet tokens are randomised, so the stored
    value is opened and compared in constant time; nothing of either is logged."""
    if token is None:
        return False
    try:
        held = box.open(token)
    except RuntimeError:  # sealed under another key: sealing it anew is the fix
        return False
    return hmac.compare_digest(held.encode(), value.encode())


def reset_cache(db: Session, principal: Principal, env_id: str) -> None:
    row = get_row(db, principal, env_id)
    payload = dict(row.body)
    cache = dict(payload.get("cache_settings") or {})
    cache["cache_invalidation_key"] = uuid.uuid4().hex
    payload["cache_settings"] = cache
    row.body = payload
    row.updated_at = time.time()
    db.flush()


def delete(db: Session, principal: Principal, env_id: str) -> None:
    db.delete(get_row(db, principal, env_id))
    db.flush()


def task_counts(db: Session, env_ids: list[str]) -> dict[str, int]:
    if not env_ids:
        return {}
    rows = db.execute(
        select(m.Task.environment_id, func.count())
        .where(m.Task.environment_id.in_(env_ids))
        .group_by(m.Task.environment_id)
    )
    return {str(env_id): int(n) for env_id, n in rows}


def list_rows(db: Session, principal: Principal, *, recent: bool = False) -> list[m.Environment]:
    q = select(m.Environment).where(m.Environment.account_id == principal.account_id)
    if recent:
        q = q.where(m.Environment.last_used_at.is_not(None)).order_by(
            m.Environment.last_used_at.desc(), m.Environment.id
        )
    else:
        q = q.order_by(m.Environment.is_pinned.desc(), m.Environment.label, m.Environment.id)
    return list(db.scalars(q))


def render(row: m.Environment, task_count: int) -> Environment:
    """Wire form: secrets show their names with a redaction mark, never a value."""
    body = dict(row.body)
    return Environment.model_validate(
        {
            "id": row.id,
            "label": row.label,
            "is_pinned": row.is_pinned,
            "task_count": task_count,
            "creator_id": row.creator_id,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "secrets": dict.fromkeys(sorted(row.secrets), REDACTED),
            **body,
        }
    )


def render_many(db: Session, rows: list[m.Environment]) -> list[Environment]:
    counts = task_counts(db, [r.id for r in rows])
    return [render(r, counts.get(r.id, 0)) for r in rows]


def render_with_creator(db: Session, row: m.Environment) -> EnvironmentWithCreatorAndMachine:
    env = render(row, task_counts(db, [row.id]).get(row.id, 0))
    creator = db.get(m.User, row.creator_id)
    return EnvironmentWithCreatorAndMachine.model_validate(
        {
            **env.model_dump(mode="json"),
            "creator": EnvironmentCreator(
                id=row.creator_id,
                email=creator.email if creator else None,
                name=creator.name if creator else None,
            ).model_dump(mode="json"),
            "machine": MACHINE.model_dump(mode="json"),
        }
    )


def by_repo(db: Session, principal: Principal, owner: str, repo: str) -> list[m.Environment]:
    """Environments that contain ``owner/repo`` (matched case-insensitively on the full name)."""
    wanted = f"{owner}/{repo}".lower().removesuffix(".git")
    out = []
    for row in list_rows(db, principal):
        for info in (row.body.get("repo_map") or {}).values():
            if str(GitHubRepo.model_validate(info).repository_full_name or "").lower() == wanted:
                out.append(row)
                break
    return out


def secret_values(row: m.Environment, box: SecretBox) -> dict[str, str]:
    """Decrypted secrets, for the setup phase only (never rendered)."""
    return {k: box.open(v) for k, v in row.secrets.items()}


def run_environment(
    db: Session, task: m.Task, turn: m.Turn
) -> tuple[m.Environment | None, dict[str, Any]]:
    """The environment an attempt of ``task`` works with: the live one (its current
    repositories, scripts, variables and secrets) or, once that is deleted, the snapshot the
    attempt was created with (``None`` and the snapshot's body)."""
    env = db.get(m.Environment, task.environment_id) if task.environment_id else None
    if env is not None and env.account_id == task.account_id:
        return env, dict(env.body)
    return None, dict(turn.body.get("environment") or {})


def repo_info(env_body: dict[str, Any], key: str) -> dict[str, Any]:
    """The ``repo_map`` entry of repository ``key`` (empty when unknown)."""
    return dict((env_body.get("repo_map") or {}).get(key) or {})


def repo_url(env_body: dict[str, Any], key: str) -> str:
    """Where repository ``key`` is cloned from and pushed to."""
    info = repo_info(env_body, key)
    return str(info.get("clone_url") or info.get("git_url") or "")
