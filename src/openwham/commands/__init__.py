"""Application commands: the operations the API, the web UI and the CLI share.

Routers and web pages call these; they do not reach into the engine. A command takes what it
needs explicitly (a session, :class:`Deps` with settings, executor handle, event bus, artifact
store and locks) and owns the order of its steps: validate and write, hand attempts to the
executor inside the transaction (``enqueue``), commit, then wake the executor (``submit``)
and the turn streams. See docs/ARCHITECTURE.md.
"""

from openwham.commands.deps import Deps, ExecutorHandle, Runner, open_runner

__all__ = ["Deps", "ExecutorHandle", "Runner", "open_runner"]
