"""``AgentRuntime``: what the engine needs of a coding agent, so the agent is a part beside
the engine rather than spread through it. ``runtimes.codex.CodexRuntime`` is the one there is.

The engine gives the agent a writable home (its config and session files: what a follow-up
resumes from), read-only binds, an environment holding the gateway token, and a command it
starts held (the prompt arrives on stdin); the agent's stdout goes through a translator that
turns it into work-log and status updates and, at the end, the outcome.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .codex import Outcome, Update


class Translator(Protocol):
    """An agent's stdout, line by line, as work-log and status updates."""

    @property
    def turn_completed(self) -> bool: ...

    @property
    def thread_id(self) -> str | None: ...

    def take_initial(self) -> list[Update]: ...

    def feed(self, line: str) -> list[Update]: ...

    def finish(
        self,
        exit_code: int | None,
        *,
        killed_reason: str | None = None,
        upstream_error: str | None = None,
        stderr: str = "",
    ) -> Outcome: ...


class AgentRuntime(Protocol):
    """One agent CLI: its home files, command, launcher, event translator and resume."""

    @property
    def ready_marker(self) -> str:
        """The stderr line the launcher prints once the agent waits for its prompt."""
        ...

    @property
    def written_marker(self) -> str:
        """The stderr line the launcher prints once the ``after`` script (the diff) ran."""
        ...

    @property
    def home_mount(self) -> str:
        """Where the agent's home directory (config, sessions) is bound in the sandbox."""
        ...

    @property
    def egress_listen(self) -> str:
        """``host:port`` in the sandbox where the launcher's egress forwarder listens."""
        ...

    @property
    def idle_helpers(self) -> tuple[str, ...]:
        """In-sandbox helpers the stall watchdog does not count."""
        ...

    @property
    def interrupt_signal(self) -> int | None:
        """The signal that asks the agent to end its turn now (a user's cancel: the launcher
        passes it on; the sandbox is killed if the agent has not exited within a grace), or
        ``None``: a cancel kills the sandbox at once."""
        ...

    def home_files(
        self,
        *,
        model: str,
        reasoning_effort: str | None,
        custom_instructions: str | None,
        mcp_servers: Mapping[str, Mapping[str, Any]] | None = None,
        network: str | None = None,
    ) -> dict[str, str]:
        """Files written into the agent's home before it starts (name → text); the
        environment's MCP servers go into the agent's own configuration, and so does its
        internet access (``network``: a summary of the policy, ``None`` when off)."""
        ...

    def binds(self, *, forwarder: Path, gateway_socket: Path) -> dict[Path, str]:
        """Read-only binds: the agent's binary, the gateway forwarder and its socket."""
        ...

    def env(self, token: str) -> dict[str, str]:
        """The agent's environment variables (its gateway token among them)."""
        ...

    def command(
        self,
        *,
        qa_mode: bool,
        resume_thread: str | None,
        custom_instructions: str | None,
        after: str,
        egress: str | None = None,
        network: str | None = None,
    ) -> list[str]:
        """The launcher's argv: start the agent (resuming ``resume_thread``'s conversation
        when set) held for its prompt, then run ``after`` (a shell script) once it is done.
        ``egress``: the egress socket in the sandbox, when the agent may go out (the
        launcher then starts a forwarder to it for the engine's proxy variables);
        ``network`` as in :meth:`home_files` (a resumed Ask-mode run restates it)."""
        ...

    def translator(self, prompt: str) -> Translator: ...
