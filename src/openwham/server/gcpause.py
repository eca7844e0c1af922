"""Short pauses of the garbage collector's full collections.

CPython's collection of its oldest generation walks every object the collector tracks. Once
``wham serve`` is up it holds ~230,000 of them that live as long as the process (FastAPI's
routes and pydantic's validators, SQLAlchemy's mappers and compiled statements, the imported
modules); each full collection walked them all, 50-140 ms with the event loop stopped, a few
times a minute under load, which was the API's p99 (``./bench/load``: docs/benchmarks.md,
"Full collections"). Moving them to the permanent generation once the app is up
(``gc.freeze``, right after ``create_app`` in ``wham serve``) leaves a full collection only
the objects made since. (Not in ``create_app`` itself: a test process builds hundreds of apps.)
"""

from __future__ import annotations

import gc


def freeze_startup() -> int:
    """Collect once, then exempt every object alive now from later collections; how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
