"""The pipeline writers the demo, the tests and the benchmarks simulate.

An application moves the variants of its jobs through the pipeline's steps, from many connections
at once, some through the outbox API and some through plain SQL that only the capture triggers see.
This module is that application, in three shapes:

- ``WalkWriters``: threads that walk each variant through a planned list of moves until every walk
  is done (the demo, the stress test);
- ``ChurnWriters``: threads that write until stopped, each on jobs of its own, with multi-variant
  transactions, rollbacks, variants moved between jobs, inserted and deleted (the fleet tests);
- ``UpdateWriters``: threads that write random single-variant updates, a number each or until
  stopped (the kill soak, the operations tests, the adoption test on a team's own schema);
- ``PipelineWriters``: threads that create jobs until stopped and move each variant once through
  every step, a few variants a transaction, at a pace (the subscription crash tests).

and the single writes they are made of (``write_variant``, ``move_variant``, ...), for writers with
a shape of their own (the restart test's, which survive their server crashing). Its SQL is in
workload.sql: none of it runs inside a worker.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
import sqlalchemy
from psycopg.rows import class_row

import outbox
from outbox.limits import VARIANT_STATUSES
from outbox.sqlfile import load_queries
from processor.database import DatabaseUrl, connect

QUERIES = load_queries("processor", "workload.sql")
STEPS = ("ingest", "detect", "segment", "iou_eval")
STATUSES = VARIANT_STATUSES  # outbox.limits
Move = tuple[str, str]  # (status, step)
# How a writer writes: the outbox API on a SQLAlchemy or a psycopg connection, or the application's
# own UPDATE, captured by the trigger.
Via = Literal["sqlalchemy-api", "psycopg-api", "plain-sql"]
VIAS: tuple[Via, ...] = ("sqlalchemy-api", "psycopg-api", "plain-sql")
Connection = psycopg.Connection[Any] | sqlalchemy.Connection


# --- Single writes ------------------------------------------------------------------------------


def _execute(conn: Connection, name: str, params: dict[str, Any]) -> None:
    if isinstance(conn, sqlalchemy.Connection):
        conn.exec_driver_sql(QUERIES[name], params)
    else:
        conn.execute(QUERIES[name], params)


def write_variant(conn: Connection, variant: uuid.UUID, status: str, step: str, *, plain_sql: bool = False) -> None:
    """Move ``variant`` to (status, step): through outbox.update_variant, or as plain SQL."""
    if plain_sql:
        _execute(conn, "variant_update", {"variant_id": variant, "status": status, "step": step})
    else:
        outbox.update_variant(conn, variant, status=status, step=step)


def move_variant(conn: Connection, variant: uuid.UUID, job_id: uuid.UUID) -> None:
    """Make ``variant`` a variant of ``job_id`` (plain SQL)."""
    _execute(conn, "variant_move", {"variant_id": variant, "job_id": job_id})


def insert_variant(conn: Connection, variant: uuid.UUID, job_id: uuid.UUID, status: str, step: str) -> None:
    _execute(conn, "variant_insert", {"variant_id": variant, "job_id": job_id, "status": status, "step": step})


def delete_variant(conn: Connection, variant: uuid.UUID) -> None:
    _execute(conn, "variant_delete", {"variant_id": variant})


def finish_jobs(conn: Connection, job_ids: Iterable[uuid.UUID], final_step: str = STEPS[-1]) -> None:
    """Every variant of ``job_ids`` done at ``final_step``, in one statement."""
    _execute(conn, "jobs_finish", {"job_ids": list(job_ids), "final_step": final_step})


def random_update(
    conn: Connection,
    variants: Sequence[uuid.UUID],
    rng: random.Random,
    *,
    statuses: Sequence[str] = ("running", "done", "failed"),
    steps: Sequence[str] = STEPS,
) -> None:
    """One variant of ``variants`` to a random status and step (plain SQL)."""
    status, step = rng.choice(statuses), rng.choice(steps)
    write_variant(conn, rng.choice(variants), status, step, plain_sql=True)


def random_updates(conn: Connection, variants: Sequence[uuid.UUID], rng: random.Random, count: int) -> int:
    """``count`` random updates (``random_update``) on ``conn``; returns ``count``."""
    for _ in range(count):
        random_update(conn, variants, rng)
    return count


def create_jobs(
    target: sqlalchemy.Engine | Connection, count: int, rng: random.Random, *, variants: tuple[int, int] = (2, 6)
) -> dict[uuid.UUID, list[uuid.UUID]]:
    """Create ``count`` queued jobs of ``variants[0]`` to ``variants[1]`` variants; their variant ids by job.

    On an Engine each job commits on its own, as an application would create it; on a connection
    they all join the caller's transaction.
    """
    jobs: dict[uuid.UUID, list[uuid.UUID]] = {}
    for _ in range(count):
        size = rng.randint(*variants)
        if isinstance(target, sqlalchemy.Engine):
            with target.begin() as conn:
                job_id, ids = outbox.create_job(conn, variants=size)
        else:
            job_id, ids = outbox.create_job(target, variants=size)
        jobs[job_id] = list(ids)
    return jobs


@dataclass(frozen=True, slots=True)
class JobsSummary:
    done: int
    stuck: int  # every variant done at the final step, yet the job is not done
    total: int


def jobs_summary(conn: psycopg.Connection[Any], job_ids: Sequence[uuid.UUID], final_step: str) -> JobsSummary:
    """How many of ``job_ids`` are done, and how many are stuck (all variants final, the job not done)."""
    with conn.cursor(row_factory=class_row(JobsSummary)) as cur:
        row = cur.execute(QUERIES["jobs_summary"], {"final_step": final_step, "job_ids": list(job_ids)}).fetchone()
    assert row is not None  # an aggregate without GROUP BY: always one row
    return row


# --- Planned walks ------------------------------------------------------------------------------


def pipeline_walk(steps: Sequence[str], fail_rate: float, rng: random.Random) -> deque[Move]:
    """Running then done at each step in order; at ``fail_rate`` a step fails first and is retried."""
    moves: deque[Move] = deque()
    for step in steps:
        moves.append(("running", step))
        if rng.random() < fail_rate:  # fail, then retried: the job goes back to running
            moves.extend([("failed", step), ("running", step)])
        moves.append(("done", step))
    return moves


def random_walk(rng: random.Random, completing: bool, steps: Sequence[str] = STEPS) -> deque[Move]:
    """1 to 7 random moves (backwards too); a completing variant, and 60% of the others, end done at the end."""
    moves: deque[Move] = deque((rng.choice(STATUSES), rng.choice(steps)) for _ in range(rng.randint(1, 7)))
    if completing or rng.random() < 0.6:
        moves.append(("done", steps[-1]))
    return moves


class WalkWriters:
    """Writer threads that write every variant's walk, in order, until every walk is done.

    Each thread, on its own connection, takes 1 or more variants from a shared queue (a size from
    ``batch_sizes``), writes the next move of each in one transaction (rolled back at
    ``rollback_rate``: the same moves are written again later) and puts them back. A variant is in
    one writer's hands at a time, so its moves commit in order and writers never wait on each
    other's row locks. Thread i writes via ``vias[i % len(vias)]``. ``on_commit`` is called with
    the variants of each committed transaction (under the writers' lock).
    """

    def __init__(
        self,
        db: DatabaseUrl,
        engine: sqlalchemy.Engine,
        walks: dict[uuid.UUID, deque[Move]],
        *,
        writers: int,
        seed: float,
        vias: Sequence[Via] = VIAS,
        batch_sizes: Sequence[int] = (1,),
        rollback_rate: float = 0.0,
        on_commit: Callable[[list[uuid.UUID]], None] | None = None,
    ) -> None:
        self.db, self.engine, self.walks = db, engine, walks
        self.errors: list[BaseException] = []
        self.counts: Counter[str] = Counter()  # committed (variant moves), multi, rolled_back
        self._batch_sizes, self._rollback_rate, self._on_commit = batch_sizes, rollback_rate, on_commit
        rng = random.Random(seed)
        waiting = [v for v in walks if walks[v]]
        self._ready: deque[uuid.UUID] = deque(rng.sample(waiting, len(waiting)))
        self._in_hand = 0  # variants taken by a writer, not given back yet
        self._changed = threading.Condition()
        self._threads = [
            threading.Thread(
                target=self._write, args=(i, vias[i % len(vias)], rng.random()), name=f"writer-{i}", daemon=True
            )
            for i in range(writers)
        ]

    def start(self) -> WalkWriters:
        for thread in self._threads:
            thread.start()
        return self

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    @property
    def busy(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _take(self, count: int) -> list[uuid.UUID]:
        """Up to ``count`` variants with moves left; none once every walk is done (or a writer failed)."""
        with self._changed:
            while not self._ready and self._in_hand and not self.errors:
                self._changed.wait()  # the last variants are in other writers' hands
            if self.errors:
                return []
            batch = [self._ready.popleft() for _ in range(min(count, len(self._ready)))]
            self._in_hand += len(batch)
            return batch

    def _give_back(self, batch: list[uuid.UUID], committed: bool) -> None:
        with self._changed:
            if committed:
                self.counts["committed"] += len(batch)
                self.counts["multi"] += len(batch) > 1
                for variant in batch:
                    self.walks[variant].popleft()
                if self._on_commit is not None:
                    self._on_commit(batch)
            else:
                self.counts["rolled_back"] += 1
            self._in_hand -= len(batch)
            self._ready.extend(v for v in batch if self.walks[v])
            self._changed.notify_all()

    def _write(self, index: int, via: Via, seed: float) -> None:
        rng = random.Random(seed)
        try:
            if via == "sqlalchemy-api":
                with self.engine.connect() as sa:
                    self._loop(rng, sa, via)
            else:
                with connect(self.db, application_name=f"writer-{index}", autocommit=False) as pg:
                    self._loop(rng, pg, via)
        except BaseException as exc:
            with self._changed:
                self.errors.append(exc)
                self._changed.notify_all()  # no writer waits for variants this one will never give back

    def _loop(self, rng: random.Random, conn: Connection, via: Via) -> None:
        while batch := self._take(rng.choice(self._batch_sizes)):
            rollback = rng.random() < self._rollback_rate
            in_transaction = _begin(conn)
            for variant in batch:
                status, step = self.walks[variant][0]
                write_variant(conn, variant, status, step, plain_sql=via == "plain-sql")
            in_transaction.rollback() if rollback else in_transaction.commit()
            self._give_back(batch, committed=not rollback)


def _begin(conn: Connection) -> Any:
    """The transaction ``conn`` writes in next: SQLAlchemy's begin(); psycopg (not autocommit) opens one itself."""
    return conn.begin() if isinstance(conn, sqlalchemy.Connection) else conn


# --- Writers until stopped ----------------------------------------------------------------------


class ChurnWriters:
    """Writer threads until stopped, each on its own jobs (so they never deadlock on variant rows).

    One uses the outbox API through SQLAlchemy, one through psycopg, one plain SQL (which also moves
    variants between its jobs, inserts and deletes variants); transactions touch 1 to 3 variants,
    of jobs in different partitions, and some roll back. The API writers create jobs now and then.
    With ``pause``, each waits that long before each transaction (load shaping, not synchronisation).
    """

    KINDS: tuple[Via, ...] = VIAS

    def __init__(
        self,
        db: DatabaseUrl,
        engine: sqlalchemy.Engine,
        jobs: dict[uuid.UUID, list[uuid.UUID]],
        *,
        threads: int = 3,
        seed: float = 0,
        pause: float = 0.0,
    ) -> None:
        self.db = db
        self.engine = engine
        self.pause = pause
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

    def __enter__(self) -> ChurnWriters:
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

    def _plan(self, rng: random.Random, kind: Via, own: dict[uuid.UUID, list[uuid.UUID]]) -> list[tuple[Any, ...]]:
        if self.pause:
            self._stop.wait(self.pause)
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
    def _run(conn: Connection, kind: Via, ops: list[tuple[Any, ...]]) -> None:
        for op in ops:
            if op[0] == "update":
                write_variant(conn, op[1], op[2], op[3], plain_sql=kind == "plain-sql")
            elif op[0] == "create":
                outbox.create_job(conn, job_id=op[1], variants=op[2])
            elif op[0] == "move":
                move_variant(conn, op[1], op[3])
            elif op[0] == "delete":
                delete_variant(conn, op[1])
            elif op[0] == "insert":
                insert_variant(conn, op[1], op[2], op[3], op[4])

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

    def _write(self, kind: Via, own: dict[uuid.UUID, list[uuid.UUID]], seed: float) -> None:
        rng = random.Random(seed)
        try:
            with (
                self.engine.connect() as sa,
                connect(self.db, application_name=f"writer-{kind}", autocommit=False) as pg,
            ):
                while not self._stop.is_set():
                    ops = self._plan(rng, kind, own)
                    if not ops:
                        continue
                    rollback = rng.random() < 0.04
                    conn: Connection = sa if kind == "sqlalchemy-api" else pg
                    in_transaction = _begin(conn)
                    self._run(conn, kind, ops)
                    in_transaction.rollback() if rollback else in_transaction.commit()
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


class UpdateWriters:
    """Threads each on its own autocommit connection writing ``random_update``s: ``updates`` each, or until stopped.

    Plain SQL (workload.sql's ``variant_update``): it runs on a team's own schema before the outbox is installed.
    """

    def __init__(
        self,
        db: DatabaseUrl,
        variants: Sequence[uuid.UUID],
        *,
        writers: int,
        seed: float,
        updates: int | None = None,
        statuses: Sequence[str] = ("running", "done", "failed"),
    ) -> None:
        self.db, self.variants, self.updates, self.statuses = db, variants, updates, statuses
        self.written = 0  # updates committed so far, by every writer
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        rng = random.Random(seed)
        self._threads = [threading.Thread(target=self._write, args=(rng.random(),)) for _ in range(writers)]

    def __enter__(self) -> UpdateWriters:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def _write(self, seed: float) -> None:
        rng = random.Random(seed)
        try:
            with connect(self.db, application_name="writer", autocommit=True) as conn:
                count = 0
                while not self._stop.is_set() and (self.updates is None or count < self.updates):
                    random_update(conn, self.variants, rng, statuses=self.statuses)
                    count += 1
                    with self._lock:
                        self.written += 1
        except BaseException as exc:
            self.errors.append(exc)


class PipelineWriters:
    """Writer threads until stopped, each creating jobs and moving their variants through the pipeline steps.

    Each writer keeps 3 jobs in flight (until stopped); a transaction moves up to 3 of its variants
    one step (running at ingest, detect, segment, iou_eval, then done or failed at iou_eval), through
    the outbox API (SQLAlchemy) or plain SQL (psycopg) on alternate writers, then waits ``pace``
    seconds (load shaping, not synchronisation).
    """

    def __init__(self, db: DatabaseUrl, engine: sqlalchemy.Engine, *, threads: int, seed: int, pace: float) -> None:
        self.db, self.engine, self.pace = db, engine, pace
        self.stop_event = threading.Event()
        self.errors: list[BaseException] = []
        self.transactions = 0
        self.jobs = 0
        self._lock = threading.Lock()
        seeds = random.Random(seed)
        self._threads = [
            threading.Thread(target=self._write, args=(i, seeds.random()), name=f"writer-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> PipelineWriters:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.join()

    def join(self, timeout: float = 60) -> None:
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        assert not self.errors, repr(self.errors[0])

    def _write(self, index: int, seed: float) -> None:
        rng = random.Random(seed)
        plain_sql = index % 2 == 1
        queues: list[tuple[int, list[tuple[uuid.UUID, str, str]]]] = []  # (job, a variant's moves still to make)
        created = 0
        try:
            with connect(self.db, application_name=f"writer-{index}", autocommit=False) as pg:
                while not self.stop_event.is_set():
                    while len({job for job, _ in queues}) < 3:
                        with self.engine.begin() as conn:
                            _, variants = outbox.create_job(conn, variants=rng.randint(2, 4))
                        created += 1
                        for variant in variants:
                            end = "done" if rng.random() > 0.1 else "failed"
                            moves = [(variant, "running", step) for step in STEPS] + [(variant, end, STEPS[-1])]
                            queues.append((created, moves))
                    chosen = [queue.pop(0) for _, queue in rng.sample(queues, min(3, len(queues)))]
                    if plain_sql:
                        for variant, status, step in chosen:
                            write_variant(pg, variant, status, step, plain_sql=True)
                        pg.commit()
                    else:
                        with self.engine.begin() as conn:
                            for variant, status, step in chosen:
                                write_variant(conn, variant, status, step)
                    with self._lock:
                        self.transactions += 1
                    queues = [(job, queue) for job, queue in queues if queue]
                    self.stop_event.wait(self.pace)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            with self._lock:
                self.jobs += created
