"""The writer side of the outbox: what an application calls inside its own transaction.

>>> with engine.begin() as conn:
...     job_id, variant_ids = outbox.create_job(conn, variants=3)
>>> with engine.begin() as conn:
...     outbox.update_variant(conn, variant_ids[0], status="running", step="detect")

Writers that run plain SQL or an ORM on ``jobs_variants`` need no change: the capture trigger
installed by ``outbox migrate`` writes the same events. The calls here add checks before anything is
written (status, step against the pipeline, ids). asyncio code: the same calls in ``outbox.aio``.

To react to job transitions (a job became ``done``): ``outbox.Subscriber``, or
``outbox.aio.AsyncSubscriber`` in asyncio code.

Every error raised on purpose is an ``outbox.OutboxError`` (the tree: outbox.errors); those that
were a ``ValueError``, ``TypeError``, ``LookupError`` or ``RuntimeError`` before still are.
"""

from outbox.errors import (
    ArgumentTypeError,
    FencedError,
    InvalidArgumentError,
    InvalidEventError,
    LifecycleError,
    OutboxError,
    StillRunningError,
    SubscriberBusyError,
    SubscriptionNotFoundError,
    UnknownStepError,
    VariantNotFoundError,
)
from outbox.events import EventType, VariantChanged, VariantRemoved, VariantStatus
from outbox.subscriber import Subscriber
from outbox.subscription import RetryPolicy, SubscriberHealth, SubscriberState, Transition
from outbox.writer import create_job, hold_job, release_job, update_variant

__all__ = [
    "ArgumentTypeError",
    "EventType",
    "FencedError",
    "InvalidArgumentError",
    "InvalidEventError",
    "LifecycleError",
    "OutboxError",
    "RetryPolicy",
    "StillRunningError",
    "Subscriber",
    "SubscriberBusyError",
    "SubscriberHealth",
    "SubscriberState",
    "SubscriptionNotFoundError",
    "Transition",
    "UnknownStepError",
    "VariantChanged",
    "VariantNotFoundError",
    "VariantRemoved",
    "VariantStatus",
    "create_job",
    "hold_job",
    "release_job",
    "update_variant",
]
