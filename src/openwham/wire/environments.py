"""Environments, their repositories and machines (wham-api.md §7), plus openwham's request bodies.

WHAM's create/update bodies are not public, so :class:`EnvironmentCreate` and
:class:`EnvironmentUpdate` are defined by openwham. They are strict (unknown fields are a 4xx),
unlike the response models, which stay lenient.
"""

from typing import Final

from pydantic import Field

from openwham.wire.base import OmittingWireModel, StrictWireModel, WireModel

NETWORK_MODES: Final = ("off", "on")
NETWORK_PRESETS: Final = ("none", "all")
SHARE_SETTINGS: Final = ("private", "workspace")
DEFAULT_WORKSPACE_DIR: Final = "/workspace"
MAX_LABEL_LENGTH: Final = 200
MAX_REPOS: Final = 10


class GitHubRepoOwner(WireModel):
    """Owner of a repository (``type``: ``User`` or ``Organization``)."""

    login: str | None = None
    id: int | None = None
    type: str | None = None
    avatar_url: str | None = None
    url: str | None = None


class GitHubRepoPermissions(WireModel):
    """The caller's rights on a repository."""

    admin: bool = False
    push: bool = False
    pull: bool = False


class GitHubRepo(OmittingWireModel):
    """A repository of an environment (values of ``repo_map``); ``id`` may be a string or int."""

    id: str | int | None = None
    name: str
    owner: GitHubRepoOwner | None = None
    repository_full_name: str | None = None
    clone_url: str | None = None
    default_branch: str | None = None
    language: str | None = None
    master_branch: str | None = None
    permissions: GitHubRepoPermissions | None = None
    allow_merge_commit: bool | None = None
    allow_rebase_merge: bool | None = None
    allow_squash_merge: bool | None = None
    allow_update_branch: bool | None = None
    allow_auto_merge: bool | None = None
    git_url: str | None = None
    git_refs_url: str | None = None
    git_commits_url: str | None = None
    size: int | None = None
    visibility: str | None = None
    # Only the synthetic samples carry ``permissions``; real captures lack the key.
    omit_when_unset = ("permissions",)


class AgentNetworkAccess(WireModel):
    """Internet access of the agent phase (setup always has network). Off by default.

    ``allowlist_domains`` is one string of extra domains; ``safe_methods_only`` limits the agent
    to GET, HEAD and OPTIONS.
    """

    mode: str = "off"
    preset_allowlist: str | None = "none"
    allowlist_domains: str = ""
    safe_methods_only: bool | None = None


class McpServer(StrictWireModel):
    """An MCP server the agent may use (openwham's; Codex cloud has none): a stdio
    ``command`` (with ``args``, ``env``, ``cwd``) that Codex starts inside the sandbox, e.g.
    one the setup script installed, or an HTTP ``url`` reached through the agent's egress
    policy. Exactly one of ``command`` and ``url``. ``env`` is visible to the agent: no
    secrets there. ``required``: the attempt fails when the server does not start."""

    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    startup_timeout_sec: float | None = None
    tool_timeout_sec: float | None = None
    required: bool = False


class CacheSettings(WireModel):
    """Container cache after setup (on unless turned off, as Codex cloud); changing
    ``cache_invalidation_key`` drops the cache."""

    post_setup_cache_enabled: bool = True
    cache_invalidation_key: str = ""


class AutoSetupSettings(WireModel):
    """Whether dependencies are installed automatically before the setup script."""

    use_auto_setup: bool = False


class EnvironmentPermissions(WireModel):
    """What the caller may do with an environment (seen only in third-party schemas)."""

    can_write: bool = True
    can_delete: bool = True


class Environment(OmittingWireModel):
    """An environment: repositories, scripts, variables and network policy a task runs with.

    ``secrets`` is write-only: responses carry the names with a redacted value, never the value.
    """

    id: str
    label: str = ""
    description: str = ""
    machine_id: str | None = None
    workspace_dir: str = DEFAULT_WORKSPACE_DIR
    is_pinned: bool = False
    repos: list[str] = Field(default_factory=list)
    repo_map: dict[str, GitHubRepo] = Field(default_factory=dict)
    setup: str | list[str] | None = Field(default_factory=list)
    maintenance_setup: str | list[str] | None = None
    auto_setup_settings: AutoSetupSettings | None = None
    cache_settings: CacheSettings | None = Field(default_factory=CacheSettings)
    env_vars: dict[str, str] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict)
    agent_network_access: AgentNetworkAccess | None = Field(default_factory=AgentNetworkAccess)
    mcp_servers: dict[str, McpServer] | None = None
    share_settings: str = "private"
    share_targets: list[str] = Field(default_factory=list)
    task_count: int = 0
    creator_id: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    etag: str | None = None
    permissions: EnvironmentPermissions | None = None
    # Seen only in third-party envelope schemas: emitted only when set; ``mcp_servers`` is
    # openwham's own, emitted only for environments that have some.
    omit_when_unset = ("etag", "permissions", "mcp_servers")


EnvironmentByRepoItem = Environment
"""Element of ``GET /environments/by-repo/...`` (a bare array, like ``GET /environments``)."""


class EnvironmentCreator(WireModel):
    """The user who created an environment."""

    id: str
    email: str | None = None
    name: str | None = None


class Machine(WireModel):
    """Machine (image and limits) an environment runs on.

    ``id`` is optional because a synthetic capture has ``{label, limits}`` only; openwham always
    sets it.
    """

    id: str | None = None
    label: str = "universal"
    cpu_limit: int | float | None = None
    memory_limit_mb: int | None = None
    disk_limit_mb: int | None = None
    image: str | None = None


class EnvironmentWithCreatorAndMachine(Environment):
    """``GET /environments/{id}/with-creator-and-machine``: the environment plus two objects."""

    creator: EnvironmentCreator | None = None
    machine: Machine | None = None


class EnvironmentWithCreator(WireModel):
    """Entry of ``GET /environments/with-creators``."""

    environment: Environment
    creator: EnvironmentCreator | None = None


class EnvironmentsWithCreatorsPage(WireModel):
    """``GET /environments/with-creators``: ``{items, cursor}``."""

    items: list[EnvironmentWithCreator] = Field(default_factory=list)
    cursor: str | None = None


class RepoSpec(StrictWireModel):
    """openwham request shape for one repository of an environment.

    ``url`` is a git URL (https, ssh, git, file, ``user@host:path``) or an absolute local path.
    ``name`` is the display name ``owner/repo``, derived from the URL when absent.
    ``default_branch`` is detected from the repository when absent.
    """

    url: str = Field(min_length=1)
    name: str | None = None
    default_branch: str | None = None


class EnvironmentCreate(StrictWireModel):
    """Body of ``POST /environments`` (openwham-defined; WHAM's is not public).

    ``repos`` entries are :class:`RepoSpec` objects or bare URL strings (1 to 10 of them).
    ``secrets`` are write-only: stored encrypted, given to the setup phase only. ``setup`` and
    ``maintenance_setup`` are a script or its lines. Unknown fields are rejected. Names of
    ``env_vars`` and ``secrets`` that change how programs load or run (``LD_*``, ``GIT_*``,
    ``PATH``, ``BASH_ENV``, ...: ``service.environments.LOADER_VARS``) are refused (400).
    """

    label: str = Field(min_length=1, max_length=MAX_LABEL_LENGTH)
    description: str = ""
    repos: list[RepoSpec | str] = Field(min_length=1, max_length=MAX_REPOS)
    setup: str | list[str] | None = None
    maintenance_setup: str | list[str] | None = None
    env_vars: dict[str, str] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict)
    agent_network_access: AgentNetworkAccess | None = None
    mcp_servers: dict[str, McpServer] | None = None
    cache_settings: CacheSettings | None = None
    auto_setup_settings: AutoSetupSettings | None = None
    is_pinned: bool = False
    workspace_dir: str = DEFAULT_WORKSPACE_DIR
    machine_id: str | None = None
    share_settings: str = "private"

    def repo_specs(self) -> list[RepoSpec]:
        """``repos`` with bare strings turned into :class:`RepoSpec`."""
        return _repo_specs(self.repos)


class EnvironmentUpdate(StrictWireModel):
    """Body of ``PATCH /environments/{id}`` (openwham-defined): only the fields sent change.

    Use ``model_fields_set`` to tell "absent" from ``null``. ``secrets`` is merged into the
    stored secrets; a ``null`` value deletes that secret. Unknown fields are rejected.
    """

    label: str | None = Field(default=None, min_length=1, max_length=MAX_LABEL_LENGTH)
    description: str | None = None
    repos: list[RepoSpec | str] | None = Field(default=None, min_length=1, max_length=MAX_REPOS)
    setup: str | list[str] | None = None
    maintenance_setup: str | list[str] | None = None
    env_vars: dict[str, str] | None = None
    secrets: dict[str, str | None] | None = None
    agent_network_access: AgentNetworkAccess | None = None
    mcp_servers: dict[str, McpServer] | None = None
    cache_settings: CacheSettings | None = None
    auto_setup_settings: AutoSetupSettings | None = None
    is_pinned: bool | None = None
    workspace_dir: str | None = None
    machine_id: str | None = None
    share_settings: str | None = None

    def repo_specs(self) -> list[RepoSpec] | None:
        """``repos`` with bare strings turned into :class:`RepoSpec` (``None`` if not sent)."""
        return None if self.repos is None else _repo_specs(self.repos)


def _repo_specs(repos: list[RepoSpec | str]) -> list[RepoSpec]:
    return [RepoSpec(url=r) if isinstance(r, str) else r for r in repos]
