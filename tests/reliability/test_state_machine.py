"""Stateful property test: job state in the database always equals a model's fold.

A hypothesis ``RuleBasedStateMachine`` drives a real PostgreSQL database through real
connections: committed writes (plain SQL and the Python API), rolled-back transactions,
transactions left open across other rules and committed or rolled back later, duplicated events,
workers that crash before committing a batch, fresh workers that drain, and replays.

The model keeps the committed state of every variant and computes the expected job state itself
(``model_job_state`` below, written without ``processor.fold``). It also keeps what ``jobs``
must hold right now: the fold as of the committed point the processor last caught up to (it
writes a job's state only from a complete snapshot, so a duplicated event or a replay never
changes it, a worker that crashes in its first batch changes nothing at all, and one that crashes
later leaves jobs at the fold of one committed point). Checked after every step, and after every
drain also against the SQL reference (``tests.reference``) and ``jobs_variants`` itself.

One migrated database serves the whole run; its tables are truncated between examples (much
faster than a database per example: about 20 ms against 160 ms).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import outbox
from processor import store
from processor.database import DatabaseUrl, connect
from processor.errors import ConsumerBusyError
from processor.replay import replay
from processor.settings import Settings
from processor.worker import Worker
from tests.fix_database import create_database, drop_database, make_settings
from tests.reference import reference_job_states

STEPS = ("ingest", "detect", "segment", "iou_eval")
STATUSES = ("queued", "running", "done", "failed")
OPEN_SLOTS = 2  # transactions that may be open at once

RESET_SQL = [
    "TRUNCATE jobs, jobs_variants, outbox_events, outbox_dirty_jobs, outbox_job_flags, outbox_variant_states,"
    " outbox_dead_letters, outbox_throughput, outbox_variant_baseline",
    "UPDATE outbox_checkpoints SET done_snapshot = '1:1:', target_snapshot = NULL, last_txid = '0',"
    " last_event_id = 0, events_applied = 0, last_applied_event_id = NULL, last_applied_at = NULL,"
    " updated_at = NULL",
]

status_st = st.sampled_from(STATUSES)
step_st = st.one_of(st.none(), st.sampled_from(STEPS))

JobRow = tuple[str | None, str | None]
Variant = tuple[uuid.UUID, str, str | None]  # (job_id, status, step)


def model_job_state(variants: list[tuple[str, str | None]]) -> JobRow:
    """The expected job state from its live variants' (status, step); settled failure policy."""
    final = STEPS[-1]
    unfinished = [(status, step) for status, step in variants if (status, step) != ("done", final)]
    if not unfinished:
        return ("done", final)
    least = STEPS[min(0 if step is None else STEPS.index(step) for _, step in unfinished)]
    if all(status == "queued" for status, _ in variants):
        return ("queued", least)
    if all(status == "failed" for status, _ in unfinished):
        return ("failed", least)
    return ("running", least)


class InjectedCrash(Exception):
    """Raised by a worker's before_commit hook: the batch must roll back."""


@dataclass
class OpenTransaction:
    """A transaction left open across rules, and what it changed (absolute states, in order)."""

    conn: psycopg.Connection[Any]
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    locked: set[uuid.UUID] = field(default_factory=set)  # variants it wrote (row-locked until it ends)
    variants: dict[uuid.UUID, Variant | None] = field(default_factory=dict)  # its own view (None: deleted)
    jobs: set[uuid.UUID] = field(default_factory=set)  # jobs it created

    @property
    def active(self) -> bool:
        return bool(self.ops)


class JobStateMachine(RuleBasedStateMachine):
    # Set by the test function before the run.
    db: DatabaseUrl
    settings_by_batch: dict[int, Settings]
    examples = 0
    steps = 0
    drains = 0
    busy_retries = 0
    seen: ClassVar[Counter[str]] = Counter()  # what the run exercised, printed at the end

    def __init__(self) -> None:
        super().__init__()
        type(self).examples += 1
        self.conn = connect(self.db, application_name="outbox-sm-main", autocommit=True)
        self.conn.execute("SET lock_timeout = '10s'")  # a modelling mistake fails instead of hanging
        for statement in RESET_SQL:
            self.conn.execute(statement)
        self.slots = []
        for index in range(OPEN_SLOTS):
            tx_conn = connect(self.db, application_name=f"outbox-sm-open-{index}", autocommit=False)
            tx_conn.execute("SET lock_timeout = '10s'")
            tx_conn.commit()
            self.slots.append(OpenTransaction(tx_conn))
        self.counter = 0
        # The model: committed live variants, committed jobs, and what jobs must hold now.
        self.variants: dict[uuid.UUID, Variant] = {}
        self.jobs: set[uuid.UUID] = set()
        self.applied: dict[uuid.UUID, JobRow] = {}
        # The committed points since the one ``applied`` was folded at (history[0]): the live
        # variants after each commit. A snapshot the processor takes is one of them.
        self.history: list[dict[uuid.UUID, Variant]] = [{}]
        self.drained_once = False

    def teardown(self) -> None:
        for slot in self.slots:
            slot.conn.close()
        self.conn.close()

    # --- helpers -------------------------------------------------------------------------------

    def _new_id(self, kind: int) -> uuid.UUID:
        self.counter += 1
        return uuid.UUID(int=(kind << 64) + self.counter)

    def _locked(self) -> set[uuid.UUID]:
        return set().union(*(slot.locked for slot in self.slots))

    def _free_variants(self, own: OpenTransaction | None = None) -> list[uuid.UUID]:
        """Variants a transaction can write without waiting for another one's row lock."""
        locked = self._locked() - (own.locked if own else set())
        live = set(self.variants)
        if own is not None:
            live |= {v for v, state in own.variants.items() if state is not None}
            live -= {v for v, state in own.variants.items() if state is None}
        return sorted(live - locked)

    def _visible_jobs(self, own: OpenTransaction | None = None) -> list[uuid.UUID]:
        return sorted(self.jobs | (own.jobs if own else set()))

    def _view(self, variant_id: uuid.UUID, own: OpenTransaction | None) -> Variant:
        if own is not None and variant_id in own.variants:
            state = own.variants[variant_id]
            assert state is not None
            return state
        return self.variants[variant_id]

    def _expected_at(self, point: int) -> dict[uuid.UUID, JobRow]:
        """What jobs hold once the processor folded the snapshot at a committed point.

        A job with live variants at that point has their fold; any other job (one with no variant
        left, or created later) keeps the row it has: its last state, or the one create_job wrote.
        """
        by_job: dict[uuid.UUID, list[tuple[str, str | None]]] = {}
        for job_id, status, step in self.history[point].values():
            by_job.setdefault(job_id, []).append((status, step))
        return {
            job_id: model_job_state(by_job[job_id]) if job_id in by_job else self.applied[job_id]
            for job_id in self.jobs
        }

    def _do_op(
        self, conn: psycopg.Connection[Any], data: st.DataObject, own: OpenTransaction | None
    ) -> tuple[Any, ...]:
        """One random change on ``conn`` (inside a transaction); returns it as an absolute op."""
        free = self._free_variants(own)
        jobs = self._visible_jobs(own)
        choices = ["create"]
        if free:
            choices += ["sql", "api", "api", "delete"]
        if jobs:
            choices.append("add")
        kind = data.draw(st.sampled_from(choices), label="op")
        if kind == "create":
            return self._create_job(conn, data)
        if kind == "add":
            job_id = data.draw(st.sampled_from(jobs), label="job")
            status, step = data.draw(status_st, label="status"), data.draw(step_st, label="step")
            variant_id = self._new_id(2)
            conn.execute(
                "INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step, updated_at)"
                " VALUES (%s, %s, %s, %s, now())",
                [variant_id, job_id, status, step],
            )
            return ("set", variant_id, job_id, status, step)
        variant_id = data.draw(st.sampled_from(free), label="variant")
        job_id, _old_status, old_step = self._view(variant_id, own)
        if kind == "delete":
            conn.execute("DELETE FROM jobs_variants WHERE job_variants_id = %s", [variant_id])
            return ("delete", variant_id)
        status, step = data.draw(status_st, label="status"), data.draw(step_st, label="step")
        if kind == "sql":
            conn.execute(
                "UPDATE jobs_variants SET status = %s, current_step = %s, updated_at = now()"
                " WHERE job_variants_id = %s",
                [status, step, variant_id],
            )
        else:
            outbox.update_variant(conn, variant_id, status=status, step=step)
            step = old_step if step is None else step  # the API keeps the step when given none
        return ("set", variant_id, job_id, status, step)

    def _create_job(self, conn: psycopg.Connection[Any], data: st.DataObject) -> tuple[Any, ...]:
        count = data.draw(st.integers(1, 4), label="variants")
        step = data.draw(step_st, label="initial step")
        job_id = self._new_id(1)
        variant_ids = [self._new_id(2) for _ in range(count)]
        got = outbox.create_job(conn, variants=variant_ids, job_id=job_id, step=step)
        assert got == (job_id, variant_ids)
        return ("create", job_id, step, variant_ids)

    def _commit_ops(self, ops: list[tuple[Any, ...]]) -> None:
        if not ops:
            return
        for op in ops:
            if op[0] == "create":
                _, job_id, step, variant_ids = op
                self.jobs.add(job_id)
                self.applied[job_id] = ("queued", step)  # the row create_job inserts
                for variant_id in variant_ids:
                    self.variants[variant_id] = (job_id, "queued", step)
            elif op[0] == "set":
                _, variant_id, job_id, status, step = op
                self.variants[variant_id] = (job_id, status, step)
            else:
                del self.variants[op[1]]
        self.history.append(dict(self.variants))

    @staticmethod
    def _track(own: OpenTransaction, op: tuple[Any, ...]) -> None:
        own.ops.append(op)
        if op[0] == "create":
            own.jobs.add(op[1])
            for variant_id in op[3]:
                own.variants[variant_id] = (op[1], "queued", op[2])
                own.locked.add(variant_id)
        elif op[0] == "set":
            own.variants[op[1]] = op[2:]
            own.locked.add(op[1])
        else:
            own.variants[op[1]] = None
            own.locked.add(op[1])

    def _jobs_table(self) -> dict[uuid.UUID, JobRow]:
        rows = self.conn.execute("SELECT job_id, status, current_step FROM jobs").fetchall()
        return {row[0]: (row[1], row[2]) for row in rows}

    def _processor_state(self) -> tuple[Any, ...]:
        checkpoint = self.conn.execute(
            "SELECT done_snapshot::text, target_snapshot::text, last_txid::text, last_event_id, events_applied"
            " FROM outbox_checkpoints WHERE partition = 0"
        ).fetchone()
        variant_states = self.conn.execute("SELECT * FROM outbox_variant_states ORDER BY variant_id").fetchall()
        dirty = self.conn.execute("SELECT job_id FROM outbox_dirty_jobs ORDER BY job_id").fetchall()
        return (checkpoint, variant_states, dirty, self._jobs_table())

    def _run_worker(self, settings_: Settings, before_commit: Any = None) -> None:
        """Run a fresh worker until idle; a previous worker's backend may still be exiting."""
        deadline = time.monotonic() + 5
        while True:
            try:
                Worker(settings_, self.db, before_commit=before_commit).run(until_idle=True)
                return
            except ConsumerBusyError:
                type(self).busy_retries += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _settings(self, data: st.DataObject) -> Settings:
        return self.settings_by_batch[data.draw(st.sampled_from(sorted(self.settings_by_batch)), label="batch size")]

    def _caught_up(self) -> None:
        """After a complete drain: jobs hold the fold of the committed model; check everything."""
        final = self._expected_at(-1)
        live_at_end = {job_id for job_id, _, _ in self.history[-1].values()}
        actual = self._jobs_table()
        for job_id in final:
            if job_id not in live_at_end:
                # A job left with no variant keeps the state of whichever committed snapshot last
                # folded it: any point since the last drain (a catch-up may have stopped at one).
                possible = {self._expected_at(point).get(job_id) for point in range(len(self.history))}
                possible.add(self.applied.get(job_id))
                assert actual.get(job_id) in possible, (job_id, actual.get(job_id), possible)
                final[job_id] = actual[job_id]
        self.applied = final
        self.history = self.history[-1:]
        self.drained_once = True
        type(self).drains += 1
        assert self._jobs_table() == self.applied
        assert store.work_pending(self.conn, 0) == 0
        # The model's own bookkeeping against the database, and its fold against the SQL reference.
        rows = self.conn.execute("SELECT job_variants_id, job_id, status, current_step FROM jobs_variants").fetchall()
        assert {row[0]: (row[1], row[2], row[3]) for row in rows} == self.variants
        live_jobs = {job_id for job_id, _, _ in self.variants.values()}
        expected = {job_id: state for job_id, state in self.applied.items() if job_id in live_jobs}
        assert reference_job_states(self.conn, STEPS) == expected

    # --- rules ---------------------------------------------------------------------------------

    @initialize(data=st.data())
    def first_jobs(self, data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 3), label="initial jobs")):
            with self.conn.transaction():
                self._commit_ops([self._create_job(self.conn, data)])

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        """A committed transaction of one to three changes."""
        with self.conn.transaction():
            own = OpenTransaction(self.conn)  # tracks the transaction's own view while it runs
            for _ in range(data.draw(st.integers(1, 3), label="changes")):
                self._track(own, self._do_op(self.conn, data, own))
        self._commit_ops(own.ops)

    @rule(data=st.data())
    def write_rolled_back(self, data: st.DataObject) -> None:
        """Changes in a transaction that rolls back: the model does not change."""
        with self.conn.transaction() as tx:
            own = OpenTransaction(self.conn)
            for _ in range(data.draw(st.integers(1, 3), label="changes")):
                self._track(own, self._do_op(self.conn, data, own))
            raise psycopg.Rollback(tx)

    @rule(data=st.data(), slot=st.integers(0, OPEN_SLOTS - 1))
    def write_in_open_transaction(self, data: st.DataObject, slot: int) -> None:
        """Begin (or go on with) a transaction that stays open across other rules."""
        own = self.slots[slot]
        for _ in range(data.draw(st.integers(1, 2), label="changes")):
            self._track(own, self._do_op(own.conn, data, own))

    @precondition(lambda self: any(slot.active for slot in self.slots))
    @rule(data=st.data(), commit=st.booleans())
    def end_open_transaction(self, data: st.DataObject, commit: bool) -> None:
        """Commit (the model takes its changes) or roll back a transaction left open."""
        own = data.draw(st.sampled_from([slot for slot in self.slots if slot.active]), label="slot")
        if commit:
            own.conn.commit()
            self._commit_ops(own.ops)
        else:
            own.conn.rollback()
        self.seen["late commit" if commit else "late rollback"] += 1
        self.slots[self.slots.index(own)] = OpenTransaction(own.conn)

    @precondition(lambda self: self.drained_once)
    @rule(data=st.data())
    def duplicate_event(self, data: st.DataObject) -> None:
        """Deliver an applied event again: a copy in a new row (and a new transaction)."""
        applied = self.conn.execute(
            "SELECT e.event_id FROM outbox_events AS e, outbox_checkpoints AS c WHERE c.partition = 0"
            " AND outbox_event_applied_v1(e.txid, e.event_id, c.done_snapshot, c.target_snapshot,"
            " c.last_txid, c.last_event_id) ORDER BY e.event_id"
        ).fetchall()
        if not applied:
            return
        event_id = data.draw(st.sampled_from([row[0] for row in applied]), label="event")
        self.conn.execute(
            "INSERT INTO outbox_events (partition, event_type, schema_version, job_id, variant_id,"
            " variant_version, payload)"
            " SELECT partition, event_type, schema_version, job_id, variant_id, variant_version, payload"
            " FROM outbox_events WHERE event_id = %s",
            [event_id],
        )
        self.seen["duplicate event"] += 1

    @rule(data=st.data(), crash_at=st.integers(1, 3))
    def worker_crash(self, data: st.DataObject, crash_at: int) -> None:
        """A worker whose batch transaction fails at its ``crash_at``-th commit."""
        calls = 0

        def before_commit() -> None:
            nonlocal calls
            calls += 1
            if calls >= crash_at:
                raise InjectedCrash(f"injected crash before commit of batch {calls}")

        before = self._processor_state()
        # Small batches, so that a catch-up often spans several and the crash lands inside it.
        settings_ = self.settings_by_batch[data.draw(st.sampled_from([1, 2, 3, 1000]), label="batch size")]
        try:
            self._run_worker(settings_, before_commit)
        except InjectedCrash:
            if crash_at == 1:
                assert self._processor_state() == before  # nothing at all was applied
                self.seen["crash, nothing applied"] += 1
                return
            # Batches before the crash committed: a catch-up may have completed and its jobs been
            # folded. Job state is only ever written from a complete snapshot, so jobs must hold the
            # fold as of one committed point (the earliest that fits, so as not to skip any).
            jobs = self._jobs_table()
            points = [point for point in range(len(self.history)) if self._expected_at(point) == jobs]
            assert points, f"jobs hold no committed state: {jobs}"
            self.applied = jobs
            self.seen["crash after a folded catch-up" if points[0] else "crash, jobs unchanged"] += 1
            self.history = self.history[points[0] :]
            return
        self.seen["no crash (too few batches)"] += 1
        self._caught_up()  # fewer batches than crash_at: a complete drain

    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        """A fresh worker (a restart) processes everything committed, then stops."""
        self._run_worker(self._settings(data))
        self._caught_up()

    @rule()
    def replay_all(self) -> None:
        """Replay rebuilds every job from the applied events: the same state as live processing."""
        replay(self.conn, store.job_ids_all(self.conn, 0), dry_run=False)
        self.seen["replay"] += 1

    @invariant()
    def jobs_hold_the_last_drained_fold(self) -> None:
        type(self).steps += 1
        assert self._jobs_table() == self.applied


def test_job_state_matches_the_model(server_url: DatabaseUrl, template_db: str) -> None:
    name = f"outbox_sm_{os.getpid()}"
    drop_database(server_url, name)
    db = create_database(server_url, name, template=template_db)
    try:
        JobStateMachine.db = db
        JobStateMachine.settings_by_batch = {size: make_settings(db, batch_size=size) for size in (1000, 1, 2, 3)}
        JobStateMachine.seen.clear()
        JobStateMachine.examples = JobStateMachine.steps = JobStateMachine.drains = JobStateMachine.busy_retries = 0
        started = time.perf_counter()
        run_state_machine_as_test(
            JobStateMachine,
            settings=settings(
                max_examples=200,
                stateful_step_count=20,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            ),
        )
        elapsed = time.perf_counter() - started
        print(
            f"\nstate machine: {JobStateMachine.examples} examples, {JobStateMachine.steps} invariant checks, "
            f"{JobStateMachine.drains} complete drains checked, {elapsed:.1f} s"
            f" (worker start retried {JobStateMachine.busy_retries} times on a consumer lock still held)"
        )
        print("  " + ", ".join(f"{what}: {count}" for what, count in sorted(JobStateMachine.seen.items())))
    finally:
        drop_database(server_url, name)
