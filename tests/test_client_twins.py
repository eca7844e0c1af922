"""The SDK's twins cannot drift: ``WhamClient`` and ``AsyncWhamClient`` offer the same public
methods with the same parameters, defaults and types, the async one awaited (or async-iterated).

Both run the same operations from ``client/endpoints.py``; this test keeps the thin layers that
execute them in step, the way httpcore generates its sync code from the async one.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest

from openwham.client import AsyncWhamClient, WhamClient

# name in the sync twin -> name in the async twin, where the Python protocols differ
RENAMED = {"close": "aclose", "__enter__": "__aenter__", "__exit__": "__aexit__"}
# spelling of types in the async twin -> in the sync twin
_ASYNC_WORDS = [
    (r"\bAsyncWhamClient\b", "WhamClient"),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\bAsyncIterable\b", "Iterable"),
    (r"\bAsyncGenerator\b", "Generator"),
    (r"httpx\.AsyncBaseTransport\b", "httpx.BaseTransport"),
    (r"httpx\.AsyncClient\b", "httpx.Client"),
]


def _public(cls: type) -> dict[str, Callable[..., Any]]:
    names = [n for n in vars(cls) if not n.startswith("_")] + ["__init__"]
    names += [n for n in ("__enter__", "__exit__", "__aenter__", "__aexit__") if n in vars(cls)]
    return {n: getattr(cls, n) for n in names if callable(getattr(cls, n))}


def _as_sync(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    for pattern, repl in _ASYNC_WORDS:
        text = re.sub(pattern, repl, text)
    return text


def _shape(func: Callable[..., Any]) -> list[tuple[str, Any, Any, str]]:
    sig = inspect.signature(func)
    params = [(p.name, p.kind, p.default, _as_sync(p.annotation)) for p in sig.parameters.values()]
    return [*params, ("->", None, None, _as_sync(sig.return_annotation))]


def test_the_twins_have_the_same_public_methods() -> None:
    sync_names = set(_public(WhamClient))
    async_names = {RENAMED.get(n, n) for n in sync_names}
    assert async_names == set(_public(AsyncWhamClient))


@pytest.mark.parametrize("name", sorted(_public(WhamClient)))
def test_each_method_has_the_same_signature_in_both_twins(name: str) -> None:
    sync = _public(WhamClient)[name]
    aio = _public(AsyncWhamClient)[RENAMED.get(name, name)]
    assert _shape(aio) == _shape(sync)
    iterates = inspect.isgeneratorfunction(sync) or "Iterator" in _shape(sync)[-1][3]
    if name != "__init__" and not iterates:
        assert inspect.iscoroutinefunction(aio), f"AsyncWhamClient.{name} is not awaitable"
    if iterates:
        assert inspect.isasyncgenfunction(aio) or "AsyncIterator" in str(
            inspect.signature(aio).return_annotation
        )


def test_the_comparison_sees_a_drift() -> None:
    """A twin whose method lost a keyword, changed a default or a type is told apart."""

    class Drifted:
        async def diff(self, task_id: str, *, attempt: int = 2) -> str:  # default differs
            return ""

        async def wait(self, task_id: str, *, poll: float = 1.0) -> Any:  # lost timeout
            return None

    assert _shape(Drifted.diff) != _shape(WhamClient.diff)
    assert _shape(Drifted.wait) != _shape(WhamClient.wait)
