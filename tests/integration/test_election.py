"""Cluster-wide periodic work is done by one elected worker (processor/election.py): pruning the
throughput counts here, the metrics scan in test_metrics_scan.py. Two workers never both do it, and the
other takes over when the elected one's session ends."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from processor import election, store
from processor.database import DatabaseUrl, connect
from processor.election import Election
from processor.store import ClusterDuty
from processor.testsignal import Signal, Signals
from processor.worker import Worker
from tests.fix_database import make_settings


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(30)


def test_one_session_holds_a_duty_and_another_takes_it_when_that_session_ends(db: DatabaseUrl):
    first_election, second_election = Election(ClusterDuty.THROUGHPUT_PRUNE), Election(ClusterDuty.THROUGHPUT_PRUNE)
    with connect(db, application_name="second") as second, connect(db, application_name="first") as first:
        assert first_election.holds(first)
        assert first_election.holds(first)  # tried once per session: still held, not stacked
        assert not second_election.holds(second)
        # Each duty is its own election: the metrics scan is still free.
        assert Election(ClusterDuty.METRICS_SCAN).holds(second)
        # The first session ends (terminated, waiting until its backend is gone): its lock with it.
        second.execute("SELECT pg_terminate_backend(%s, 10000)", [first.info.backend_pid])
        assert second_election.holds(second)


def test_two_workers_do_not_both_prune_the_throughput_counts(
    db: DatabaseUrl, signals: Signals, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(election, "THROUGHPUT_PRUNE_EVERY", 0.0)  # at every turn of the elected worker
    with connect(db, application_name="observer") as conn:
        conn.execute(
            "INSERT INTO outbox_throughput (partition, bucket, events) "
            "VALUES (0, now() - interval '2 days', 5), (0, now(), 7)"
        )
        settings = make_settings(db, standby_interval=0.05)
        first, second = Worker(settings, db), Worker(settings, db)
        with (
            signals.expect(Signal.SESSION_READY, worker=first) as first_ready,
            signals.expect(Signal.SESSION_READY, worker=second) as second_ready,
            running(first),
            running(second),
        ):
            first_ready.wait()
            second_ready.wait()
            with signals.expect(Signal.CLUSTER_DUTY_DONE, duty=ClusterDuty.THROUGHPUT_PRUNE, count=10) as pruned:
                pass
            turns = pruned.wait()
            # Both workers turned (rebalanced) all along; one session did every prune.
            sessions = {turn.fields["session"] for turn in turns}
            assert len(sessions) == 1, sessions
            (elected,) = sessions
            rows = conn.execute("SELECT events FROM outbox_throughput ORDER BY bucket").fetchall()
            assert rows == [(7,)]  # the day-old count dropped, the current one kept
            holders = conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s::oid "
                "AND objid = %s::oid AND objsubid = 2 "
                # another test's database on this server may have its own elected worker
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                [store.ELECTION_LOCK_CLASS, int(ClusterDuty.THROUGHPUT_PRUNE)],
            ).fetchall()
            assert holders == [(elected,)]
            # The elected worker stops: the other one takes the duty over.
            (stopping,) = [w for w in (first, second) if w.elected_duties == [ClusterDuty.THROUGHPUT_PRUNE]]
            with signals.expect(Signal.CLUSTER_DUTY_DONE, duty=ClusterDuty.THROUGHPUT_PRUNE) as taken_over:
                stopping.stop()
            (after,) = taken_over.wait(10)
            assert after.fields["session"] != elected
