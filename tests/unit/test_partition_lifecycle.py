"""processor/partition.py's state machine and processor/testsignal.py, without a database."""

from __future__ import annotations

import threading

import pytest

from processor import testsignal
from processor.partition import Partition, PartitionState, TransitionError
from processor.rebase import Need
from processor.testsignal import Signal, Signals


def test_a_step_out_of_order_is_refused_before_it_touches_the_database():
    partition = Partition(3, owner="w")
    assert partition.state is PartitionState.CLAIMED
    with pytest.raises(TransitionError, match="claimed -> ready is not a transition"):
        partition.make_ready(conn=None)  # type: ignore[arg-type]
    with pytest.raises(TransitionError, match="claimed -> rebasing is not a transition"):
        partition.rebase(conn=None, ctx=None)  # type: ignore[arg-type]
    with pytest.raises(TransitionError, match="not ready"):
        _ = partition.progress
    partition.state, partition.need = PartitionState.CHECKING, Need.REBASE
    with pytest.raises(TransitionError, match="needs a rebase"):
        partition.make_ready(conn=None)  # type: ignore[arg-type]


def test_each_transition_signals_with_its_worker_and_partition_and_release_signals_once():
    with Signals().install() as signals:
        with (
            signals.expect(Signal.PARTITION_CLAIMED, partition=3) as claimed,
            signals.expect(Signal.PARTITION_RELEASED, worker="w") as released,
        ):
            partition = Partition(3, owner="w")
            partition.forget()  # its session ended
            partition.forget()  # once only
        (emitted,) = claimed.wait(0)
        assert emitted.fields == {"worker": "w", "partition": 3}
        assert len(released.wait(0)) == 1 and partition.state is PartitionState.RELEASED


def test_nobody_listening_costs_a_none_check_and_an_expectation_fails_naming_what_came_instead():
    assert testsignal.listening is None
    testsignal.emit(Signal.BATCH_COMMITTED, partition=0, events=1)  # nobody listens: nothing happens
    with Signals().install() as signals:
        with signals.expect(Signal.BATCH_COMMITTED, partition=1) as batch:
            testsignal.emit(Signal.BATCH_COMMITTED, partition=0, events=5)
        with pytest.raises(AssertionError, match=r"batch_committed\(partition=1\).*meanwhile: batch_committed"):
            batch.wait(0.01)
    assert testsignal.listening is None


def test_a_wait_ends_when_another_thread_emits_and_totals_add_up():
    with Signals().install() as signals, signals.expect(Signal.BATCH_COMMITTED, partition=0) as batches:
        emitters = [
            threading.Timer(0.01 * n, testsignal.emit, [Signal.BATCH_COMMITTED], {"partition": 0, "events": 10})
            for n in range(3)
        ]
        for timer in emitters:
            timer.start()
        assert batches.wait_total("events", 30, timeout=10) == 30
