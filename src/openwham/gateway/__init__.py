"""Host-side model gateway: the sandboxed agent's only way to its model.

- :class:`Gateway` keeps per-attempt bearer tokens (``register_attempt`` / ``revoke``),
  forwards the OpenAI Responses API to the configured :class:`Upstream` with the real
  credential, meters tokens from ``response.completed`` (``usage``), enforces per-attempt
  limits and remembers each attempt's last upstream failure (``last_error``).
- :class:`GatewayServer` serves it on a host UNIX socket (``default_socket_path``).
- ``forwarder.py`` (``forwarder_path()``) runs inside the sandbox and exposes that socket as
  ``http://127.0.0.1:PORT/v1``.
- ``check_config(settings)`` says which ``WHAM_MODEL_*`` setting to fix, before any attempt.
"""

from openwham.gateway.app import Gateway, Usage
from openwham.gateway.chatgpt import ChatGPTUpstream, CodexAuthFile
from openwham.gateway.server import (
    GatewayServer,
    bind_unix_socket,
    default_socket_path,
    forwarder_path,
)
from openwham.gateway.upstream import (
    GatewayConfigError,
    OpenAIUpstream,
    Upstream,
    UpstreamError,
    check_config,
    make_upstream,
    resolve_codex_home,
)

__all__ = [
    "ChatGPTUpstream",
    "CodexAuthFile",
    "Gateway",
    "GatewayConfigError",
    "GatewayServer",
    "OpenAIUpstream",
    "Upstream",
    "UpstreamError",
    "Usage",
    "bind_unix_socket",
    "check_config",
    "default_socket_path",
    "forwarder_path",
    "make_upstream",
    "resolve_codex_home",
]
