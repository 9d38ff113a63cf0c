"""Partitioned scale-out: `outbox run` workers share the partitions, take over from killed ones,
rebalance as workers come and go, and follow `outbox repartition`, while writers write.

Two audit triggers watch the product from inside the database: each checkpoint move (and each job
state write) records whether the session that made it held the partition's consumer lock at that
moment, so no partition was ever processed by two workers at once; the checkpoint moves are then
replayed here, with a visibility rule written apart from the processor's, to show that each event
was applied exactly once. Job state ends equal to the independent reference (tests/reference.py).
The last tests force races with `outbox repartition` (and one in the SIGTERM handler) open with
locks, so that they happen every time rather than once in a while.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import namedtuple_row

import outbox
from processor import store
from processor.backlog import collect_backlog, parse_worker_name
from processor.database import DatabaseUrl, connect
from processor.metrics import WorkerMetrics
from processor.repartition import repartition
from processor.worker import application_name
from tests.fix_database import make_settings, subprocess_env
from tests.helpers import WorkerProcess, drain, make_jobs, pending_work, wait_for, waiting_on_lock
from tests.reference import actual_job_states, partition_of, reference_job_states

STEPS = ("ingest", "detect", "segment", "iou_eval")
STATUSES = ("queued", "running", "done", "failed")
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


# --- Writers -----------------------------------------------------------------------------------


class Writers:
    """Writer threads until stopped, each on its own jobs (so they never deadlock on variant rows).

    One uses the outbox API through SQLAlchemy, one through psycopg, one plain SQL (which also moves
    variants between its jobs, inserts and deletes variants); transactions touch 1 to 3 variants,
    of jobs in different partitions, and some roll back.
    """

    KINDS = ("sqlalchemy-api", "psycopg-api", "plain-sql")

    def __init__(
        self, db: DatabaseUrl, engine: Any, jobs: dict[uuid.UUID, list[uuid.UUID]], *, threads: int = 3, seed: int = 0
    ) -> None:
        self.db = db
        self.engine = engine
        self.errors: list[BaseException] = []
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        rng = random.Random(seed)
        own: list[dict[uuid.UUID, list[uuid.UUID]]] = [{} for _ in range(threads)]
        for index, (job_id, variants) in enumerate(jobs.items()):
            own[index % threads][job_id] = list(variants)
        self._threads = [
            threading.Thread(target=self._write, args=(self.KINDS[i % 3], own[i], rng.random()), name=f"writer-{i}")
            for i in range(threads)
        ]
        self.started = self.stopped = 0.0

    def __enter__(self) -> Writers:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        self.stopped = time.monotonic()

    def check(self) -> None:
        assert not self.errors, repr(self.errors[0])
        assert self.counts["committed"] > 0

    def summary(self) -> str:
        c = self.counts
        return (
            f"{c['committed']} transactions committed ({c['multi']} multi-variant, {c['rolled_back']} rolled back) "
            f"by {len(self._threads)} writers in {self.stopped - self.started:.1f} s: {c['update']} updates, "
            f"{c['move']} moves between jobs, {c['insert']} variant inserts, {c['delete']} deletes, "
            f"{c['create']} jobs created"
        )

    def _plan(self, rng: random.Random, kind: str, own: dict[uuid.UUID, list[uuid.UUID]]) -> list[tuple[Any, ...]]:
        jobs = list(own)
        ops: list[tuple[Any, ...]] = []
        touched: set[uuid.UUID] = set()
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            job = rng.choice(jobs)
            if not own[job]:
                continue
            variant = rng.choice(own[job])
            if variant in touched:
                continue
            touched.add(variant)
            roll = rng.random()
            if kind == "plain-sql" and roll < 0.06:
                target = rng.choice(jobs)
                if target != job:
                    ops.append(("move", variant, job, target))
                    continue
            if kind == "plain-sql" and roll < 0.08 and len(own[job]) > 1:
                ops.append(("delete", variant, job))
                continue
            status, step = ("done", STEPS[-1]) if rng.random() < 0.3 else (rng.choice(STATUSES), rng.choice(STEPS))
            ops.append(("update", variant, status, step))
        if kind == "plain-sql" and rng.random() < 0.04:
            ops.append(("insert", uuid.uuid4(), rng.choice(jobs), rng.choice(STATUSES), rng.choice(STEPS)))
        if kind != "plain-sql" and rng.random() < 0.03:
            ops.append(("create", uuid.uuid4(), [uuid.uuid4() for _ in range(rng.randint(1, 4))]))
        return ops

    @staticmethod
    def _run(conn: Any, kind: str, ops: list[tuple[Any, ...]]) -> None:
        for op in ops:
            if op[0] == "update":
                if kind == "plain-sql":
                    conn.execute(
                        "UPDATE jobs_variants SET status = %s, current_step = %s, updated_at = now() "
                        "WHERE job_variants_id = %s",
                        [op[2], op[3], op[1]],
                    )
                else:
                    outbox.update_variant(conn, op[1], status=op[2], step=op[3])
            elif op[0] == "create":
                outbox.create_job(conn, job_id=op[1], variants=op[2])
            elif op[0] == "move":
                conn.execute("UPDATE jobs_variants SET job_id = %s WHERE job_variants_id = %s", [op[3], op[1]])
            elif op[0] == "delete":
                conn.execute("DELETE FROM jobs_variants WHERE job_variants_id = %s", [op[1]])
            elif op[0] == "insert":
                conn.execute(
                    "INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step, updated_at) "
                    "VALUES (%s, %s, %s, %s, now())",
                    [op[1], op[2], op[3], op[4]],
                )

    @staticmethod
    def _committed(own: dict[uuid.UUID, list[uuid.UUID]], ops: list[tuple[Any, ...]]) -> None:
        for op in ops:
            if op[0] == "create":
                own[op[1]] = list(op[2])
            elif op[0] == "move":
                own[op[2]].remove(op[1])
                own[op[3]].append(op[1])
            elif op[0] == "delete":
                own[op[2]].remove(op[1])
            elif op[0] == "insert":
                own[op[2]].append(op[1])

    def _write(self, kind: str, own: dict[uuid.UUID, list[uuid.UUID]], seed: float) -> None:
        rng = random.Random(seed)
        try:
            with self.engine.connect() as sa, connect(self.db, application_name=f"writer-{kind}") as pg:
                while not self._stop.is_set():
                    ops = self._plan(rng, kind, own)
                    if not ops:
                        continue
                    rollback = rng.random() < 0.04
                    if kind == "sqlalchemy-api":
                        tx = sa.begin()
                        self._run(sa, kind, ops)
                        tx.rollback() if rollback else tx.commit()
                    else:
                        self._run(pg, kind, ops)
                        pg.rollback() if rollback else pg.commit()
                    with self._lock:
                        if rollback:
                            self.counts["rolled_back"] += 1
                            continue
                        self._committed(own, ops)
                        self.counts["committed"] += 1
                        self.counts["multi"] += len(ops) > 1
                        self.counts.update(op[0] for op in ops)
        except BaseException as exc:
            self.errors.append(exc)


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


def check_audit(conn: Conn) -> AuditReport:
    """Replay the audit: who moved each checkpoint and under which lock, the chains, and exactly-once."""
    with conn.cursor(row_factory=namedtuple_row) as cur:
        moves = cur.execute("SELECT * FROM checkpoint_moves ORDER BY id").fetchall()
    assert moves, "no checkpoint moved"

    # 1. Only workers and `outbox repartition` move checkpoints; a worker only under the partition's lock.
    for m in moves:
        role = m.app.split(":", 1)[0]
        assert role in ("outbox-worker", "outbox-repartition"), f"checkpoint moved by {m.app!r}: {m}"
        if role == "outbox-worker":
            assert m.op == "UPDATE", m
            assert m.holds_lock, (
                f"{m.app} (backend {m.backend_pid}) moved the checkpoint of partition {m.partition} without "
                f"holding its consumer lock: {m}"
            )

    # 2. Per partition, each move starts where the previous one ended (inserts and deletes included:
    # `outbox repartition` adds and removes partitions). Each repartition starts an epoch: its
    # snapshot and partition count; the chain of each (epoch, partition) follows.
    epochs: dict[str, tuple[int, Snap, int]] = {}  # repartition xact -> (epoch, snapshot, count)
    ends: dict[int, tuple[Any, ...] | None] = {}
    chains: dict[tuple[int, int], list[tuple[Any, Position]]] = {}
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

    # 3. Exactly once: an event belongs to the epoch of the last repartition that did not see it, and
    # to its job's partition under that epoch's count. It must be covered by the last checkpoint of
    # its chain (the repartition that ended the epoch waited for it) and by no earlier position than
    # the move that counted it: each move's count equals the events it newly covers.
    snapshots = sorted(epochs.values(), key=lambda e: e[0])
    applied_by: dict[tuple[int, int], Counter[int]] = defaultdict(Counter)
    events = conn.execute("SELECT event_id, txid::text, job_id FROM outbox_events").fetchall()
    for event_id, txid_text, job_id in events:
        txid = int(txid_text)
        unseen = [index for index, snap, _ in snapshots if not snap.sees(txid)]
        assert unseen and unseen == list(range(len(unseen))), f"event {event_id} written before the first repartition"
        epoch = unseen[-1]
        key = (epoch, partition_of(job_id, snapshots[epoch][2]))
        chain = chains[key]
        assert not chain[0][1].covers(txid, event_id)
        assert chain[-1][1].covers(txid, event_id), f"event {event_id} of {key} (epoch, partition) never applied"
        low, high = 0, len(chain) - 1  # the first position that covers it: positions only grow
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if chain[middle][1].covers(txid, event_id) else (middle, high)
        applied_by[key][high] += 1
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

    # 4. Job state is written only by workers, each holding the lock of the job's partition.
    with conn.cursor(row_factory=namedtuple_row) as cur:
        writes = cur.execute("SELECT * FROM job_state_writes ORDER BY id").fetchall()
    for w in writes:
        assert w.app.startswith("outbox-worker:") and w.holds_lock, f"job state written without its lock: {w}"
    partway = sum(1 for m in moves if m.app.startswith("outbox-worker:") and m.new_target is not None)
    return AuditReport(len(moves), worker_moves, len(epochs), len(events), dict(by_worker), len(writes), partway)


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


def install_audits(conn: Conn) -> None:
    conn.execute(CHECKPOINT_AUDIT)
    conn.execute(JOB_STATE_AUDIT)


# --- The tests ---------------------------------------------------------------------------------


def test_workers_killed_one_by_one_under_writers_are_taken_over_and_every_event_applied_once(
    db, conn, engine, fleet, capsys
):
    rng = random.Random(8)
    install_audits(conn)
    repartition_now(db, 8)
    jobs = make_jobs(engine, 150, rng)
    env = worker_env(db, OUTBOX_PARTITIONS="8", OUTBOX_BATCH_SIZE="16")
    live = [fleet(env, f"worker-{i}") for i in range(3)]
    started = list(live)
    spawned = time.monotonic()
    wait_for(lambda: shares(conn, {w.pid for w in live}, 8) == [2, 3, 3], timeout=60, what="3 workers sharing 8")
    first_balance = time.monotonic() - spawned

    takeovers: list[float] = []
    joins: list[str] = []
    with Writers(db, engine, jobs, seed=rng.random()) as writers:
        for kill in range(3):
            mark = events_applied(conn)
            wait_for(lambda m=mark: events_applied(conn) >= m + 300, timeout=60, what="the workers to apply events")
            victim = rng.choice(live)
            live.remove(victim)
            killed = time.monotonic()
            victim.signal(signal.SIGKILL)
            # The replacement starts at once; it takes seconds to start, the takeover a fraction of one.
            replacement = fleet(env, f"worker-{3 + kill}")
            started.append(replacement)
            live.append(replacement)
            pids = {w.pid for w in live}
            wait_for(lambda p=pids: covered(conn, p, 8), timeout=30, what="the others to take over")
            takeovers.append(time.monotonic() - killed)
            assert victim.wait() == -signal.SIGKILL
            wait_for(
                lambda r=replacement: backend_of(conn, "worker", r.pid), timeout=60, what="the replacement to connect"
            )
            joined = time.monotonic()
            wait_for(lambda p=pids: shares(conn, p, 8) == [2, 3, 3], timeout=60, what="the replacement's share")
            joins.append(f"{joined - killed:.2f} + {time.monotonic() - joined:.2f} s")
        mark = events_applied(conn)
        wait_for(lambda: events_applied(conn) >= mark + 300, timeout=60, what="the workers to apply events")
        writers.stop()
    writers.check()
    applied_while_writing = events_applied(conn)
    wait_for(lambda: pending_work(conn) == 0, timeout=120, what="the workers to drain")
    drained = time.monotonic() - writers.stopped
    assert covered(conn, {w.pid for w in live}, 8)

    jobs_total, jobs_done = check_final_state(conn, 8)
    assert jobs_done > 0
    report = check_audit(conn)
    # Every worker applied events, the killed ones too.
    assert {int(app.rsplit(":", 1)[1]) for app in report.by_worker} == {w.pid for w in started}
    with capsys.disabled():
        print(
            f"\nscale-out under kills: 8 partitions, 3 workers (first balanced in {first_balance:.2f} s from spawn); "
            f"{writers.summary()}; {applied_while_writing} of {report.events} events applied while writing, "
            f"drained {drained:.2f} s after the last write; {jobs_total} jobs ({jobs_done} done) equal to the "
            f"reference\n  takeover after SIGKILL (kill -> all 8 partitions owned again): "
            f"{', '.join(f'{t:.3f} s' for t in takeovers)}\n  replacement (spawned at the kill): connected + "
            f"shares back to 3/3/2: {', '.join(joins)}\n  audit: {report}"
        )


def test_shares_follow_the_workers_that_join_and_leave(db, conn, fleet, capsys):
    repartition_now(db, 8)
    env = worker_env(db)
    timings = []

    def owner_pids() -> list[int | None]:
        return [p["owner_pid"] for p in collect_backlog(conn)["partitions"]]

    def expect(label: str, workers: list[WorkerProcess], counts: list[int]) -> float:
        pids = {w.pid for w in workers}

        def reached() -> bool:
            held = owner_pids()
            return None not in held and set(held) <= pids and sorted(Counter(held).values()) == counts

        wait_for(reached, timeout=60, what=f"shares {counts} ({label})")
        return time.monotonic()

    def join(label: str, workers: list[WorkerProcess], counts: list[int]) -> WorkerProcess:
        spawned = time.monotonic()
        newcomer = fleet(env, label)
        wait_for(lambda: backend_of(conn, "worker", newcomer.pid), timeout=60, what=f"the {label} worker to connect")
        connected = time.monotonic()
        balanced = expect(label, [*workers, newcomer], counts)
        shown = "/".join(str(n) for n in sorted(counts, reverse=True))
        timings.append(
            f"{label} worker: connected {connected - spawned:.2f} s after spawn, shares {shown} "
            f"{balanced - connected:.2f} s later"
        )
        return newcomer

    first = join("1st", [], [8])
    second = join("2nd", [first], [4, 4])
    third = join("3rd", [first, second], [2, 3, 3])

    # The CLI shows the same: every partition owned, by the three workers.
    result = run_cli(db, "backlog", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["partition_count"] == 8
    assert sorted(Counter(p["owner_pid"] for p in report["partitions"]).values()) == [2, 3, 3]
    assert {p["owner_pid"] for p in report["partitions"]} == {first.pid, second.pid, third.pid}
    assert report["standbys"] == 0

    held = Counter(owner_pids())
    leaving = max((first, second, third), key=lambda w: held[w.pid])
    stays = [w for w in (first, second, third) if w is not leaving]
    stopped = time.monotonic()
    stop_cleanly(leaving)
    exited = time.monotonic()
    balanced = expect("SIGTERM", stays, [4, 4])
    timings.append(
        f"SIGTERM to one worker: exited {exited - stopped:.2f} s later, shares 4/4 {balanced - exited:.2f} s after that"
    )
    assert "processed 0 events" in leaving.output()
    with capsys.disabled():
        print("\nrebalancing (8 partitions, standby interval 0.1 s): " + "; ".join(timings))


def test_live_repartition_under_writers(db, conn, engine, fleet, capsys):
    rng = random.Random(4)
    install_audits(conn)
    repartition_now(db, 2)
    jobs = make_jobs(engine, 120, rng)
    base = {"OUTBOX_BATCH_SIZE": "40"}
    pinned_2 = fleet(worker_env(db, OUTBOX_PARTITIONS="2", **base), "pinned-2")
    follower = fleet(worker_env(db, **base), "follower")
    wait_for(lambda: shares(conn, {pinned_2.pid, follower.pid}, 2) == [1, 1], timeout=60, what="1 partition each")
    figures = []

    def switch(partitions: int, before: int) -> None:
        mark = events_applied(conn)
        wait_for(lambda: events_applied(conn) >= mark + 400, timeout=60, what="the workers to apply events")
        started = time.monotonic()
        result = run_cli(db, "repartition", str(partitions), "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert (report["before"], report["after"]) == (before, partitions)
        figures.append(
            f"{before} -> {partitions} in {time.monotonic() - started:.2f} s (command included), writers held "
            f"{report['writers_held_seconds']:.3f} s, {report['events_moved']} applied events relabelled"
        )

    with Writers(db, engine, jobs, seed=rng.random()) as writers:
        switch(4, 2)
        # The worker told to expect 2 partitions stops with a clear error; the other follows the count.
        assert pinned_2.wait(timeout=30) == 1, pinned_2.output()[-3000:]
        assert (
            "error: the database has 4 partitions but OUTBOX_PARTITIONS is 2: run `outbox repartition 2` or set "
            "OUTBOX_PARTITIONS=4" in pinned_2.output()
        ), pinned_2.output()[-3000:]
        wait_for(lambda: shares(conn, {follower.pid}, 4) == [4], timeout=30, what="the follower to take all 4")
        pinned_4 = fleet(worker_env(db, OUTBOX_PARTITIONS="4", **base), "pinned-4")
        wait_for(lambda: shares(conn, {follower.pid, pinned_4.pid}, 4) == [2, 2], timeout=60, what="2 each")
        switch(2, 4)
        assert pinned_4.wait(timeout=30) == 1, pinned_4.output()[-3000:]
        assert (
            "error: the database has 2 partitions but OUTBOX_PARTITIONS is 4: run `outbox repartition 4` or set "
            "OUTBOX_PARTITIONS=2" in pinned_4.output()
        ), pinned_4.output()[-3000:]
        wait_for(lambda: shares(conn, {follower.pid}, 2) == [2], timeout=30, what="the follower to take both")
        mark = events_applied(conn)
        wait_for(lambda: events_applied(conn) >= mark + 400, timeout=60, what="events applied under 2 partitions")
        writers.stop()
    writers.check()
    wait_for(lambda: pending_work(conn) == 0, timeout=120, what="the follower to drain")
    drained = time.monotonic() - writers.stopped

    assert conn.execute("SELECT partitions FROM outbox_partitioning").fetchone() == (2,)
    jobs_total, jobs_done = check_final_state(conn, 2)
    report = check_audit(conn)
    assert report.repartitions == 3
    with capsys.disabled():
        print(
            f"\nlive repartition: {'; '.join(figures)}; {writers.summary()}; drained {drained:.2f} s after the "
            f"last write; {jobs_total} jobs ({jobs_done} done) equal to the reference\n  audit: {report}"
        )


def test_repartition_that_cannot_drain_fails_and_changes_nothing(db, conn, engine):
    repartition_now(db, 2)
    make_jobs(engine, 10, random.Random(3))  # pending: no worker runs

    def state() -> tuple[Any, ...]:
        return (
            conn.execute("SELECT partitions FROM outbox_partitioning").fetchone(),
            conn.execute("SELECT * FROM outbox_checkpoints ORDER BY partition").fetchall(),
            conn.execute("SELECT event_id, partition FROM outbox_events ORDER BY event_id").fetchall(),
            conn.execute("SELECT pg_get_functiondef('outbox_partition_of'::regproc)").fetchone(),
        )

    before = state()
    started = time.monotonic()
    result = run_cli(db, "repartition", "3", "--timeout", "1")
    took = time.monotonic() - started
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: the outbox did not drain within 1 s ("), lines[0]
    assert "Nothing was changed" in lines[0]
    assert state() == before
    # The writers are not held back any more.
    with connect(db, application_name="writer") as wconn:
        wconn.execute("SET lock_timeout = '5s'")
        _, variants = outbox.create_job(wconn, variants=1)
        outbox.update_variant(wconn, variants[0], status="running", step="detect")
    # Once drained, the same change goes through.
    drain(make_settings(db))
    repartition_now(db, 3)
    assert conn.execute("SELECT partitions FROM outbox_partitioning").fetchone() == (3,)
    print(f"\nrepartition --timeout 1 without workers: exit 1 after {took:.2f} s (command included): {lines[0]}")


def test_partition_function_is_the_documented_hash(db, conn, engine):
    rng = random.Random(2)
    job_ids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(300)]
    job_ids += [uuid.uuid1() for _ in range(50)] + [uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1)]
    for partitions in (2, 7, 8):
        drain(make_settings(db))  # repartition needs a drained outbox
        repartition_now(db, partitions)
        got = dict(conn.execute("SELECT id, outbox_partition_of(id) FROM unnest(%s::uuid[]) AS t (id)", [job_ids]))
        assert got == {job_id: partition_of(job_id, partitions) for job_id in job_ids}
        assert set(got.values()) == set(range(partitions))
        # Events written now carry their job's partition; those written before were relabelled.
        make_jobs(engine, 20, rng)
        labels = conn.execute("SELECT job_id, partition, outbox_partition_of(job_id) FROM outbox_events").fetchall()
        assert len(labels) > 20
        assert all(row[1] == row[2] == partition_of(row[0], partitions) for row in labels)
        checkpoints = [row[0] for row in conn.execute("SELECT partition FROM outbox_checkpoints ORDER BY 1")]
        assert checkpoints == list(range(partitions))
    drain(make_settings(db))
    assert pending_work(conn) == 0
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)


def _jobs_in_partitions(engine: Any, variants: list[list[tuple[str, str | None]]], partitions: list[int]) -> list[Any]:
    """Create one job per entry, in the given partitions (of 8), with variants at the given (status, step)."""
    created = []
    with engine.begin() as sa:
        for states, partition in zip(variants, partitions, strict=True):
            job_id = next(j for j in iter(uuid.uuid4, None) if partition_of(j, 8) == partition)
            _, ids = outbox.create_job(sa, job_id=job_id, variants=len(states))
            for variant, (status, step) in zip(ids, states, strict=True):
                outbox.update_variant(sa, variant, status=status, step=step)
            created.append((job_id, ids))
    return created


def _move(engine: Any, variant: uuid.UUID, job_id: uuid.UUID, status: str | None = None) -> None:
    with engine.begin() as sa:
        sa.exec_driver_sql("UPDATE jobs_variants SET job_id = %s WHERE job_variants_id = %s", (job_id, variant))
        if status is not None:
            outbox.update_variant(sa, variant, status=status, step="segment")


def test_variants_moving_between_jobs_of_different_partitions(db, conn, engine, fleet):
    repartition_now(db, 8)
    env = worker_env(db)
    workers = [fleet(env, f"worker-{i}") for i in range(2)]
    wait_for(lambda: shares(conn, {w.pid for w in workers}, 8) == [4, 4], timeout=60, what="4 partitions each")
    held = owners(conn)
    a = 0
    b = next(p for p in range(8) if held[p] != held[a])  # a job of each worker

    # The one unfinished variant of the first job moves to the second: the first is done, the second not.
    done = ("done", "iou_eval")
    (j1, v1), (j2, _) = _jobs_in_partitions(engine, [[done, ("running", "detect")], [done]], [a, b])
    _move(engine, v1[1], j2)
    # A variant moved back and forth between partitions, the last move with a status change in the
    # same transaction; and the only variant of a job moved away and back.
    (j3, v3), (j4, v4) = _jobs_in_partitions(engine, [[done, ("failed", "segment")], [done, done]], [b, a])
    for target in (j4, j3, j4, j3):
        _move(engine, v3[1], target)
    _move(engine, v4[0], j3, status="running")
    (j5, v5), (j6, _) = _jobs_in_partitions(engine, [[("running", "ingest")], [done]], [a, b])
    _move(engine, v5[0], j6)
    _move(engine, v5[0], j5)

    # Random moves among jobs of every partition, from two writers at once.
    pool = _jobs_in_partitions(engine, [[("queued", None)] * 3 for _ in range(16)], [p % 8 for p in range(16)])
    variants = [v for _, ids in pool for v in ids]
    errors: list[BaseException] = []

    def mover(seed: int, mine: list[uuid.UUID]) -> None:
        mrng = random.Random(seed)
        try:
            for _ in range(60):
                variant = mrng.choice(mine)
                status = mrng.choice((None, "running", "done", "failed"))
                _move(engine, variant, mrng.choice(pool)[0], status=status)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=mover, args=(i, variants[i::2])) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]

    wait_for(lambda: pending_work(conn) == 0, timeout=60, what="the workers to drain")
    actual = actual_job_states(conn)
    assert actual[j1] == ("done", "iou_eval")
    assert actual[j2] == ("running", "detect")
    assert actual[j3] == ("running", "segment")
    assert actual[j5] == ("running", "ingest")
    assert actual == reference_job_states(conn, STEPS)


@pytest.mark.parametrize("first", ["old job's partition first", "new job's partition first"])
def test_a_moved_variant_is_folded_right_whichever_partition_applies_first(db, conn, engine, first):
    """The two partitions of a move applied one after the other, in both orders (one-off workers)."""
    repartition_now(db, 8)
    done = ("done", "iou_eval")
    (j1, v1), (j2, v2) = _jobs_in_partitions(engine, [[done, ("failed", "detect")], [done, done]], [1, 6])
    # v1[1] goes to j2 and back twice; v2[0] goes to j1 and stays, after a status change.
    for target in (j2, j1, j2, j1):
        _move(engine, v1[1], target)
    _move(engine, v2[0], j1, status="running")
    _move(engine, v1[1], j2)
    order = (1, 6) if first.startswith("old") else (6, 1)
    for partition in order:
        drain(make_settings(db, partition=partition))
    assert pending_work(conn) == 0
    actual = actual_job_states(conn)
    assert actual == reference_job_states(conn, STEPS)
    assert actual[j1] == ("running", "segment")
    assert actual[j2] == ("failed", "detect")


# --- Races with `outbox repartition`, forced --------------------------------------------------
# Each holds outbox_checkpoints in ACCESS EXCLUSIVE mode so that a reader that has read the
# partition count waits to read a checkpoint; a repartition from 8 to 3 partitions then commits in
# the same transaction as the lock, and the reader goes on with a count that no longer holds.


def test_a_worker_claiming_a_partition_that_a_repartition_removes_keeps_running(db, conn, fleet):
    repartition_now(db, 8)
    lock_class = store.CONSUMER_LOCK_CLASS
    for partition in range(8):  # the test holds every partition: the worker stands by
        conn.execute("SELECT pg_advisory_lock(%s, %s)", [lock_class, partition])
    worker = fleet(worker_env(db), "worker")
    wait_for(lambda: "standby: no partition free" in worker.output(), timeout=60, what="the worker to stand by")
    backend = wait_for(lambda: backend_of(conn, "worker", worker.pid), what="the worker's session")
    with connect(db, application_name="outbox-tests", autocommit=False) as blocker:
        blocker.execute("LOCK TABLE outbox_checkpoints IN ACCESS EXCLUSIVE MODE")
        conn.execute("SELECT pg_advisory_unlock(%s, 5)", [lock_class])
        wait_for(
            lambda: owners(conn).get(5) == worker.pid and waiting_on_lock(conn, backend),
            what="the worker to claim partition 5 and wait to read its checkpoint",
        )
        repartition(blocker, 3)
        blocker.commit()
    conn.execute("SELECT pg_advisory_unlock_all()")
    wait_for(
        lambda: covered(conn, {worker.pid}, 3) or worker.process.poll() is not None,
        timeout=30,
        what="the worker to take the 3 partitions left",
    )
    assert worker.process.poll() is None, worker.output()[-3000:]
    assert set(owners(conn)) == {0, 1, 2}


def test_backlog_during_a_repartition_shows_one_partition_count(db, conn):
    repartition_now(db, 8)
    with connect(db, application_name="outbox-tests", autocommit=False) as blocker:
        blocker.execute("LOCK TABLE outbox_checkpoints IN ACCESS EXCLUSIVE MODE")
        backlog = subprocess.Popen(
            [sys.executable, "-m", "processor.cli", "backlog", "--json"],
            env=subprocess_env(db),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            backend = wait_for(lambda: backend_of(conn, "backlog", backlog.pid), timeout=60, what="its session")
            wait_for(lambda: waiting_on_lock(conn, backend), what="`outbox backlog` to wait for a checkpoint")
            repartition(blocker, 3)
            blocker.commit()
            out, err = backlog.communicate(timeout=60)
        finally:
            backlog.kill()
            backlog.wait()
    assert backlog.returncode == 0, err
    report = json.loads(out)
    assert len(report["partitions"]) == report["partition_count"]


def test_metrics_forget_the_partitions_a_repartition_removes(db, engine):
    repartition_now(db, 8)
    make_jobs(engine, 120, random.Random(7))  # job ids are random: 120 leave no partition empty (p < 1e-6)
    metrics = WorkerMetrics()

    def refresh() -> dict[int, float | None]:
        """One pass of the worker's metrics refresh thread; each partition's pending events."""
        metrics.dead_letters.set(-1)  # set again at the end of a pass
        stop = threading.Event()
        thread = threading.Thread(target=metrics.refresh_from_database, args=(db, stop, 3600.0))
        thread.start()
        try:
            wait_for(lambda: metrics.registry.get_sample_value("outbox_dead_letters") != -1, what="a refresh")
        finally:
            stop.set()
            thread.join()
        return {p: metrics.registry.get_sample_value("outbox_pending_events", {"partition": str(p)}) for p in range(8)}

    assert all(pending for pending in refresh().values())
    drain(make_settings(db))
    repartition_now(db, 3)
    after = refresh()
    assert [after[p] for p in range(3)] == [0, 0, 0]
    stale = {p: after[p] for p in range(3, 8) if after[p]}
    assert not stale, f"pending events still exported for removed partitions: {stale}"


def test_sigterm_while_the_worker_waits_stops_it(tmp_path):
    """The SIGTERM handler of `outbox run` calls Worker.stop, so threading.Event.set, in the main thread.
    When the signal lands while that thread holds the same Event's lock (inside Event.wait, which the
    idle worker calls between polls: the handler runs between two bytecodes), set() waits for a lock
    its own thread holds, forever; a second SIGTERM or SIGINT runs into the same lock. Seen in ~1 of
    100-200 SIGTERMs to idle workers (their stacks: handle -> stop -> set -> __enter__); here the
    window is held open so that it happens every time.
    """
    script = tmp_path / "sigterm_in_wait.py"
    script.write_text(
        "import signal\n"
        "from processor.cli import _stop_on_signals\n"
        "from processor.settings import load_settings\n"
        "from processor.worker import Worker\n"
        "settings = load_settings(database_url='postgresql://nobody@127.0.0.1:1/none')\n"
        "worker = Worker(settings, settings.database())\n"
        "print('ready', flush=True)\n"
        "with _stop_on_signals(worker):\n"
        "    with worker._stopping._cond:  # where Event.wait holds it\n"
        "        signal.raise_signal(signal.SIGTERM)\n"
        "import time\n"
        "deadline = time.monotonic() + 5\n"
        "while not worker.stopping and time.monotonic() < deadline:  # a stop handed to another thread\n"
        "    time.sleep(0.01)\n"
        "print('stopping' if worker.stopping else 'not stopping')\n"
    )
    process = subprocess.Popen(
        [sys.executable, str(script)],
        env=subprocess_env(None, PYTHONFAULTHANDLER="1", PYTHONPATH=str(ROOT)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"  # imported: from here on it takes milliseconds
        out, _ = process.communicate(timeout=6)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        out, _ = process.communicate(timeout=30)
        raise AssertionError(
            f"hung (the SIGTERM handler must not take the locks the main thread holds):\n{out}"
        ) from None
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, out
    assert out.splitlines()[-1] == "stopping", out
