"""Named signals the worker emits as it goes, for in-process tests to wait on instead of polling (River's testsignal).

The worker calls ``emit`` at each step of a partition's life (processor/partition.py), at each batch it
commits, and when it does a cluster duty. Nobody listens in production: ``emit`` returns at its first
line (``listening`` is None), so a signal costs one call. A test installs a ``Signals`` registry and
expects a signal *before* it causes it, then waits with a timeout::

    with signals.expect(Signal.BATCH_COMMITTED, partition=0) as committed:
        write_an_event()
    committed.wait(5)  # or AssertionError naming what was emitted meanwhile

Fields narrow what matches (equality on each given field); ``count`` waits for that many matches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Signal(StrEnum):
    """What happened, named after the transition (fields: see where the worker emits each)."""

    # A partition's life (processor/partition.py); fields: worker, partition.
    PARTITION_CLAIMED = "partition_claimed"  # its consumer lock taken
    PARTITION_CHECKING = "partition_checking"  # reading its checkpoint: from this cluster? a rebuild pending?
    PARTITION_REBASING = "partition_rebasing"  # rebasing after a restore, or finishing an interrupted rebase
    REBASE_DONE = "rebase_done"
    PARTITION_READY = "partition_ready"  # its events are being applied by this worker (its health says so)
    PARTITION_RELEASING = "partition_releasing"
    PARTITION_RELEASED = "partition_released"  # its lock let go (or its session gone)
    # The worker; fields: worker, and the partition and event count for a batch.
    SESSION_READY = "session_ready"  # a session's first rebalance is done: the worker is active or a standby
    BATCH_COMMITTED = "batch_committed"  # a batch committed (fields: partition, events: how many it applied)
    JOBS_REFOLDED = "jobs_refolded"  # queued jobs folded again and committed (fields: partition, jobs taken)
    # Cluster-wide periodic work (processor/election.py); fields: duty (store.ClusterDuty), session (its backend pid).
    CLUSTER_DUTY_DONE = "cluster_duty_done"


@dataclass(frozen=True)
class Emitted:
    signal: Signal
    fields: dict[str, Any]

    def matches(self, signal: Signal, wanted: dict[str, Any]) -> bool:
        return self.signal is signal and all(
            key in self.fields and self.fields[key] == value for key, value in wanted.items()
        )

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.fields.items() if k != "worker")
        return f"{self.signal}({shown})"


@dataclass
class Expectation:
    """Matches of one expected signal, from the moment it was expected."""

    signal: Signal
    wanted: dict[str, Any]
    count: int
    seen: list[Emitted] = field(default_factory=list)
    others: list[Emitted] = field(default_factory=list)  # what else was emitted meanwhile, for the failure message
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _registry: Signals | None = None  # listening until waited on

    def offer(self, emitted: Emitted) -> None:
        with self._changed:
            if emitted.matches(self.signal, self.wanted):
                self.seen.append(emitted)
                self._changed.notify_all()
            else:
                self.others = [*self.others[-19:], emitted]

    def wait(self, timeout: float = 30.0) -> list[Emitted]:
        """Until ``count`` matches were emitted; AssertionError after ``timeout`` seconds. Stops listening."""
        self._wait_until(lambda: len(self.seen) >= self.count, f"{self.count} times", timeout)
        return self.seen[: self.count]

    def wait_total(self, name: str, total: int, timeout: float = 30.0) -> int:
        """Until the matches' field ``name`` adds up to ``total`` or more (events of batches); the sum."""
        self._wait_until(lambda: self._sum(name) >= total, f"until {name} adds up to {total}", timeout)
        return self._sum(name)

    @property
    def happened(self) -> bool:
        with self._changed:
            return len(self.seen) >= self.count

    def _sum(self, name: str) -> int:
        return sum(int(e.fields[name]) for e in self.seen)

    def _wait_until(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        with self._changed:
            done = self._changed.wait_for(condition, timeout)
        if self._registry is not None:
            self._registry.forget(self)
        if not done:
            wanted = ", ".join(f"{k}={v!r}" for k, v in self.wanted.items() if k != "worker")
            others = ", ".join(str(e) for e in self.others) or "nothing"
            raise AssertionError(
                f"{self.signal}({wanted}) {what}: emitted {len(self.seen)} times in {timeout:g} s (meanwhile: {others})"
            )


class Signals:
    """A registry of expectations; ``install`` makes the worker's ``emit`` report to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expectations: list[Expectation] = []

    def emit(self, signal: Signal, fields: dict[str, Any]) -> None:
        emitted = Emitted(signal, fields)
        with self._lock:
            for expectation in self._expectations:
                expectation.offer(emitted)

    @contextmanager
    def expect(self, signal: Signal | str, *, count: int = 1, **wanted: Any) -> Iterator[Expectation]:
        """Collect ``signal``'s matches from now on; wait on the expectation, inside the block or after it.

        It listens until waited on (or until the block raises): expect, cause, then wait, without a race.
        """
        expectation = Expectation(Signal(signal), wanted, count, _registry=self)
        with self._lock:
            self._expectations.append(expectation)
        try:
            yield expectation
        except BaseException:
            self.forget(expectation)
            raise

    def forget(self, expectation: Expectation) -> None:
        with self._lock:
            if expectation in self._expectations:
                self._expectations.remove(expectation)

    @contextmanager
    def install(self) -> Iterator[Signals]:
        """Listen to every worker of this process while the block runs."""
        global listening
        previous, listening = listening, self
        try:
            yield self
        finally:
            listening = previous


listening: Signals | None = None  # set by tests only (Signals.install)


def emit(signal: Signal, **fields: Any) -> None:
    """Report ``signal`` to the test listening, if any (none in production: one None check)."""
    if listening is None:
        return
    listening.emit(signal, fields)
