"""The consumer: `outbox run` and its operations, and ``WorkerService``, the worker inside an application.

>>> with processor.WorkerService(database_url="postgresql://app:secret@db/app") as worker:
...     worker.health()      # a WorkerHealth snapshot: state, partitions, ok, ...

See processor.service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from processor.service import WorkerHealth, WorkerService, WorkerState
    from processor.worker import WorkerStats

__all__ = ["WorkerHealth", "WorkerService", "WorkerState", "WorkerStats"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import outbox` imports processor.wakeup, and an application that only
    # writes must not load the worker (its store, its fold, the metrics client) with it.
    if name in __all__:
        from processor import service

        return getattr(service, name)
    raise AttributeError(f"module 'processor' has no attribute {name!r}")
