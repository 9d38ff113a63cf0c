"""The consumer: `outbox run` and its operations, and ``WorkerService``, the worker inside an application.

>>> with processor.WorkerService(database_url="postgresql://app:secret@db/app") as worker:
...     worker.health()      # a WorkerHealth snapshot: state, partitions, ok, ...

See processor.service. Its errors are ``outbox.OutboxError``s (the tree: outbox.errors), the
public ones exported here (``processor.ConfigurationError``, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from processor.service import WorkerHealth, WorkerService, WorkerState
    from processor.worker import WorkerStats

from processor.errors import (
    ConfigurationError,
    ConsumerBusyError,
    DatabaseUnavailableError,
    NotDrainedError,
    OutboxError,
    PartitionCountError,
    PartitionMissingError,
    SchemaError,
    SubscriptionError,
    WebhookError,
)

__all__ = [
    "ConfigurationError",
    "ConsumerBusyError",
    "DatabaseUnavailableError",
    "NotDrainedError",
    "OutboxError",
    "PartitionCountError",
    "PartitionMissingError",
    "SchemaError",
    "SubscriptionError",
    "WebhookError",
    "WorkerHealth",
    "WorkerService",
    "WorkerState",
    "WorkerStats",
]
_SERVICE = {"WorkerHealth", "WorkerService", "WorkerState", "WorkerStats"}


def __getattr__(name: str) -> Any:
    # Imported on first use: `import outbox` imports processor.wakeup, and an application that only
    # writes must not load the worker (its store, its fold, the metrics client) with it. The errors
    # (above) are light: the classes only.
    if name in _SERVICE:
        from processor import service

        return getattr(service, name)
    raise AttributeError(f"module 'processor' has no attribute {name!r}")
