"""openwham.client: the Python SDK for openwham servers and chatgpt.com's Codex cloud.

```python
from openwham.client import WhamClient

with WhamClient("http://127.0.0.1:8080", token=TOKEN) as wham:
    env = wham.resolve_environment("acme/widgets")
    task = wham.create_task("Fix the failing test", env.id, attempts=2)
    wham.wait(task.task.id)
    print(wham.diff(task.task.id, attempt=2))
```

``AsyncWhamClient`` has the same methods, awaited. Answers are the wire models of
:mod:`openwham.wire`; failures are the typed errors of :mod:`openwham.client.errors`.
"""

from openwham.client.aio import AsyncWhamClient
from openwham.client.apply import ApplyResult, PatchDoesNotApply
from openwham.client.attempts import readiness, turn_diff, turn_messages
from openwham.client.errors import (
    APIError,
    AuthError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    NotLoggedIn,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
    UnexpectedAnswer,
    WhamError,
)
from openwham.client.resolve import UnknownEnvironment
from openwham.client.sse import Steps, StreamEvent
from openwham.client.sync import WhamClient
from openwham.client.urls import CHATGPT_BASE_URL, task_url

__all__ = [
    "CHATGPT_BASE_URL",
    "APIError",
    "ApplyResult",
    "AsyncWhamClient",
    "AuthError",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "NotFound",
    "NotLoggedIn",
    "PatchDoesNotApply",
    "RateLimited",
    "ServerError",
    "Steps",
    "StreamEvent",
    "TransportError",
    "Unauthorized",
    "UnexpectedAnswer",
    "UnknownEnvironment",
    "WhamClient",
    "WhamError",
    "readiness",
    "task_url",
    "turn_diff",
    "turn_messages",
]
