"""`outbox verify`: compare the event-derived state with jobs_variants and jobs, and repair drift.

Everything is read in one REPEATABLE READ snapshot, so a worker running meanwhile is no drift, and
pending work (outbox_events_pending, outbox_dirty_jobs: not in job state yet, by design) is in
flight, left out. Flagged jobs are reported with their reason: their state is knowingly not
computed, so verify cannot vouch for them. Held jobs (outbox.hold_job) are listed, not compared:
their state is the application's until the hold is released.

Repairs go through the normal path, never behind the processor's back: a variant row that
disagrees with its events gets a new event carrying the row's state (the worker applies it), and a
job whose state disagrees with the fold of its variants is rebuilt by replay. What repair cannot
decide (a job held by a dead letter, a step missing from the pipeline) it says, with what to run.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from processor import fold_config, store
from processor.batch import fold_jobs
from processor.replay import rebuild_jobs
from processor.store import QUERIES, Connection


@dataclass
class VerifyReport:
    variant_drift: list[dict[str, Any]] = field(default_factory=list)
    job_drift: list[dict[str, Any]] = field(default_factory=list)
    stuck_jobs: list[dict[str, Any]] = field(default_factory=list)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)
    jobs_in_flight: int = 0

    @property
    def drift(self) -> bool:
        return bool(self.variant_drift or self.job_drift or self.stuck_jobs)

    @property
    def flagged_jobs(self) -> int:
        return len(self.flagged)

    @property
    def ok(self) -> bool:
        """Nothing drifted and nothing flagged: every job's state is the fold of its variants."""
        return not self.drift and not self.flagged

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drift": self.drift, "flagged_jobs": self.flagged_jobs, "ok": self.ok}


def verify(
    conn: Connection, partition: int | None = None, *, limit: int = 1000, chunk_size: int = 2000
) -> VerifyReport:
    """Compare, in one snapshot, every partition's state (or ``partition``'s) with jobs_variants and jobs."""
    report = VerifyReport()
    with conn.transaction():
        conn.execute(QUERIES["transaction_snapshot"])
        config = fold_config.load(conn)
        row = conn.execute(QUERIES["verify_in_flight"]).fetchone()
        assert row is not None
        in_flight_jobs, in_flight_variants = set(row[0]), list(row[1])
        report.jobs_in_flight = len(in_flight_jobs)
        params = {
            "partition": partition,
            "limit": limit,
            "in_flight_jobs": sorted(in_flight_jobs),
            "in_flight_variants": in_flight_variants,
        }
        for job_id, reason, flagged_at, letters in conn.execute(QUERIES["job_flags_list"], params):
            report.flagged.append(
                {"job_id": str(job_id), "reason": reason, "flagged_at": flagged_at.isoformat(), "dead_letters": letters}
            )
        flagged = {uuid.UUID(f["job_id"]) for f in report.flagged}
        holds = store.job_holds(conn)
        for hold in holds.values():
            report.held.append(
                {
                    "job_id": str(hold.job_id),
                    "status": hold.status,
                    "current_step": hold.current_step,
                    "reason": hold.reason,
                    "held_at": hold.held_at.isoformat(),
                }
            )
        for r in conn.execute(QUERIES["verify_variant_drift"], params):
            report.variant_drift.append(
                {
                    "variant_id": str(r[0]),
                    "row": None
                    if r[1] is None and r[2] is None
                    else {"job_id": _s(r[1]), "status": r[2], "step": r[3]},
                    "events": None if r[4] is None else {"job_id": _s(r[4]), "status": r[5], "step": r[6]},
                }
            )
        stuck = conn.execute(QUERIES["verify_stuck_jobs"], {**params, "final_step": config.pipeline.final})
        for job_id, status, step in stuck:
            if job_id not in flagged and job_id not in holds:
                report.stuck_jobs.append({"job_id": str(job_id), "status": status, "current_step": step})
        skipped = in_flight_jobs | flagged | set(holds)
        after = uuid.UUID(int=0)
        while len(report.job_drift) < limit:
            rows = conn.execute(
                QUERIES["verify_job_ids_after"], {"partition": partition, "after": after, "limit": chunk_size}
            ).fetchall()
            if not rows:
                break
            after = rows[-1][0]
            checked = [row[0] for row in rows if row[0] not in skipped]
            folded = fold_jobs(checked, store.variant_states_to_fold(conn, checked), config)
            actual = store.jobs_get(conn, checked)
            for job_id, state in folded.states.items():
                expected = (state.status.value, state.current_step)
                if job_id in actual and actual[job_id] != expected:
                    report.job_drift.append(
                        {
                            "job_id": str(job_id),
                            "jobs": {"status": actual[job_id][0], "current_step": actual[job_id][1]},
                            "events": {"status": expected[0], "current_step": expected[1]},
                        }
                    )
    return report


@dataclass
class RepairReport:
    resync_events: int = 0
    jobs_rebuilt: int = 0
    # What repair cannot decide, each with what to run.
    cannot_repair: list[str] = field(default_factory=list)
    # Resync events the workers had not applied when repair stopped waiting.
    not_applied: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def repair(conn: Connection, report: VerifyReport, *, wait: float = 30.0) -> RepairReport:
    """Fix what ``report`` found; then wait (up to ``wait`` s) for the workers to apply the resync events."""
    result = RepairReport()
    resynced: list[uuid.UUID] = []
    for drift in report.variant_drift:
        variant_id = uuid.UUID(drift["variant_id"])
        state_job = uuid.UUID(drift["events"]["job_id"]) if drift["events"] else None
        with conn.transaction():
            # The row's state as a new event, under the row's lock (its version orders after every
            # change already made to the variant).
            conn.execute(QUERIES["variant_resync"], {"variant_id": variant_id, "state_job_id": state_job})
        if state_job is not None:
            # A stored state whose version capture never issued is rebuilt from the events too: no
            # new event could ever be newer. Its own transaction: appending the event above took the
            # outbox's lock, which must not be held while waiting for the checkpoints (the order of
            # `outbox repartition`).
            rebuild_jobs(conn, [state_job], variant_ids=[variant_id], dry_run=False)
        result.resync_events += 1
        resynced.append(variant_id)
    jobs = sorted({uuid.UUID(d["job_id"]) for d in report.job_drift + report.stuck_jobs})
    for start in range(0, len(jobs), 500):
        rebuild_jobs(conn, jobs[start : start + 500], dry_run=False)
    result.jobs_rebuilt = len(jobs)
    for flag in report.flagged:
        result.cannot_repair.append(_advice(flag))
    if resynced:
        deadline = time.monotonic() + wait
        while (left := _pending_variants(conn, resynced)) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the workers' progress, not synchronisation
        result.not_applied = left
    return result


def _pending_variants(conn: Connection, variant_ids: list[uuid.UUID]) -> int:
    row = conn.execute(QUERIES["verify_in_flight"]).fetchone()
    assert row is not None
    return len(set(variant_ids) & set(row[1]))


def _advice(flag: dict[str, Any]) -> str:
    """What to do about a flagged job, in one line."""
    job, reason, letters = flag["job_id"], flag["reason"], flag["dead_letters"]
    if letters:
        ids = " ".join(str(e) for e in letters)
        return (
            f"job {job} is flagged ({reason}): fix the event and run `outbox dead-letters retry {ids}`, "
            f"or drop it with `outbox dead-letters discard {ids}`"
        )
    if "is not in the pipeline" in reason:
        return f"job {job} is flagged ({reason}): add the step with `outbox pipeline set ...`, or fix the variant"
    return f"job {job} is flagged ({reason}): see `outbox dead-letters list`"


def _s(value: object) -> str | None:
    return None if value is None else str(value)
