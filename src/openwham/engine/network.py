"""The agent phase's internet access (an environment's ``agent_network_access`` turned on).

The agent's sandbox gets an egress session of its own (``sandbox.egress``): its socket bound
at :data:`SANDBOX_EGRESS_SOCKET`, a forwarder the launcher starts, and the proxy variables
that curl, pip, npm, git and cargo read. The session's policy comes from the environment
(``claim.network_config``: the preset, the allowlist and the method rule); the address guard
refuses host, loopback, link-local and private addresses whatever it says. A standby is made
with its key's policy, and its events wait in an :class:`EventRelay` until an attempt takes it.
The session closes when the sandbox ends.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from openwham.sandbox.egress import EgressPolicy, EgressSession, ProxyEvent, agent_policy
from openwham.sandbox.provider import Sandbox

from . import setup as setup_phase
from .recorder import TurnRecorder

SANDBOX_EGRESS_SOCKET = setup_phase.SANDBOX_EGRESS_SOCKET
MAX_HELD = 1000  # a standby's events kept until it is taken


def policy(config: str) -> EgressPolicy:
    """The egress policy of a key's ``network`` (canonical JSON of ``network_config``)."""
    data = json.loads(config)
    return agent_policy(
        str(data.get("preset") or "none"),
        [str(d) for d in data.get("domains") or ()],
        bool(data.get("safe_methods_only")),
    )


def describe(config: str) -> str:
    """One sentence about the policy, for the agent's instructions."""
    data = json.loads(config)
    preset, domains = data.get("preset") or "none", list(data.get("domains") or ())
    if preset == "all":
        reach = "any public host"
    else:
        parts = ["the common dependency hosts"] if preset == "common_dependencies" else []
        if domains:
            shown = ", ".join(domains[:30]) + (" …" if len(domains) > 30 else "")
            parts.append(shown)
        reach = " and ".join(parts) or "no host"
    methods = " with GET, HEAD and OPTIONS only" if data.get("safe_methods_only") else ""
    return f"the environment allows {reach}{methods}."


def proxy_env(listen: str) -> dict[str, str]:
    """What points curl, pip, npm, git and cargo at the egress forwarder."""
    url = f"http://{listen}"
    return {
        **setup_phase.proxy_env(listen),
        "npm_config_proxy": url,
        "npm_config_https_proxy": url,
        "PIP_PROXY": url,
        "CARGO_HTTP_PROXY": url,
    }


class EventRelay:
    """The event sink of an agent's egress session: holds events until :meth:`attach`
    (a standby's, before it is taken), then hands each to the recorder."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[dict[str, Any]] = []
        self._rec: TurnRecorder | None = None

    def __call__(self, event: ProxyEvent) -> None:
        wire = {**event.wire(), "phase": "agent"}
        with self._lock:
            if self._rec is None:
                if len(self._held) < MAX_HELD:
                    self._held.append(wire)
                return
            rec = self._rec
        rec.proxy_event(wire)

    def attach(self, rec: TurnRecorder) -> None:
        with self._lock:
            held, self._held, self._rec = self._held, [], rec
        for wire in held:
            rec.proxy_event(wire)


def close_with(proc: Sandbox, session: EgressSession) -> None:
    """Close ``session`` when ``proc``'s sandbox ends (killed, dropped or done)."""
    ended = threading.Event()
    proc.notify_on_exit(ended)

    def wait() -> None:
        ended.wait()
        session.close()

    threading.Thread(target=wait, name="egress-close", daemon=True).start()
