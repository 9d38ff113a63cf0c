"""The processor's errors, built on outbox.errors's root (the tree is drawn there).

The CLI reports an ``OutboxError`` as one clear line (never a traceback) and exits 1. The modules
that raise these import them from here, so older import paths (``processor.worker.PartitionCountError``,
``processor.fold.UnfoldableJobError``, ``processor.batch.FencedError``) name the same classes.
"""

from __future__ import annotations

import psycopg

from outbox.errors import FencedError, LifecycleError, OutboxError

__all__ = [
    "ConfigurationError",
    "ConsumerBusyError",
    "DatabaseUnavailableError",
    "FencedError",
    "FoldConfigChangedError",
    "InvalidPipelineError",
    "NotDrainedError",
    "OutboxError",
    "PartitionCountError",
    "PartitionMissingError",
    "SchemaError",
    "SubscriptionError",
    "TransitionError",
    "UnfoldableJobError",
    "UnknownStepError",
    "WebhookError",
]


class DatabaseUnavailableError(OutboxError, psycopg.OperationalError):
    """A connection the processor opens failed (server down, refused, bad credentials); password removed."""


class ConfigurationError(OutboxError):
    """A setting or argument is invalid."""


class InvalidPipelineError(ConfigurationError, ValueError):
    """Pipeline steps that cannot be a pipeline (none, blank, too long, repeated)."""


class PartitionCountError(ConfigurationError):
    """OUTBOX_PARTITIONS differs from the database's partition count."""


class SchemaError(OutboxError):
    """The database is not migrated, or holds something that contradicts the product's rules."""


class PartitionMissingError(SchemaError):
    """A partition number at or beyond the database's partition count (docs/design.md: "Scaling out")."""

    def __init__(self, partition: int) -> None:
        super().__init__(
            f"partition {partition} does not exist (no checkpoint): partitions are numbered from 0 to the "
            "count that `outbox repartition` set, see `outbox backlog`"
        )
        self.partition = partition


class ConsumerBusyError(OutboxError):
    """Another worker holds the partition and this command will not wait for it."""


class NotDrainedError(OutboxError):
    """The outbox did not drain in time; nothing was changed."""


class SubscriptionError(OutboxError):
    """A subscription command that cannot be done (unknown name, name taken, bad value)."""


class WebhookError(OutboxError, RuntimeError):
    """The receiver did not acknowledge (a non-2xx answer, a timeout, no connection)."""


class FoldConfigChangedError(FencedError):
    """`outbox pipeline set` changed the fold configuration: reload it, then go on (nothing applied)."""


class TransitionError(LifecycleError):
    """A partition's lifecycle step out of order (processor.partition; a bug in the worker)."""


class UnfoldableJobError(OutboxError, ValueError):
    """The job's state cannot be computed from its variants; the message says why."""


class UnknownStepError(UnfoldableJobError):
    """A step that is not in the configured pipeline (outbox.UnknownStepError is the write API's refusal)."""
