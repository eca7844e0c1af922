"""The engine: runs attempts (``Engine.run_turn``) for executors; see docs/ARCHITECTURE.md."""

from openwham.engine.attempt import AttemptFailed, Control, Engine
from openwham.engine.executor import Executor, InProcessExecutor, recover
from openwham.engine.runner import Runner

__all__ = [
    "AttemptFailed",
    "Control",
    "Engine",
    "Executor",
    "InProcessExecutor",
    "Runner",
    "recover",
]
