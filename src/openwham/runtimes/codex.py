"""The ``codex`` runtime: the official Codex CLI run as ``codex exec --json`` in a sandbox.

Pure pieces, combined by the engine with the sandbox and the model gateway (this package
imports neither; ``docs/notes-execution.md`` shows the glue):

- :func:`codex_home_files`: the generated ``CODEX_HOME`` (``config.toml`` with a custom
  ``wire_api = "responses"`` provider pointing at the in-sandbox gateway forwarder, model,
  reasoning effort, the user's custom instructions, Codex's network features off, and the
  ``ask`` profile used in Ask mode).
- :func:`command`: the ``codex exec`` argv; the prompt goes through stdin.
- :func:`launcher`: the sandbox's argv: start the forwarder, wait for its ``ready`` line,
  then exec Codex. :func:`sandbox_env`: the environment it needs.
- :class:`EventTranslator`: the JSONL event stream → WHAM work-log messages, the live status
  line, the final agent message, the outcome and token usage.

Sandbox layout this module assumes (the caller binds it): the Codex binary at
:data:`SANDBOX_CODEX_BIN`, the forwarder at :data:`SANDBOX_FORWARDER`, the gateway socket at
:data:`SANDBOX_GATEWAY_SOCKET` (all read-only), the per-attempt ``CODEX_HOME`` directory
(read-write: Codex keeps its state and the session rollout there) at
:data:`SANDBOX_CODEX_HOME`, and the workspace at ``/workspace``. ``CODEX_HOME`` must not be
under ``/tmp``: Codex 0.169.0 then refuses its helper binaries.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openwham.wire import (
    TurnError,
    Worklog,
    WorklogAuthor,
    WorklogContent,
    WorklogMessage,
    WorklogMessageMetadata,
)

from .agent import Translator
from .codex_cli import native_binary

# ----------------------------------------------------------------------------- sandbox layout

SANDBOX_CODEX_BIN = "/opt/openwham/codex"
SANDBOX_FORWARDER = "/opt/openwham/forwarder.py"
SANDBOX_GATEWAY_SOCKET = "/run/wham/gateway.sock"
SANDBOX_CODEX_HOME = "/home/openwham/.codex"
SANDBOX_WORKDIR = "/workspace"
SANDBOX_PYTHON = "/usr/bin/python3"
# The sandbox has its own network namespace, so any port is free; an unusual one leaves the
# common development ports to the agent's own servers.
FORWARDER_PORT = 47080
EGRESS_PORT = 47081  # the egress forwarder's, when the agent may go out
TOKEN_ENV = "OPENWHAM_GATEWAY_TOKEN"
PROVIDER_ID = "openwham"
ASK_PROFILE = "ask"
# Exit status of the launcher when the forwarder does not come up (Codex never ran).
LAUNCHER_FAILED = 125

ASK_MODE_INSTRUCTIONS = (
    "This task runs in Ask mode: answer the user's question and do not change the code. "
    "The repository is mounted read-only, so edits, patches and commits fail and nothing "
    "would be kept. Read files and run commands that only read (use /tmp for scratch files), "
    "then reply with your answer."
)


NO_NETWORK_NOTE = (
    "This sandbox has no internet access (the environment's agent internet access is off): "
    "network requests fail, so use what the setup script installed."
)


def base_url(port: int = FORWARDER_PORT) -> str:
    """The provider ``base_url`` inside the sandbox: the forwarder's loopback port."""
    return f"http://127.0.0.1:{port}/v1"


# ----------------------------------------------------------------------------- CODEX_HOME


def _toml_string(value: str) -> str:
    """A TOML basic string. Control characters (and DEL) are escaped, as TOML requires;
    everything else, including non-BMP characters, is written as is."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:  # lone surrogates cannot be encoded in UTF-8
            out.append("\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def codex_home_files(
    *,
    base_url: str,
    model: str,
    reasoning_effort: str | None = None,
    custom_instructions: str | None = None,
    mcp_servers: Mapping[str, Mapping[str, Any]] | None = None,
    network: str | None = None,
) -> dict[str, str]:
    """The files of a fresh ``CODEX_HOME`` (name → text), to write into the per-attempt
    directory that is bound at :data:`SANDBOX_CODEX_HOME`.

    ``config.toml``: a custom provider (``wire_api = "responses"``, ``base_url`` the
    in-sandbox forwarder, bearer token from ``$OPENWHAM_GATEWAY_TOKEN``, one retry each so
    that a dead upstream fails in about a second), the model, ``model_reasoning_effort`` when
    given, the user's custom instructions as ``developer_instructions`` (Codex appends them to
    its developer message, above any repository ``AGENTS.md``), and everything Codex 0.169.0
    would try to reach offline switched off: ``[analytics]`` (OTLP metrics to ab.chatgpt.com;
    its DNS timeouts held the exit for 5 s), ``features.plugins`` (``git ls-remote`` of
    github.com/openai/plugins and api.github.com), the hosted ``web_search`` tool (the agent
    has no internet; OpenAI-compatible servers may not know the tool) and the update check.
    The gateway token is kept out of the agent's commands' environment. Per-turn work an
    attempt does not need is off too: ``features.goals`` (three goal tools in every request,
    a goal store read each turn, turns started by a goal's automatic continuation) and
    ``[skills.bundled]`` (Codex's own skills, written into each ``CODEX_HOME``, scanned
    each turn and listed in each request; the repository's skills are still found).

    ``mcp_servers`` (the environment's, validated by ``service.environments``) become
    ``[mcp_servers.<name>]`` tables, and ``mcp_optional_startup_grace_ms = 0`` makes Codex
    wait for them (each up to its startup timeout) before the first request: since 0.147
    Codex gives servers one second and then runs the turn without the tools of those still
    starting, so a Python server on a busy machine would be missing at random.

    ``network`` (a one-line summary of the agent's internet access, ``None`` when off) sets
    ``[sandbox_workspace_write] network_access``, and a note of it (:func:`network_note`)
    follows the user's instructions: Codex runs with its own sandbox bypassed (bubblewrap is
    the sandbox), and under ``danger-full-access`` its environment context tells the model
    "Network access is enabled" whatever the sandbox allows.

    ``ask.config.toml``: the profile :func:`command` selects in Ask mode; it adds the Ask-mode
    note to the developer instructions.
    """
    if not model.strip():
        raise ValueError("model must not be empty")
    custom = (custom_instructions or "").strip()
    custom = with_network_note(custom, network)
    lines = [
        "# Generated by openwham for one attempt (Codex CLI 0.169.0).",
        f"model = {_toml_string(model)}",
        f"model_provider = {_toml_string(PROVIDER_ID)}",
    ]
    if reasoning_effort:
        lines.append(f"model_reasoning_effort = {_toml_string(reasoning_effort)}")
    if custom:
        lines.append(f"developer_instructions = {_toml_string(custom)}")
    if mcp_servers:
        lines.append("mcp_optional_startup_grace_ms = 0")
    lines += [
        'web_search = "disabled"',
        "check_for_update_on_startup = false",
        "",
        f"[model_providers.{PROVIDER_ID}]",
        'name = "openwham gateway"',
        f"base_url = {_toml_string(base_url)}",
        'wire_api = "responses"',
        f"env_key = {_toml_string(TOKEN_ENV)}",
        "request_max_retries = 1",
        "stream_max_retries = 1",
        "",
        "[shell_environment_policy]",
        f"exclude = [{_toml_string(TOKEN_ENV)}]",
        "",
        "[sandbox_workspace_write]",
        f"network_access = {'true' if network else 'false'}",
        "",
        "[analytics]",
        "enabled = false",
        "",
        "[features]",
        "plugins = false",
        # Goals: no create_goal/get_goal/update_goal tools in every request, no goal
        # store read each turn, and no turn started by a goal's automatic continuation
        # (an attempt is one turn per prompt).
        "goals = false",
        "",
        # Codex's bundled skills (imagegen, openai-docs, skill-installer, skill-creator,
        # review-agent): made for a local Codex with network and the OpenAI image tool; not
        # written into each attempt's CODEX_HOME (~500 KB per standby), not scanned at each
        # turn, not listed in every request (~2 KB). The repository's own skills stay.
        "[skills.bundled]",
        "enabled = false",
        "",
    ]
    lines += _mcp_tables(mcp_servers or {})
    ask = ask_instructions(custom)
    return {
        "config.toml": "\n".join(lines),
        f"{ASK_PROFILE}.config.toml": (
            "# Ask mode (run_environment_in_qa_mode), layered on config.toml by `--profile`.\n"
            f"developer_instructions = {_toml_string(ask)}\n"
        ),
    }


_MCP_STRINGS = ("command", "cwd", "url")
_MCP_NUMBERS = ("startup_timeout_sec", "tool_timeout_sec")


def _mcp_tables(servers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``[mcp_servers.<name>]`` tables (names are ``[A-Za-z0-9_-]``: bare TOML keys)."""
    lines: list[str] = []
    for name in sorted(servers):
        spec = servers[name]
        lines.append(f"[mcp_servers.{name}]")
        lines += [f"{k} = {_toml_string(str(spec[k]))}" for k in _MCP_STRINGS if spec.get(k)]
        if spec.get("args"):
            args = ", ".join(_toml_string(str(a)) for a in spec["args"])
            lines.append(f"args = [{args}]")
        lines += [f"{k} = {float(spec[k])!r}" for k in _MCP_NUMBERS if spec.get(k) is not None]
        if spec.get("required"):
            lines.append("required = true")
        if spec.get("env"):
            lines.append(f"[mcp_servers.{name}.env]")
            env = spec["env"]
            lines += [f"{_toml_string(str(k))} = {_toml_string(str(env[k]))}" for k in sorted(env)]
        lines.append("")
    return lines


def with_network_note(custom: str, network: str | None) -> str:
    """The user's instructions (stripped), then what the agent's internet access is."""
    note = network_note(network)
    return f"{custom}\n\n{note}" if custom else note


def network_note(network: str | None) -> str:
    """What the agent is told about its internet access (developer instructions): Codex's
    own environment context says "Network access is enabled" under ``danger-full-access``
    whatever the sandbox allows."""
    if not network:
        return NO_NETWORK_NOTE
    return (
        "Internet access goes through an HTTP proxy (http_proxy and https_proxy are set; "
        f"curl, pip, npm, git and cargo use them): {network} Requests the policy refuses get "
        "HTTP 403 from the proxy; host and private network addresses are always refused."
    )


def ask_instructions(custom: str) -> str:
    """Ask mode's developer instructions: the user's own (stripped), then the Ask note."""
    return f"{custom}\n\n{ASK_MODE_INSTRUCTIONS}" if custom else ASK_MODE_INSTRUCTIONS


# ----------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class CodexCommand:
    """``argv`` to run in the sandbox (after :func:`launcher`) and the ``stdin`` to feed."""

    argv: list[str]
    stdin: bytes


def command(
    prompt: str,
    *,
    workdir: str = SANDBOX_WORKDIR,
    qa_mode: bool = False,
    executable: str = SANDBOX_CODEX_BIN,
) -> CodexCommand:
    """:func:`exec_argv` and the prompt to feed on its stdin."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    argv = exec_argv(workdir=workdir, qa_mode=qa_mode, executable=executable)
    return CodexCommand(argv=argv, stdin=prompt.encode("utf-8", "replace"))


def exec_argv(
    *,
    workdir: str = SANDBOX_WORKDIR,
    qa_mode: bool = False,
    executable: str = SANDBOX_CODEX_BIN,
) -> list[str]:
    """``codex exec --json … -C <workdir> -``, the prompt on stdin (no argv size limit, a
    prompt starting with ``-`` stays a prompt, and Codex can be started before the prompt is
    known: it does its start-up work, ~100 ms, before it reads stdin).

    ``--dangerously-bypass-approvals-and-sandbox`` because openwham's sandbox is the sandbox:
    Codex's own (``-s read-only`` / ``workspace-write``) would start a nested bubblewrap,
    which the outer sandbox forbids, and every command would fail. Ask mode therefore relies on
    the read-only workspace mount and selects the ``ask`` profile (see
    :func:`codex_home_files`); the prompt is left as the user wrote it. ``--strict-config``
    turns a config key this Codex version does not know into an error instead of a silently
    ignored setting.
    """
    argv = [
        executable,
        "exec",
        "--json",
        "--strict-config",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",
        "-C",
        workdir,
    ]
    if qa_mode:
        argv += ["--profile", ASK_PROFILE]
    argv.append("-")
    return argv


def resume_argv(
    thread_id: str,
    *,
    qa_mode: bool = False,
    custom_instructions: str | None = None,
    executable: str = SANDBOX_CODEX_BIN,
) -> list[str]:
    """``codex exec resume --json … <thread id> -``: a follow-up continues the previous
    attempt's conversation (its session files are in the new attempt's CODEX_HOME), the new
    prompt on stdin. ``resume`` has neither ``-C`` (the sandbox starts in the workspace) nor
    ``--profile``: Ask mode's instructions come as a ``-c`` override instead."""
    if not re.fullmatch(r"[0-9A-Za-z-]{8,64}", thread_id):
        raise ValueError(f"not a Codex thread id: {thread_id!r}")
    argv = [
        executable,
        "exec",
        "resume",
        "--json",
        "--strict-config",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",
    ]
    if qa_mode:
        ask = ask_instructions((custom_instructions or "").strip())
        argv += ["-c", f"developer_instructions={_toml_string(ask)}"]
    return [*argv, thread_id, "-"]


READY_MARKER = "openwham: sandbox ready"
"""What the launcher prints on stderr once the forwarder is up, just before it execs Codex
(the sandbox's binds are in place by then; ``bwrap.start(ready_marker=…)`` swallows it)."""

WRITTEN_MARKER = "openwham: after-script done"
"""What the launcher prints on stderr once its ``after`` script has ended (possibly while
Codex is still closing down): the engine may read the script's result from then on."""

_LAUNCHER = """\
set -u
python=$1 forwarder=$2 listen=$3 socket=$4 timeout=$5 after=$6 egress_listen=$7 egress=$8
driver=$9
shift 9
trap '' USR2  # a cancel before the agent runs: the host kills the sandbox after its grace
log=/tmp/.openwham-forwarder.log
exec 3< <(exec "$python" -I "$forwarder" --listen "$listen" --unix "$socket" </dev/null 2>"$log")
fwd_pid=$!
if ! read -r -t "$timeout" line <&3 || [ "${line%% *}" != ready ]; then
  echo "openwham: the model gateway forwarder did not start: $(tail -c 2000 "$log" 2>/dev/null)" >&2
  exit @FAILED@
fi
exec 3<&-
if [ -n "$egress" ]; then
  elog=/tmp/.openwham-egress.log
  exec 3< <(exec "$python" -I "$forwarder" --listen "$egress_listen" --unix "$egress" \
    --pass-socket </dev/null 2>"$elog")
  if ! read -r -t "$timeout" line <&3 || [ "${line%% *}" != ready ]; then
    echo "openwham: the network forwarder did not start: $(tail -c 2000 "$elog" 2>/dev/null)" >&2
    exit @FAILED@
  fi
  exec 3<&-
fi
[ -n "$driver" ] || echo "@READY@" >&2  # a driver says it once Codex waits for its prompt
if [ -z "$after" ]; then trap - USR2; exec "$@"; fi
early=0 cancel=0
trap 'early=1' USR1
# In the background, bash would give Codex (and every command it runs) /dev/null as stdin
# and SIGINT/SIGQUIT ignored: both put back.
( trap - INT QUIT USR2; exec "$@" ) <&0 &
codex=$!
# USR2, the host's cancel: passed on to Codex (the app-server driver interrupts its turn);
# once it has exited the sandbox ends without running the script
trap 'cancel=1; kill -USR2 "$codex" 2>/dev/null' USR2
reap() {  # wait for Codex to exit (a trap's signal ends a wait early); $1: or for USR1
  while :; do
    wait "$codex"
    status=$?
    if [ -n "${1:-}" ] && [ "$early" = 1 ]; then return; fi
    kill -0 "$codex" 2>/dev/null || return
  done
}
status=0
[ "$early" = 1 ] || reap early
trap '' USR1
if [ "$cancel" = 1 ]; then
  ! kill -0 "$codex" 2>/dev/null || reap
  kill -KILL -1 2>/dev/null
  exit "$status"
fi
if [ "$early" = 1 ]; then
  # The host saw the agent's last model response (or turn.completed): Codex runs no more
  # tools, only closes down (its session files). Kill everything else but the forwarder
  # (should Codex ask the model again after all, it still gets through; the host then
  # computes the diff anew) and run the script while Codex exits. Pass after pass, until a
  # pass finds no process it had not killed before: a killed process cannot fork, so a
  # child it forked before the kill shows up in the next pass.
  killed=" "
  for _ in 1 2 3 4 5 6 7 8; do
    left=0
    for d in /proc/[0-9]*; do
      p=${d#/proc/}
      case " 1 $$ $codex $fwd_pid$killed" in *" $p "*) continue ;; esac
      if [ -n "$driver" ] && { stat=$(< "$d/stat"); } 2>/dev/null; then
        # the driver's own child (the app-server) writes the session files: spared; the
        # comm field may hold anything, so the fields are read after its last ")"
        read -r -a f <<< "${stat##*) }"
        [ "${f[1]:-}" = "$codex" ] && continue
      fi
      kill -KILL "$p" 2>/dev/null
      killed="$killed$p "
      left=1
    done
    [ "$left" = 0 ] && break
  done
  if [ "$left" = 0 ]; then
    (exec -c /bin/bash -c "$after" openwham-after) </dev/null >/dev/null 2>&1
    echo "@WRITTEN@" >&2
    reap
    exit "$status"
  fi
  reap
  if [ "$cancel" = 1 ]; then kill -KILL -1 2>/dev/null; exit "$status"; fi
fi
kill -KILL -1 2>/dev/null  # every process left in the sandbox but this shell (and init)
(exec -c /bin/bash -c "$after" openwham-after) </dev/null >/dev/null 2>&1
echo "@WRITTEN@" >&2
exit $status
"""
_LAUNCHER = (
    _LAUNCHER.replace("@FAILED@", str(LAUNCHER_FAILED))
    .replace("@READY@", READY_MARKER)
    .replace("@WRITTEN@", WRITTEN_MARKER)
)


def launcher(
    codex_argv: Sequence[str],
    *,
    port: int = FORWARDER_PORT,
    python: str = SANDBOX_PYTHON,
    forwarder: str = SANDBOX_FORWARDER,
    socket: str = SANDBOX_GATEWAY_SOCKET,
    timeout_seconds: int = 10,
    after: str = "",
    egress: str = "",
    egress_port: int = EGRESS_PORT,
    driver: bool = False,
) -> list[str]:
    """The sandbox's command: bash starts the forwarder (``127.0.0.1:port`` → the gateway
    socket), waits for its ``ready`` line, prints :data:`READY_MARKER` on stderr, then execs
    ``codex_argv``. The forwarder lives as Codex's child and dies with the sandbox. If it does
    not come up, the launcher prints ``openwham: the model gateway forwarder did not start: …``
    and exits :data:`LAUNCHER_FAILED`.

    ``after``: a bash script to run in the same sandbox once Codex has exited (the engine's
    diff, which so needs no second sandbox). Codex then runs as a child instead of being
    exec'd; when it exits, every other process in the sandbox is killed first (the agent's
    leftovers cannot change the workspace under the script), the script runs with no
    stdin/stdout/stderr (it reports through files) and an empty environment (``exec -c``:
    none of the environment's variables, e.g. an old row's ``GIT_DIR`` or ``BASH_ENV``, reach
    it; the script sets what it needs), and the launcher exits with Codex's
    status. A ``SIGUSR1`` to the launcher (the host sends it when the agent's last model
    response goes through the gateway, or on ``turn.completed``) starts the script early:
    every process but Codex and the forwarder is killed and the script runs while Codex
    finishes its turn, writes its session files and exits (~40 ms saved per attempt).
    Either way the launcher prints :data:`WRITTEN_MARKER` on stderr when the script has
    ended. A ``SIGUSR2`` (the host's cancel, for a runtime with an ``interrupt_signal``) is
    passed on to Codex's process; once that has exited, everything left is killed and the
    script does not run.

    ``egress``: the egress socket in the sandbox when the agent may go out; a second
    forwarder (``127.0.0.1:egress_port`` → that socket) is started the same way before
    Codex, for the proxy variables the engine sets.

    ``driver`` (app-server mode, where ``codex_argv`` is ``runtimes/appserver_driver.py``):
    the driver, not the launcher, prints :data:`READY_MARKER`, once its Codex has started
    its thread and waits for the prompt; and the early pass also spares the direct children
    of ``codex_argv``'s process (the app-server, which writes the session files), while the
    agent's commands, the app-server's children, are killed as before. Exec mode must not
    set it: there Codex's direct children are the agent's commands."""
    if not codex_argv:
        raise ValueError("empty Codex command")
    return [
        "/bin/bash",
        "-c",
        _LAUNCHER,
        "openwham-launch",
        python,
        forwarder,
        f"127.0.0.1:{port}",
        socket,
        str(timeout_seconds),
        after,
        f"127.0.0.1:{egress_port}",
        egress,
        "1" if driver else "",
        *codex_argv,
    ]


def sandbox_env(token: str) -> dict[str, str]:
    """Environment variables Codex needs inside the sandbox (on top of the sandbox's own)."""
    return {"CODEX_HOME": SANDBOX_CODEX_HOME, TOKEN_ENV: token}


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class TokenUsage:
    """Token counts of ``turn.completed``."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class WorklogUpdate:
    """A work-log message, new (``new``) or replacing the earlier one with the same id."""

    message: WorklogMessage
    new: bool


@dataclass(frozen=True)
class StatusUpdate:
    """A new live status line (``latest_event.text``)."""

    text: str


Update = WorklogUpdate | StatusUpdate


@dataclass(frozen=True)
class Outcome:
    """How the run ended. ``updates``: last work-log changes made by ``finish`` (messages
    still in progress are closed)."""

    status: Literal["completed", "failed"]
    error: TurnError | None
    final_message: str | None
    usage: TokenUsage | None
    updates: tuple[Update, ...] = ()


# Status line texts (Codex cloud shows Thinking, Working, Completing the task, …).
WORKING = "Working"
THINKING = "Thinking"
COMPLETING = "Completing the task"

MAX_OUTPUT_CHARS = 64_000  # per command output kept in the work log
_OUTPUT_HEAD = 8_000
_STATUS_CHARS = 80

_SHELLS = {"bash", "sh", "zsh", "dash"}
_KINDS = {"add": "A", "delete": "D", "update": "M"}


def _shorten(text: str, limit: int = _STATUS_CHARS) -> str:
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    if len(text.strip().splitlines()) > 1:
        line += " …"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _cap_output(text: str) -> str:
    if len(text) <= MAX_OUTPUT_CHARS:
        return text
    tail = MAX_OUTPUT_CHARS - _OUTPUT_HEAD
    omitted = len(text) - _OUTPUT_HEAD - tail
    return f"{text[:_OUTPUT_HEAD]}\n… {omitted} characters omitted …\n{text[-tail:]}"


def shell_command(command: str) -> str:
    """The script inside Codex's ``/bin/bash -lc '<script>'`` wrapper (else ``command``)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    if (
        len(words) == 3
        and words[0].rsplit("/", 1)[-1] in _SHELLS
        and words[1] in ("-c", "-lc", "-cl")
    ):
        return words[2]
    return command


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


MAX_DIAGNOSTICS = 100


@dataclass
class _Entry:
    message: WorklogMessage
    done: bool = False


@dataclass
class EventTranslator:
    """Turns ``codex exec --json`` lines into WHAM work-log messages and status lines.

    Feed every stdout line to :meth:`feed` (quick, no I/O; safe to call from the sandbox's
    reader thread while another thread reads :attr:`worklog`) and store the updates it
    returns, in order; when the process has ended, call :meth:`finish`. A line that is not a
    JSON object (e.g. a piece of a line over the sandbox's 4 MiB line limit) becomes a
    diagnostic.

    Work-log shapes (``wham-api.md`` §4.8): the prompt as a ``user`` text message (weight 0);
    reasoning as assistant text with ``metadata.reasoning_status = "is_reasoning"``; agent
    messages as assistant text (the last one, when the turn completes, gets
    ``channel = "final"`` and ``end_turn = true``: it is also :attr:`final_message`); a command
    as an assistant ``code`` message to ``container.exec`` (text ``{"cmd": "<script>"}``,
    ``channel = "analysis"``), its output as a ``tool`` message from ``container.exec`` with
    ``content_type = "terminal_output"`` (``metadata.exit_code``; status ``failed`` for a
    non-zero exit); a file change as a ``code`` message to ``apply_patch`` listing
    ``M path`` / ``A path`` / ``D path`` and a ``tool`` message with the result; a plan
    (``todo_list``) as assistant text; MCP calls and web searches as ``code`` messages to
    ``<server>.<tool>`` / ``web.search``. ``error`` items and events are diagnostics only
    (:attr:`diagnostics`); unknown event and item types are ignored.
    """

    workdir: str = SANDBOX_WORKDIR
    prompt: str | None = None
    clock: Callable[[], float] = time.time
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))

    status: str | None = field(default=None, init=False)
    usage: TokenUsage | None = field(default=None, init=False)
    thread_id: str | None = field(default=None, init=False)
    diagnostics: list[str] = field(default_factory=list, init=False)
    _entries: dict[str, _Entry] = field(default_factory=dict, init=False)
    _agent_messages: list[str] = field(default_factory=list, init=False)  # entry keys
    _turn: Literal["none", "started", "completed", "failed"] = field(default="none", init=False)
    _failure: str | None = field(default=None, init=False)
    _pending: list[Update] = field(default_factory=list, init=False)
    _outcome: Outcome | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.prompt is not None:
            now = self.clock()
            self._put(
                "prompt",
                WorklogMessage(
                    id=self.new_id(),
                    author=WorklogAuthor(role="user"),
                    create_time=now,
                    update_time=now,
                    content=WorklogContent(content_type="text", parts=[self.prompt]),
                    weight=0.0,
                    metadata=WorklogMessageMetadata.model_validate(
                        {"l1239dk1": {"inline_comments": []}}
                    ),
                ),
                done=True,
            )

    # ------------------------------------------------------------------ public

    @property
    def worklog(self) -> Worklog:
        """Every message so far, in order, latest versions."""
        with self._lock:
            entries = list(self._entries.values())
            return Worklog(messages=[e.message.model_copy(deep=True) for e in entries])

    @property
    def turn_completed(self) -> bool:
        """Codex reported ``turn.completed``: it runs no more tools, only exits."""
        return self._turn == "completed"

    @property
    def final_message(self) -> str | None:
        """The agent's answer: its last message, once the turn completed."""
        with self._lock:
            return self._final()

    def take_initial(self) -> list[Update]:
        """Updates made before any line was fed (the prompt message), once."""
        out, self._pending = self._pending, []
        return out

    def feed(self, line: str) -> list[Update]:
        """Translate one JSONL line; returns the work-log and status changes it caused."""
        with self._lock:
            out, self._pending = self._pending, []
            line = line.strip()
            if not line or self._outcome is not None:
                return out
            try:
                event = json.loads(line)
            except ValueError:
                self._diagnostic(f"not JSON: {line[:200]}")
                return out
            if not isinstance(event, dict):
                self._diagnostic(f"not an event: {line[:200]}")
                return out
            self._apply(event, line, out)
            return out

    def feed_event(self, event: dict[str, Any]) -> list[Update]:
        """:meth:`feed` for an event already parsed (``runtimes.appserver`` makes them)."""
        with self._lock:
            out, self._pending = self._pending, []
            if self._outcome is None:
                self._apply(event, None, out)
            return out

    def finish(
        self,
        exit_code: int | None,
        *,
        killed_reason: str | None = None,
        upstream_error: str | None = None,
        stderr: str = "",
    ) -> Outcome:
        """The outcome once the process has ended.

        Completed only after ``turn.completed`` (and no limit kill). Otherwise failed, with
        the clearest message available: the sandbox's ``killed_reason`` (a limit), the
        gateway's ``upstream_error`` (names the setting to fix; Codex hides some, e.g. quota),
        the ``turn.failed`` message, the last ``error`` event, the last stderr line.
        """
        with self._lock:
            return self._finish(exit_code, killed_reason, upstream_error, stderr)

    # ------------------------------------------------------------------ internals

    def _apply(self, event: dict[str, Any], line: str | None, out: list[Update]) -> None:
        try:
            self._event(event, out)
        except Exception as exc:  # an unexpected shape must not stop the attempt
            text = line if line is not None else json.dumps(event, default=str)
            self._diagnostic(f"could not translate {text[:200]}: {exc!r}")

    def _final(self) -> str | None:
        if self._turn != "completed" or not self._agent_messages:
            return None
        parts = self._entries[self._agent_messages[-1]].message.content.parts or []
        return "".join(p for p in parts if isinstance(p, str))

    def _diagnostic(self, text: str) -> None:
        self.diagnostics.append(text)
        del self.diagnostics[:-MAX_DIAGNOSTICS]

    def _finish(
        self, exit_code: int | None, killed_reason: str | None, upstream: str | None, stderr: str
    ) -> Outcome:
        if self._outcome is not None:
            return self._outcome
        out, self._pending = self._pending, []
        completed = self._turn == "completed" and killed_reason is None
        error: TurnError | None = None
        if not completed:
            error = self._error(exit_code, killed_reason, upstream, stderr)
        now = self.clock()
        for entry in self._entries.values():
            if entry.done:
                continue
            entry.done = True
            msg = entry.message
            msg.update_time = now
            if completed:
                msg.status = "finished_successfully"
            else:
                msg.status = "failed"
                msg.metadata.error = TurnError(code="interrupted", message="The run ended first.")
            out.append(WorklogUpdate(msg.model_copy(deep=True), new=False))
        self._outcome = Outcome(
            status="completed" if completed else "failed",
            error=error,
            final_message=self._final() if completed else None,
            usage=self.usage,
            updates=tuple(out),
        )
        return self._outcome

    def _error(
        self, exit_code: int | None, killed: str | None, upstream: str | None, stderr: str
    ) -> TurnError:
        if killed:
            return TurnError(code="limit_exceeded", message=f"The attempt was stopped: {killed}.")
        if upstream and self._turn != "completed":
            return TurnError(code="model_error", message=f"Model error: {upstream}")
        if self._turn == "failed":
            return TurnError(code="model_error", message=self._failure or "The agent failed.")
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        if exit_code == LAUNCHER_FAILED and lines and lines[-1].startswith("openwham:"):
            return TurnError(code="agent_error", message=lines[-1].removeprefix("openwham: "))
        if self.thread_id is None and self._turn == "none":
            # Codex did not start (e.g. "Error loading config.toml: <file>:2:1: unknown …"):
            # its reason comes first on stderr
            detail = " ".join(lines[:2])
        else:
            detail = self.diagnostics[-1] if self.diagnostics else (lines[-1] if lines else "")
        message = f"The agent exited with status {exit_code} before finishing its turn"
        if exit_code == 0:
            message = "The agent exited before finishing its turn"
        if detail:
            message += f": {detail[:1000]}"
        return TurnError(code="agent_error", message=message)

    def _set_status(self, text: str, out: list[Update]) -> None:
        if text != self.status:
            self.status = text
            out.append(StatusUpdate(text))

    def _put(
        self, key: str, message: WorklogMessage, *, done: bool, out: list[Update] | None = None
    ) -> None:
        target = self._pending if out is None else out
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry(message, done)
            target.append(WorklogUpdate(message.model_copy(deep=True), new=True))
            return
        message.id = entry.message.id
        message.create_time = entry.message.create_time
        same = message.model_copy(update={"update_time": entry.message.update_time})
        if same == entry.message and entry.done == done:
            return
        entry.message, entry.done = message, done
        target.append(WorklogUpdate(message.model_copy(deep=True), new=False))

    def _tool_result(
        self,
        key: str,
        name: str,
        content: WorklogContent,
        *,
        ok: bool,
        out: list[Update],
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """The finished answer of a tool (a command's output, a patch's result) as the
        ``tool`` message that follows its call in the work log."""
        message = self._message(
            key,
            role="tool",
            name=name,
            content=content,
            status="finished_successfully" if ok else "failed",
            channel="analysis",
            metadata=metadata,
        )
        self._put(key, message, done=True, out=out)

    def _message(
        self,
        key: str,
        *,
        role: str = "assistant",
        name: str | None = None,
        content: WorklogContent,
        status: str,
        recipient: str = "all",
        channel: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        end_turn: bool | None = False,
    ) -> WorklogMessage:
        existing = self._entries.get(key)
        now = self.clock()
        return WorklogMessage(
            id=existing.message.id if existing else self.new_id(),
            author=WorklogAuthor(role=role, name=name),
            create_time=existing.message.create_time if existing else now,
            update_time=now,
            content=content,
            status=status,
            end_turn=end_turn,
            weight=1.0,
            metadata=WorklogMessageMetadata.model_validate(dict(metadata or {})),
            recipient=recipient,
            channel=channel,
        )

    def _event(self, event: dict[str, Any], out: list[Update]) -> None:
        kind = event.get("type")
        if kind == "thread.started":
            self.thread_id = str(event.get("thread_id") or "") or None
            self._set_status(WORKING, out)
        elif kind == "turn.started":
            self._turn = "started"
            self._set_status(WORKING, out)
        elif kind == "turn.completed":
            self._turn = "completed"
            u = _dict(event.get("usage"))
            self.usage = TokenUsage(
                input_tokens=_int(u.get("input_tokens")),
                cached_input_tokens=_int(u.get("cached_input_tokens")),
                output_tokens=_int(u.get("output_tokens")),
                reasoning_output_tokens=_int(u.get("reasoning_output_tokens")),
            )
            if self._agent_messages:  # the last agent message is the answer
                final = self._entries[self._agent_messages[-1]].message
                final.channel, final.end_turn, final.update_time = "final", True, self.clock()
                out.append(WorklogUpdate(final.model_copy(deep=True), new=False))
            self._set_status(COMPLETING, out)
        elif kind == "turn.failed":
            self._turn = "failed"
            message = _dict(event.get("error")).get("message")
            self._failure = str(message) if message else None
        elif kind == "error":
            self._diagnostic(str(event.get("message") or ""))
        elif kind in ("item.started", "item.updated", "item.completed"):
            item = event.get("item")
            if isinstance(item, dict):
                self._item(item, done=kind == "item.completed", out=out)

    def _item(self, item: dict[str, Any], *, done: bool, out: list[Update]) -> None:
        kind = item.get("type")
        key = str(item.get("id") or self.new_id())
        status_value = item.get("status")
        failed = status_value in ("failed", "declined")
        if kind == "agent_message":
            text = str(item.get("text") or "")
            self._put(
                key,
                self._message(
                    key,
                    content=WorklogContent(content_type="text", parts=[text]),
                    status="finished_successfully" if done else "in_progress",
                    channel="commentary",
                ),
                done=done,
                out=out,
            )
            if key not in self._agent_messages:
                self._agent_messages.append(key)
            self._set_status(WORKING, out)
        elif kind == "reasoning":
            text = str(item.get("text") or "")
            self._put(
                key,
                self._message(
                    key,
                    content=WorklogContent(content_type="text", parts=[text]),
                    status="finished_successfully" if done else "in_progress",
                    metadata={
                        "reasoning_status": "is_reasoning",
                        "exclude_after_next_user_message": True,
                    },
                ),
                done=done,
                out=out,
            )
            self._set_status(THINKING, out)
        elif kind == "command_execution":
            self._command(key, item, done=done, out=out)
        elif kind == "file_change":
            self._file_change(key, item, done=done, failed=failed, out=out)
        elif kind == "todo_list":
            lines = [
                f"- [{'x' if e.get('completed') else ' '}] {e.get('text', '')}"
                for e in _list(item.get("items"))
                if isinstance(e, dict)
            ]
            self._put(
                key,
                self._message(
                    key,
                    content=WorklogContent(
                        content_type="text", parts=["Plan:\n" + "\n".join(lines)]
                    ),
                    status="finished_successfully" if done else "in_progress",
                ),
                done=done,
                out=out,
            )
        elif kind == "mcp_tool_call":
            tool = f"{item.get('server') or 'mcp'}.{item.get('tool') or 'tool'}"
            self._tool_call(
                key,
                recipient=tool,
                call_text=json.dumps(item.get("arguments"), ensure_ascii=False),
                result=item.get("error") or item.get("result"),
                done=done,
                failed=failed or bool(item.get("error")),
                status_text=f"Calling {tool}",
                out=out,
            )
        elif kind == "web_search":
            query = str(item.get("query") or "")
            self._tool_call(
                key,
                recipient="web.search",
                call_text=json.dumps({"query": query}, ensure_ascii=False),
                result=None,
                done=done,
                failed=failed,
                status_text="Searching the web",
                out=out,
            )
        elif kind == "error":
            self._diagnostic(str(item.get("message") or ""))
        # anything else (collab_tool_call, new item types): not shown

    def _tool_call(
        self,
        key: str,
        *,
        recipient: str,
        call_text: str,
        result: Any,
        done: bool,
        failed: bool,
        status_text: str,
        out: list[Update],
    ) -> None:
        self._put(
            key,
            self._message(
                key,
                content=WorklogContent(
                    content_type="code",
                    language="unknown",
                    response_format_name=None,
                    text=call_text,
                ),
                status="finished_successfully" if done else "in_progress",
                recipient=recipient,
                channel="analysis",
            ),
            done=done,
            out=out,
        )
        if done:
            if result is not None:
                text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
                content = WorklogContent(content_type="text", parts=[_cap_output(text)])
                self._tool_result(key + "/result", recipient, content, ok=not failed, out=out)
            self._set_status(WORKING, out)
        else:
            self._set_status(status_text, out)

    def _command(self, key: str, item: dict[str, Any], *, done: bool, out: list[Update]) -> None:
        script = shell_command(str(item.get("command") or ""))
        self._put(
            key,
            self._message(
                key,
                content=WorklogContent(
                    content_type="code",
                    language="unknown",
                    response_format_name=None,
                    text=json.dumps({"cmd": script}, ensure_ascii=False),
                ),
                status="finished_successfully" if done else "in_progress",
                recipient="container.exec",
                channel="analysis",
            ),
            done=done,
            out=out,
        )
        if not done:
            self._set_status(f"Running {_shorten(script)}", out)
            return
        exit_code = item.get("exit_code")
        ok = exit_code == 0 and item.get("status") != "failed"
        output = _cap_output(str(item.get("aggregated_output") or ""))
        self._tool_result(
            key + "/output",
            "container.exec",
            WorklogContent(content_type="terminal_output", parts=[output]),
            ok=ok,
            out=out,
            metadata={"exit_code": exit_code} if isinstance(exit_code, int) else None,
        )
        self._set_status(WORKING, out)

    def _relative(self, path: str) -> str:
        prefix = self.workdir.rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path

    def _file_change(
        self, key: str, item: dict[str, Any], *, done: bool, failed: bool, out: list[Update]
    ) -> None:
        paths = [
            (_KINDS.get(str(c.get("kind")), "M"), self._relative(str(c.get("path") or "")))
            for c in _list(item.get("changes"))
            if isinstance(c, dict)
        ]
        listing = "\n".join(f"{flag} {path}" for flag, path in paths)
        self._put(
            key,
            self._message(
                key,
                content=WorklogContent(
                    content_type="code", language="unknown", response_format_name=None, text=listing
                ),
                status="finished_successfully" if done else "in_progress",
                recipient="apply_patch",
                channel="analysis",
            ),
            done=done,
            out=out,
        )
        if not done:
            if paths:
                others = len(paths) - 1
                more = f" and {others} other file{'s' if others > 1 else ''}" if others else ""
                self._set_status(f"Editing {_shorten(paths[0][1], 60)}{more}", out)
            return
        result = (
            "Failed to apply the patch."
            if failed
            else "Success. Updated the following files:\n" + listing
        )
        self._tool_result(
            key + "/result",
            "apply_patch",
            WorklogContent(content_type="text", parts=[result]),
            ok=not failed,
            out=out,
        )
        self._set_status(WORKING, out)


# ----------------------------------------------------------------------------- the runtime


@dataclass(frozen=True)
class CodexRuntime:
    """The Codex CLI as the engine's ``AgentRuntime`` (runtimes/agent.py)."""

    ready_marker: str = READY_MARKER
    written_marker: str = WRITTEN_MARKER
    home_mount: str = SANDBOX_CODEX_HOME
    egress_listen: str = f"127.0.0.1:{EGRESS_PORT}"
    # the gateway forwarder, and the launcher that only waits for Codex
    idle_helpers: tuple[str, ...] = (SANDBOX_FORWARDER, "openwham-launch")
    interrupt_signal: int | None = None  # exec mode: a cancel kills the sandbox

    def home_files(
        self,
        *,
        model: str,
        reasoning_effort: str | None,
        custom_instructions: str | None,
        mcp_servers: Mapping[str, Mapping[str, Any]] | None = None,
        network: str | None = None,
    ) -> dict[str, str]:
        return codex_home_files(
            base_url=base_url(),
            model=model,
            reasoning_effort=reasoning_effort,
            custom_instructions=custom_instructions,
            mcp_servers=mcp_servers,
            network=network,
        )

    def binds(self, *, forwarder: Path, gateway_socket: Path) -> dict[Path, str]:
        return {
            native_binary(): SANDBOX_CODEX_BIN,
            forwarder: SANDBOX_FORWARDER,
            gateway_socket: SANDBOX_GATEWAY_SOCKET,
        }

    def env(self, token: str) -> dict[str, str]:
        return sandbox_env(token)

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
        instructions = with_network_note((custom_instructions or "").strip(), network)
        agent = (
            exec_argv(qa_mode=qa_mode)
            if resume_thread is None
            else resume_argv(resume_thread, qa_mode=qa_mode, custom_instructions=instructions)
        )
        return launcher(agent, after=after, egress=egress or "")

    def translator(self, prompt: str) -> Translator:
        return EventTranslator(prompt=prompt)


CODEX = CodexRuntime()
