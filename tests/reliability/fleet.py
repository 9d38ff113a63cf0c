"""What the fleet tests share: `outbox run` workers as processes, writer threads, and the audits.

Two audit triggers watch the product from inside the database: each checkpoint move (and each job
state write) records whether the session that made it held the partition's consumer lock at that
moment, so no partition was ever processed by two workers at once; the checkpoint moves are then
replayed here, with a visibility rule written apart from the processor's, to show that each event
was applied exactly once. A third keeps every event written, so that the check survives `outbox
prune`. Job state ends equal to the independent reference (tests/reference.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import namedtuple_row

from processor import store
from processor.backlog import parse_worker_name
from processor.database import DatabaseUrl, connect
from processor.repartition import repartition
from processor.worker import application_name
from processor.workload import STEPS, ChurnWriters
from tests.fix_database import subprocess_env
from tests.helpers import WorkerProcess
from tests.reference import actual_job_states, partition_of, reference_job_states

ROOT = Path(__file__).parents[2]
Conn = psycopg.Connection[Any]

# The lock a session holds while it consumes a partition: pg_try_advisory_lock(class, partition).
_HOLDS_LOCK = sql.SQL(
    "EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' AND granted "
    "AND classid = {lock_class}::oid AND objid = ({partition})::oid AND objsubid = 2)"
)

# Every change of a checkpoint row (workers' moves, and `outbox repartition`'s resets, inserts and
# deletes): who made it, whether it held the partition's consumer lock then, where the checkpoint
# was and where it went, and how many events the move counted as applied.
CHECKPOINT_AUDIT = sql.SQL("""
CREATE TABLE checkpoint_moves (
    id           bigserial PRIMARY KEY,
    op           text NOT NULL,
    partition    integer NOT NULL,
    partitions   integer NOT NULL,
    xact         text NOT NULL,
    backend_pid  integer NOT NULL,
    app          text NOT NULL,
    holds_lock   boolean NOT NULL,
    old_done text, old_target text, old_txid text, old_event_id bigint,
    new_done text, new_target text, new_txid text, new_event_id bigint,
    events       bigint
);
CREATE FUNCTION audit_checkpoint_move() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    moved integer := CASE WHEN TG_OP = 'DELETE' THEN OLD.partition ELSE NEW.partition END;
BEGIN
    INSERT INTO checkpoint_moves (
        op, partition, partitions, xact, backend_pid, app, holds_lock,
        old_done, old_target, old_txid, old_event_id, new_done, new_target, new_txid, new_event_id, events)
    VALUES (
        TG_OP, moved, (SELECT partitions FROM outbox_partitioning), pg_current_xact_id()::text, pg_backend_pid(),
        current_setting('application_name'), {holds_lock},
        CASE WHEN TG_OP <> 'INSERT' THEN OLD.done_snapshot::text END,
        CASE WHEN TG_OP <> 'INSERT' THEN OLD.target_snapshot::text END,
        CASE WHEN TG_OP <> 'INSERT' THEN OLD.last_txid::text END,
        CASE WHEN TG_OP <> 'INSERT' THEN OLD.last_event_id END,
        CASE WHEN TG_OP <> 'DELETE' THEN NEW.done_snapshot::text END,
        CASE WHEN TG_OP <> 'DELETE' THEN NEW.target_snapshot::text END,
        CASE WHEN TG_OP <> 'DELETE' THEN NEW.last_txid::text END,
        CASE WHEN TG_OP <> 'DELETE' THEN NEW.last_event_id END,
        CASE WHEN TG_OP = 'UPDATE' THEN NEW.events_applied - OLD.events_applied END);
    RETURN NULL;
END $$;
CREATE TRIGGER audit_checkpoint_move AFTER INSERT OR UPDATE OR DELETE ON outbox_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_checkpoint_move();
""").format(holds_lock=_HOLDS_LOCK.format(lock_class=store.CONSUMER_LOCK_CLASS, partition=sql.SQL("moved")))

# Every write of job state: by whom, and whether it held the consumer lock of the job's partition.
JOB_STATE_AUDIT = sql.SQL("""
CREATE TABLE job_state_writes (
    id bigserial PRIMARY KEY, app text NOT NULL, job_id uuid NOT NULL, partition integer NOT NULL,
    holds_lock boolean NOT NULL
);
CREATE FUNCTION audit_job_state_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_state_writes (app, job_id, partition, holds_lock)
    VALUES (current_setting('application_name'), NEW.job_id, outbox_partition_of(NEW.job_id), {holds_lock});
    RETURN NULL;
END $$;
CREATE TRIGGER audit_job_state_write AFTER UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION audit_job_state_write();
""").format(
    holds_lock=_HOLDS_LOCK.format(
        lock_class=store.CONSUMER_LOCK_CLASS, partition=sql.SQL("outbox_partition_of(NEW.job_id)")
    )
)


def repartition_now(db: DatabaseUrl, partitions: int) -> None:
    """`outbox repartition` in-process, named as the command names itself."""
    with connect(db, application_name=application_name("repartition")) as rconn:
        repartition(rconn, partitions, timeout=30)


def run_cli(db: DatabaseUrl, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor.cli", *args],
        env=subprocess_env(db),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def owners(conn: Conn) -> dict[int, int]:
    """Partition -> OS pid of the worker that holds it (-1: a session that is not a worker)."""
    holders = store.consumer_lock_holders(conn)
    return {p: (parse_worker_name(h.application_name) or ("", -1))[1] for p, h in holders.items()}


def covered(conn: Conn, pids: set[int], partitions: int) -> bool:
    """Every partition has an owner among ``pids``."""
    held = owners(conn)
    return all(held.get(p) in pids for p in range(partitions))


def shares(conn: Conn, pids: set[int], partitions: int) -> list[int] | None:
    """How many partitions each of ``pids`` holds (sorted), once every partition is held by one of them."""
    held = owners(conn)
    if not all(held.get(p) in pids for p in range(partitions)):
        return None
    counts = Counter(held[p] for p in range(partitions))
    return sorted(counts.get(pid, 0) for pid in pids)


def backend_of(conn: Conn, role: str, pid: int) -> int | None:
    """The server pid of the session of the `outbox` process ``pid`` (named outbox-<role>:<host>:<pid>)."""
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s", [f"outbox-{role}:%:{pid}"]
    ).fetchone()
    return row[0] if row else None


def events_applied(conn: Conn) -> int:
    """Events applied so far by every checkpoint move (from the audit: it survives repartitions)."""
    row = conn.execute("SELECT coalesce(sum(events), 0) FROM checkpoint_moves").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `outbox run` workers; any still running at the end is killed."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], name: str) -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"{name}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


def worker_env(db: DatabaseUrl, **extra: str) -> dict[str, str]:
    """For `outbox run`: rebalancing every 0.1 s; a SIGABRT dumps every thread's stack to its log."""
    return subprocess_env(db, OUTBOX_STANDBY_INTERVAL="0.1", PYTHONFAULTHANDLER="1", **extra)


def stop_cleanly(worker: WorkerProcess) -> None:
    """SIGTERM: the worker finishes the batch in hand, releases its partitions and exits 0.

    A worker that hangs instead is made to dump its stacks (faulthandler), and the test fails with them.
    """
    worker.signal(signal.SIGTERM)
    try:
        code = worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.signal(signal.SIGABRT)
        worker.wait(timeout=30)
        dump = worker.output()[-6000:]
        raise AssertionError(f"the worker did not stop on SIGTERM:\n{dump}") from None
    assert code == 0, worker.output()[-3000:]


# The writers the fleet tests run (test_scale_out, test_subscriptions): processor/workload.py.
Writers = ChurnWriters


# --- The checkpoint audit, replayed ------------------------------------------------------------


@dataclass(frozen=True)
class Snap:
    """A pg_snapshot, parsed here: a committed transaction is visible below xmax and outside xip."""

    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snap:
        _, xmax, xip = text.split(":")
        return cls(int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def sees(self, txid: int) -> bool:
        return txid < self.xmax and txid not in self.xip


@dataclass(frozen=True)
class Position:
    """A checkpoint: the events of transactions visible in ``done`` are applied; while a catch-up to
    ``target`` is in progress, so are those visible in ``target`` up to ``after`` in (txid, event id) order."""

    done: Snap
    target: Snap | None
    after: tuple[int, int]

    @classmethod
    def of(cls, done: str, target: str | None, txid: str, event_id: int) -> Position:
        return cls(Snap.parse(done), Snap.parse(target) if target else None, (int(txid), event_id))

    def covers(self, txid: int, event_id: int) -> bool:
        if self.done.sees(txid):
            return True
        return self.target is not None and self.target.sees(txid) and (txid, event_id) <= self.after


@dataclass
class AuditReport:
    moves: int
    worker_moves: int
    repartitions: int
    events: int
    by_worker: dict[str, int]
    job_state_writes: int
    partway: int  # worker moves that left a catch-up in progress (a full batch)

    def __str__(self) -> str:
        spread = ", ".join(f"{app.rsplit(':', 1)[1]}: {n}" for app, n in sorted(self.by_worker.items()))
        return (
            f"{self.moves} checkpoint moves ({self.worker_moves} by workers, each under the partition's lock, "
            f"{self.partway} of them partway through a catch-up; "
            f"{self.repartitions} repartitions), chains unbroken, {self.events} events each applied exactly once "
            f"(events per worker pid: {spread}); {self.job_state_writes} job state writes, each under the lock "
            "of the job's partition"
        )


OPERATIONS_WRITING_JOBS = ("outbox-replay", "outbox-verify", "outbox-dead-letters")


def check_audit(conn: Conn) -> AuditReport:
    """Replay the audit: who moved each checkpoint and under which lock, the chains, and exactly-once."""
    with conn.cursor(row_factory=namedtuple_row) as cur:
        moves = cur.execute("SELECT * FROM checkpoint_moves ORDER BY id").fetchall()
    assert moves, "no checkpoint moved"
    check_only_lock_holders_moved_checkpoints(moves)
    epochs, chains = check_each_move_starts_where_the_last_ended(conn, moves)
    events, by_worker, worker_moves = check_each_event_applied_exactly_once(conn, epochs, chains)
    writes = check_job_state_written_under_the_partitions_lock(conn)
    partway = sum(1 for m in moves if m.app.startswith("outbox-worker:") and m.new_target is not None)
    return AuditReport(len(moves), worker_moves, len(epochs), events, by_worker, writes, partway)


def check_only_lock_holders_moved_checkpoints(moves: list[Any]) -> None:
    """Only workers and `outbox repartition` move checkpoints; a worker only under the partition's lock."""
    for m in moves:
        role = m.app.split(":", 1)[0]
        assert role in ("outbox-worker", "outbox-repartition"), f"checkpoint moved by {m.app!r}: {m}"
        if role == "outbox-worker":
            assert m.op == "UPDATE", m
            assert m.holds_lock, (
                f"{m.app} (backend {m.backend_pid}) moved the checkpoint of partition {m.partition} without "
                f"holding its consumer lock: {m}"
            )


Epochs = dict[str, tuple[int, Snap, int]]  # repartition xact -> (epoch, snapshot, partition count)
Chains = dict[tuple[int, int], list[tuple[Any, Position]]]  # (epoch, partition) -> its moves, in order


def check_each_move_starts_where_the_last_ended(conn: Conn, moves: list[Any]) -> tuple[Epochs, Chains]:
    """Per partition, each move starts where the previous one ended (inserts and deletes included:
    `outbox repartition` adds and removes partitions), and the last ends where the checkpoint is.

    Each repartition starts an epoch: its snapshot and partition count; the chain of each (epoch,
    partition) follows.
    """
    epochs: Epochs = {}
    ends: dict[int, tuple[Any, ...] | None] = {}
    chains: Chains = {}
    epoch_of: dict[int, int] = {}
    for m in moves:
        old = (m.old_done, m.old_target, m.old_txid, m.old_event_id)
        new = (m.new_done, m.new_target, m.new_txid, m.new_event_id)
        if m.op == "INSERT":
            assert ends.get(m.partition) is None, f"checkpoint of partition {m.partition} inserted twice: {m}"
        elif m.partition in ends:
            assert ends[m.partition] == old, f"a move started from a checkpoint that had moved: {m}"
        else:
            assert m.app.startswith("outbox-repartition:"), f"a worker moved a checkpoint before any repartition: {m}"
        ends[m.partition] = None if m.op == "DELETE" else new
        if m.app.startswith("outbox-repartition:"):
            _start_epoch(m, new, epochs, epoch_of, chains)
        else:
            assert m.partition in epoch_of, f"a worker moved the checkpoint of a removed partition: {m}"
            chains[(epoch_of[m.partition], m.partition)].append((m, Position.of(*new)))
    with conn.cursor() as cur:
        current = {
            row[0]: tuple(row[1:])
            for row in cur.execute(
                "SELECT partition, done_snapshot::text, target_snapshot::text, last_txid::text, last_event_id "
                "FROM outbox_checkpoints"
            )
        }
    assert current == {p: end for p, end in ends.items() if end is not None}, "a checkpoint moved unaudited"
    return epochs, chains


def _start_epoch(m: Any, new: tuple[Any, ...], epochs: Epochs, epoch_of: dict[int, int], chains: Chains) -> None:
    """A repartition's move: the partition leaves (DELETE) or starts a chain in the repartition's epoch."""
    if m.xact not in epochs:
        epochs[m.xact] = (len(epochs), Snap.parse(m.new_done or m.old_done), m.partitions)
    epoch = epochs[m.xact][0]
    if m.op == "DELETE":
        epoch_of.pop(m.partition, None)
    else:
        assert m.new_target is None and m.events in (None, 0), m
        assert Snap.parse(m.new_done) == epochs[m.xact][1], m
        epoch_of[m.partition] = epoch
        chains[(epoch, m.partition)] = [(m, Position.of(*new))]


def check_each_event_applied_exactly_once(
    conn: Conn, epochs: Epochs, chains: Chains
) -> tuple[int, dict[str, int], int]:
    """An event belongs to the epoch of the last repartition that did not see it, and to its job's
    partition under that epoch's count. It must be covered by the last checkpoint of its chain (the
    repartition that ended the epoch waited for it) and by no earlier position than the move that
    counted it: each move's count equals the events it newly covers. Returns (events, events applied
    by each worker, worker moves)."""
    snapshots = sorted(epochs.values(), key=lambda e: e[0])
    applied_by: dict[tuple[int, int], Counter[int]] = defaultdict(Counter)
    events = conn.execute("SELECT event_id, txid::text, job_id FROM audit_events").fetchall()
    for event_id, txid_text, job_id in events:
        txid = int(txid_text)
        unseen = [index for index, snap, _ in snapshots if not snap.sees(txid)]
        assert unseen and unseen == list(range(len(unseen))), f"event {event_id} written before the first repartition"
        epoch = unseen[-1]
        key = (epoch, partition_of(job_id, snapshots[epoch][2]))
        chain = chains[key]
        assert not chain[0][1].covers(txid, event_id)
        assert chain[-1][1].covers(txid, event_id), f"event {event_id} of {key} (epoch, partition) never applied"
        applied_by[key][_first_covering(chain, txid, event_id)] += 1
    by_worker: Counter[str] = Counter()
    worker_moves = 0
    for key, chain in chains.items():
        for index, (m, _) in enumerate(chain[1:], start=1):
            worker_moves += 1
            assert m.events == applied_by[key][index], (
                f"move {m.id} ({m.app}) counted {m.events} events; its checkpoint range holds "
                f"{applied_by[key][index]}: {m}"
            )
            by_worker[m.app] += m.events
    assert sum(by_worker.values()) == len(events)
    return len(events), dict(by_worker), worker_moves


def _first_covering(chain: list[tuple[Any, Position]], txid: int, event_id: int) -> int:
    """The index of the first position of ``chain`` that covers the event (positions only grow)."""
    low, high = 0, len(chain) - 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if chain[middle][1].covers(txid, event_id) else (middle, high)
    return high


def check_job_state_written_under_the_partitions_lock(conn: Conn) -> int:
    """Job state is written only by workers, each holding the lock of the job's partition, and by the
    operations that rebuild jobs (each holding every checkpoint row, which the workers wait for).
    Returns the writes."""
    with conn.cursor(row_factory=namedtuple_row) as cur:
        writes = cur.execute("SELECT * FROM job_state_writes ORDER BY id").fetchall()
    for w in writes:
        if w.app.split(":", 1)[0] in OPERATIONS_WRITING_JOBS:
            continue
        assert w.app.startswith("outbox-worker:") and w.holds_lock, f"job state written without its lock: {w}"
    return len(writes)


def check_final_state(conn: Conn, partitions: int) -> tuple[int, int]:
    """Job state equals the reference; every event is labelled with its job's partition. Returns
    (jobs, jobs done)."""
    expected = reference_job_states(conn, STEPS)
    actual = actual_job_states(conn)
    wrong = {job: (actual.get(job), state) for job, state in expected.items() if actual.get(job) != state}
    assert not wrong, f"{len(wrong)} of {len(expected)} jobs differ from the reference (actual, expected): " + str(
        list(wrong.items())[:5]
    )
    labels = conn.execute("SELECT job_id, partition, outbox_partition_of(job_id) FROM outbox_events").fetchall()
    mislabelled = [row for row in labels if not row[1] == row[2] == partition_of(row[0], partitions)]
    assert not mislabelled, f"{len(mislabelled)} events carry another partition than their job's: {mislabelled[:5]}"
    assert conn.execute("SELECT count(*) FROM outbox_dead_letters").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM outbox_job_flags").fetchone() == (0,)
    return len(expected), sum(1 for status, _ in expected.values() if status == "done")


# Every event ever written (txid and job as written), so that the exactly-once check survives prune.
EVENTS_AUDIT = """
CREATE TABLE audit_events (event_id bigint PRIMARY KEY, txid xid8 NOT NULL, job_id uuid);
CREATE FUNCTION audit_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_events VALUES (NEW.event_id, NEW.txid, NEW.job_id);
    RETURN NULL;
END $$;
CREATE TRIGGER audit_event AFTER INSERT ON outbox_events FOR EACH ROW EXECUTE FUNCTION audit_event();
"""


def install_audits(conn: Conn) -> None:
    conn.execute(CHECKPOINT_AUDIT)
    conn.execute(JOB_STATE_AUDIT)
    conn.execute(EVENTS_AUDIT)
