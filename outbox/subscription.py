"""What a subscription's consumer decides, apart from how it talks to the database.

A subscription (migration 0012) is a name and a position in the job transitions. Its consumer
reads a page of transitions after the position, and for each one runs the handler and moves the
position **in one transaction**, after locking the subscription's row (the fence): so a handler
that writes to the same database has its effect exactly once (a crash before the commit delivers
the transition again, one after it does not), and a handler with effects elsewhere is called at
least once per transition, with ``transition_id`` as its idempotency key.

A handler that raises gets the transition again after a backoff, as often as the policy allows;
then the transition is parked with its error (``outbox subscriptions failures|retry``) and the
position moves past it. Until then the subscription waits at it: transitions are delivered in
order, never around one that failed.

The sync consumer (outbox.subscriber) and the asyncio one (outbox.aio) share this module: the
page, the policy, and the rows they read; each runs the same statements its own way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from outbox import tracing
from outbox.errors import (
    ArgumentTypeError,
    FencedError,
    InvalidArgumentError,
    LifecycleError,
    SubscriberBusyError,
    SubscriptionNotFoundError,
)
from outbox.sqlfile import load_queries

QUERIES = load_queries("outbox", "transitions.sql")
log = logging.getLogger("outbox.subscriber")

# The advisory lock class of "one active consumer per subscription" (the workers use 0x0B0C5E11
# and the next one: processor.store).
SUBSCRIBER_LOCK_CLASS = 0x0B0C_5E13
CHANNEL = "outbox_transitions"  # the processor notifies it once per transaction that wrote transitions
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # the table's CHECK, said up front


class SubscriberState(StrEnum):
    """Where a subscriber (``outbox.Subscriber``, ``outbox.aio.AsyncSubscriber``) is in its life."""

    NEW = "new"  # created, not run yet
    CONNECTING = "connecting"  # running without a connection: opening one, or reconnecting
    STANDBY = "standby"  # connected; another consumer of the subscription is the active one
    ACTIVE = "active"  # connected, delivering: it holds the subscription's lock
    STOPPED = "stopped"  # returned from its run: stop(), a cancelled task, run_until_idle done
    FAILED = "failed"  # its run raised (last_error)


@dataclass(frozen=True, slots=True)
class SubscriberHealth:
    """A snapshot of a subscriber, taken by its ``health()``."""

    name: str
    state: SubscriberState
    delivered: int  # transitions it handled (acknowledged)
    parked: int  # transitions it gave up on (`outbox subscriptions failures NAME`)
    last_error: str | None  # the last failure: a handler's, the connection's, or what its run raised

    @property
    def ok(self) -> bool:
        """Running and connected: standing by or delivering."""
        return self.state in (SubscriberState.STANDBY, SubscriberState.ACTIVE)

    def to_json(self) -> dict[str, Any]:
        """A JSON object (for an application's own health endpoint)."""
        return {**asdict(self), "state": self.state.value, "ok": self.ok}


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of one job's state, as the processor (or a hold) wrote it."""

    transition_id: int
    job_id: uuid.UUID
    partition: int
    from_status: str | None  # None only where the job's row had no status (an adopted table)
    from_step: str | None
    to_status: str
    to_step: str | None
    written_by: str
    transitioned_at: dt.datetime
    attempt: int = 1  # 1 for the first delivery to this subscription, then 2, 3, ...
    # The W3C traceparent of the event that caused it (outbox.tracing); None: its writer had no span.
    trace_parent: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON object (the webhook body, one line of `outbox transitions --json`)."""
        data = asdict(self)
        data["job_id"] = str(self.job_id)
        data["transitioned_at"] = self.transitioned_at.isoformat()
        del data["attempt"], data["trace_parent"]
        return data

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)


class PageRow(NamedTuple):
    """A row of ``transitions_page`` by name: its columns, in the statement's order (the one place they are listed).

    A named tuple over the driver's plain tuple, so that every driver (psycopg, psycopg2, asyncpg, through
    outbox.connections) is read the same way; tests/integration/test_transitions.py checks the names
    against the statement's own.
    """

    transition_id: int | None  # None: the one row that is always there, to say the position
    job_id: uuid.UUID
    partition: int
    from_status: str | None
    from_step: str | None
    to_status: str
    to_step: str | None
    written_by: str
    transitioned_at: dt.datetime
    attempts: int  # made so far
    failed_at: dt.datetime | None  # when the last one failed
    position: int | None  # the subscription's; None: no such subscription
    head: int | None
    read_at: dt.datetime  # the database's clock
    trace_parent: str | None

    def transition(self) -> Transition:
        return Transition(
            self.transition_id,  # type: ignore[arg-type]  # None only on the position row, skipped
            self.job_id,
            self.partition,
            self.from_status,
            self.from_step,
            self.to_status,
            self.to_step,
            self.written_by,
            self.transitioned_at,
            attempt=self.attempts + 1,
            trace_parent=self.trace_parent,
        )


def single_value(rows: Sequence[Sequence[Any]]) -> Any:
    """The one value of a one-column statement's first row (``subscriber_lock_try``, ``subscription_fence``, ...)."""
    (value,) = rows[0]
    return value


@dataclass(frozen=True, slots=True)
class Page:
    """The next transitions of a subscription (``transitions_page``)."""

    position: int
    head: int  # the newest transition the read saw (0: none yet)
    transitions: list[Transition]
    failed_at: dict[int, dt.datetime]  # transitions that failed before: when they last did
    full: bool
    read_at: dt.datetime  # the database's clock when the page was read

    @classmethod
    def of(cls, name: str, rows: Sequence[Sequence[Any]], limit: int) -> Page:
        page = [PageRow._make(row) for row in rows]
        position = page[0].position if page else None
        if position is None:
            raise SubscriptionNotFoundError(
                f"no subscription named {name!r}; create it with `outbox subscriptions create {name}`"
            )
        transitions: list[Transition] = []
        failed_at: dict[int, dt.datetime] = {}
        for row in page:
            if row.transition_id is None:  # the row that is always there, to say the position
                continue
            transitions.append(row.transition())
            if row.failed_at is not None:
                failed_at[row.transition_id] = row.failed_at
        first = page[0]
        return cls(
            int(position), int(first.head or 0), transitions, failed_at, len(transitions) >= limit, first.read_at
        )

    def wait_before(self, transition: Transition, policy: RetryPolicy) -> float:
        """Seconds until ``transition`` (of this page) is due, after the failures it had."""
        return policy.wait_before(transition.attempt - 1, self.failed_at.get(transition.transition_id), self.read_at)

    def position_after(self) -> int | None:
        """Where the position may move once every transition of this page is acknowledged (None: nowhere new)."""
        if self.full or self.head <= self.position:
            return None
        return self.head


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a transition whose handler failed is tried again: exponential backoff, then parked."""

    max_attempts: int = 10
    first_delay: float = 1.0
    max_delay: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidArgumentError(f"max_attempts must be at least 1 (got {self.max_attempts})")
        if not 0 <= self.first_delay <= self.max_delay:
            raise InvalidArgumentError("retry delays must satisfy 0 <= first_delay <= max_delay")

    def delay(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts."""
        return float(min(self.max_delay, self.first_delay * 2 ** max(0, attempts - 1)))

    def wait_before(self, attempts_made: int, failed_at: dt.datetime | None, now: dt.datetime) -> float:
        """Seconds still to wait before the next attempt of a transition that failed ``attempts_made`` times."""
        if attempts_made == 0 or failed_at is None:
            return 0.0
        due = failed_at + dt.timedelta(seconds=self.delay(attempts_made))
        return max(0.0, (due - now).total_seconds())


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidArgumentError(
            "a subscription name is 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit "
            f"(got {name!r})"
        )
    return name


def check_transactional(in_transaction: bool, autocommit: bool) -> None:
    """Refuse a connection of the caller's on which the consumer's transactions would not be transactions.

    Inside an open transaction every one would be a savepoint of it (nothing would commit); in
    AUTOCOMMIT the handler's effect would commit apart from its acknowledgement (exactly once lost).
    """
    if in_transaction:
        raise InvalidArgumentError("the subscriber's connection is inside a transaction: give it one that is idle")
    if autocommit:
        raise InvalidArgumentError(
            "the subscriber's connection is in AUTOCOMMIT: exactly-once needs transactions "
            "(conn.execution_options(isolation_level='READ COMMITTED'))"
        )


def describe(exc: BaseException) -> str:
    """A failure as stored and logged: the exception's type and message, on one line, bounded."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()
    return text[:1000]


def page_params(name: str, limit: int) -> dict[str, Any]:
    return {"name": name, "limit": limit}


def lock_params(name: str) -> dict[str, Any]:
    return {"lock_class": SUBSCRIBER_LOCK_CLASS, "name": name}


class Consumer:
    """What the sync and asyncio consumers share: their settings, counters and log lines.

    The loops themselves are written twice (outbox.subscriber, outbox.aio), as psycopg writes its
    sync and async connections: the same statements in the same order, one blocking, one awaiting.
    """

    def __init__(
        self,
        name: str,
        handler: Any,
        *,
        batch_size: int,
        poll_interval: float,
        standby_interval: float,
        retry: RetryPolicy | None,
        application_name: str,
        session_timeout: float,
        per_transaction: int,
    ) -> None:
        if not callable(handler):
            raise ArgumentTypeError("handler must be callable as handler(connection, transition)")
        if batch_size < 1 or poll_interval <= 0 or standby_interval <= 0:
            raise InvalidArgumentError("batch_size must be at least 1, and poll_interval and standby_interval above 0")
        if session_timeout < 2 * max(poll_interval, standby_interval):
            raise InvalidArgumentError(
                f"session_timeout ({session_timeout:g} s) must be at least twice poll_interval and standby_interval"
            )
        if per_transaction < 1:
            raise InvalidArgumentError(f"per_transaction must be at least 1 (got {per_transaction})")
        self.session_timeout = session_timeout
        # Transitions handled in one transaction (one commit, one fsync) when all go well; 1 for a
        # handler with effects elsewhere that a later transition's failure should not repeat.
        self.per_transaction = per_transaction
        self.name = check_name(name)
        self.handler = handler
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self.retry = retry or RetryPolicy()
        self.application_name = application_name
        self.active = False  # holds the subscription's lock: the one consumer delivering
        self.delivered = 0  # transitions handled (acknowledged) by this consumer
        self.parked = 0
        self.connected = False  # a session is open
        self.last_error: str | None = None
        self._phase = SubscriberState.NEW  # NEW, CONNECTING while running, then STOPPED or FAILED
        self.running = False  # a run is under way (tracking_run)
        self._run_lock = threading.Lock()

    def health(self) -> SubscriberHealth:
        """A snapshot of this subscriber now (from any thread)."""
        state = self._phase
        if state is SubscriberState.CONNECTING:
            if self.active:
                state = SubscriberState.ACTIVE
            elif self.connected:
                state = SubscriberState.STANDBY
        return SubscriberHealth(self.name, state, self.delivered, self.parked, self.last_error)

    @contextlib.contextmanager
    def tracking_run(self) -> Iterator[None]:
        """Around a run, for ``health()``: running, then stopped (cancelled too) or failed with what it raised.

        One run at a time per object: a second one would share this one's state (``active``) and
        deliver without the subscription's lock.
        """
        with self._run_lock:
            if self.running:
                raise LifecycleError(f"subscriber {self.name!r} is already running (one run per object)")
            self.running = True
        self._phase = SubscriberState.CONNECTING
        try:
            yield
        except Exception as exc:
            self.last_error = describe(exc)
            self._phase = SubscriberState.FAILED
            raise
        except BaseException:  # a cancelled task, an interrupt: a way of stopping
            self._phase = SubscriberState.STOPPED
            raise
        else:
            self._phase = SubscriberState.STOPPED
        finally:
            self.running = False

    @contextlib.contextmanager
    def tracking_session(self) -> Iterator[None]:
        """Around the life of one session, for ``health()``."""
        self.connected = True
        try:
            yield
        finally:
            self.connected = False

    def first_deliveries(self, transitions: Sequence[Transition], start: int, position: int) -> list[Transition]:
        """The transitions from ``start`` that may be handled in one transaction: new ones (after the
        position), delivered for the first time, up to ``per_transaction``."""
        run: list[Transition] = []
        for transition in transitions[start : start + self.per_transaction]:
            if transition.attempt != 1 or transition.transition_id <= position:
                break
            run.append(transition)
        return run

    def handling(self, transition: Transition) -> contextlib.AbstractContextManager[Any]:
        """Around one handler call: its span (outbox.tracing; a no-op without an OpenTelemetry SDK)."""
        return tracing.handler_span(self.name, transition)

    def session_limits(self) -> dict[str, Any]:
        """The server ends a session of ours idle (or idle in a transaction) this long: a frozen consumer's
        lock and subscription row go with it, and a standby takes over. Only on connections it opens."""
        return {"timeout": f"{int(self.session_timeout * 1000)}ms"}

    def failure_params(self, transition: Transition, exc: BaseException) -> dict[str, Any]:
        return {"name": self.name, "transition_id": transition.transition_id, "error": describe(exc)}

    def acknowledge_params(self, transition_id: int, position: int) -> dict[str, Any]:
        return {"name": self.name, "transition_id": transition_id, "position": position}

    def fenced(self, rows: Sequence[Sequence[Any]], expected: int) -> None:
        """Raise FencedError unless the locked position (``subscription_fence``) is the one expected."""
        if not rows:
            raise FencedError(f"subscription {self.name!r} was dropped")
        position = single_value(rows)
        if position != expected:
            raise FencedError(f"its position moved to {position} (this consumer expected {expected})")

    def redelivery_params(self, transition: Transition) -> dict[str, Any]:
        return {"name": self.name, "transition_id": transition.transition_id}

    def fenced_redelivery(self, rows: Sequence[Sequence[Any]], transition: Transition) -> None:
        """Raise FencedError unless a parked transition given back is still waiting (``subscription_fence_redelivery``).

        The position does not move when one is delivered again: its own row fences it."""
        if not rows:
            raise FencedError(f"transition {transition.transition_id} was delivered again by another consumer")

    def log_activated(self) -> None:
        log.info("subscription %s: this consumer is active", self.name)

    def log_fenced(self, exc: FencedError) -> None:
        log.warning("subscription %s: %s; reading again", self.name, exc)

    def log_failed(self, transition: Transition, attempts: int, error: str) -> None:
        self.last_error = error
        log.warning(
            "subscription %s: transition %s (job %s) failed, attempt %s of %s, again in %.1f s: %s",
            self.name, transition.transition_id, transition.job_id, attempts, self.retry.max_attempts,
            self.retry.delay(attempts), error,
        )  # fmt: skip

    def log_parked(self, transition: Transition, attempts: int, error: str) -> None:
        self.parked += 1
        self.last_error = error
        log.error(
            "subscription %s: transition %s (job %s) parked after %s attempts: %s "
            "(`outbox subscriptions failures %s`, then `outbox subscriptions retry %s`)",
            self.name, transition.transition_id, transition.job_id, attempts, error, self.name, self.name,
        )  # fmt: skip

    def log_reconnecting(self, exc: BaseException) -> None:
        self.last_error = describe(exc)
        log.warning("subscription %s: connection lost (%s); reconnecting", self.name, self.last_error)

    def log_died(self) -> None:
        log.error("subscription %s: the subscriber stopped on an error: %s", self.name, self.last_error)

    def busy(self) -> SubscriberBusyError:
        return SubscriberBusyError(f"another consumer of subscription {self.name!r} is active")
