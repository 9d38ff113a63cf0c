"""Every error the product raises on purpose descends from ``OutboxError``.

``except outbox.OutboxError`` catches what the write API, a subscriber or the processor refuses or
runs into, and nothing else (a bug of ours stays a bug: an ``AssertionError``, a ``KeyError``). Where
callers caught a builtin or a driver error for the same condition before there was a root, the class
derives from that too, so that ``except ValueError`` and ``except psycopg.OperationalError`` still
catch, as psycopg_pool's ``PoolTimeout`` is a ``psycopg.OperationalError``.

This module is the root and the application side (``outbox`` never imports ``processor``);
processor.errors builds the processor's errors on it. The whole tree::

    OutboxError
    ├── InvalidArgumentError (ValueError)     a value a call refuses: a variant count, an id, a hold's reason,
    │   │                                     a subscription name, a RetryPolicy, a subscriber's intervals
    │   ├── InvalidEventError (pydantic.ValidationError)  a status or step the event model refuses
    │   └── UnknownStepError                  the write API's step is not in the pipeline
    ├── ArgumentTypeError (TypeError)         an argument of the wrong kind: a sync connection to outbox.aio,
    │                                         an Engine instead of a connection, an unknown WorkerService setting
    ├── VariantNotFoundError (LookupError)
    ├── SubscriptionNotFoundError (LookupError)
    ├── FencedError (RuntimeError)            a consumer's position moved under it (another consumer, a reset,
    │   │                                     `outbox repartition`): it reads again
    │   └── FoldConfigChangedError            processor.errors: `outbox pipeline set` ran
    ├── SubscriberBusyError (RuntimeError)    run_until_idle found another consumer active
    ├── LifecycleError (RuntimeError)         started twice, joined without being started
    │   └── TransitionError                   processor.errors: a partition's lifecycle step out of order (a bug)
    ├── StillRunningError (TimeoutError)      join(timeout) returned with the thread still running
    └── processor.errors:
        ├── DatabaseUnavailableError (psycopg.OperationalError)  a connection the processor opens fails
        ├── ConfigurationError                a setting or a command's argument is invalid
        │   ├── InvalidPipelineError (ValueError)
        │   └── PartitionCountError
        ├── SchemaError                       not migrated, or the database contradicts the product's rules
        │   └── PartitionMissingError
        ├── ConsumerBusyError                 another worker holds the partition; the command does not wait
        ├── NotDrainedError                   `outbox repartition` needs a drained outbox
        ├── SubscriptionError                 `outbox subscriptions ...` refused
        ├── WebhookError (RuntimeError)       a webhook answered other than 2xx, or was not reached
        └── UnfoldableJobError (ValueError)   a job's state cannot be computed from its variants
            └── UnknownStepError              an event's step is not in the pipeline (processor.fold's)

Messages are one line meant for the person who meets them; the CLI prints them as they are.
"""

from __future__ import annotations

import pydantic


class OutboxError(Exception):
    """The root of the product's errors; its message is meant for whoever called or runs the product."""


class InvalidArgumentError(OutboxError, ValueError):
    """A call of the outbox API was given a value it refuses (before anything was written)."""


class InvalidEventError(InvalidArgumentError, pydantic.ValidationError):
    """A status or step the event model (outbox.events) refuses; pydantic's errors, as pydantic words them."""

    @classmethod
    def of(cls, exc: pydantic.ValidationError) -> InvalidEventError:
        """The same errors and message as ``exc``, as one of the product's errors."""
        return cls.from_exception_data(exc.title, exc.errors(include_url=False))  # type: ignore[arg-type]


class UnknownStepError(InvalidArgumentError):
    """A step that is not in the pipeline every worker folds with (`outbox pipeline show`)."""


class ArgumentTypeError(OutboxError, TypeError):
    """An argument of the wrong kind, such as a connection the call cannot write in."""


class VariantNotFoundError(OutboxError, LookupError):
    """``update_variant`` was given the id of a variant that does not exist."""


class SubscriptionNotFoundError(OutboxError, LookupError):
    """No subscription of that name: create it first (``outbox subscriptions create NAME``)."""


class FencedError(OutboxError, RuntimeError):
    """A consumer's position moved under it (another consumer, a reset): what it read is stale, it reads again."""


class SubscriberBusyError(OutboxError, RuntimeError):
    """``run_until_idle`` found another consumer of the subscription active."""


class LifecycleError(OutboxError, RuntimeError):
    """A subscriber or worker was started twice, or joined without having been started in the background."""


class StillRunningError(OutboxError, TimeoutError):
    """``join(timeout)`` waited ``timeout`` seconds and the thread still runs (it goes on running)."""
