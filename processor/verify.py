"""`outbox verify`: compare the event-derived state with jobs_variants and jobs, and repair drift.

Repairs go through the normal path, never behind the processor's back: a variant row that
disagrees with its events gets a new event carrying the row's state (the worker applies it), and a
job whose state disagrees with the fold of its variants is rebuilt by replay.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from processor import store
from processor.batch import FoldContext, fold_jobs
from processor.replay import rebuild_jobs
from processor.store import QUERIES, Connection


@dataclass
class VerifyReport:
    variant_drift: list[dict[str, Any]] = field(default_factory=list)
    job_drift: list[dict[str, Any]] = field(default_factory=list)
    stuck_jobs: list[dict[str, Any]] = field(default_factory=list)
    flagged_jobs: int = 0
    jobs_in_flight: int = 0

    @property
    def drift(self) -> bool:
        return bool(self.variant_drift or self.job_drift or self.stuck_jobs)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drift": self.drift}

    @classmethod
    def merge(cls, reports: list[VerifyReport]) -> VerifyReport:
        """One report for several partitions (the flagged-jobs count is global already)."""
        merged = cls(flagged_jobs=max((r.flagged_jobs for r in reports), default=0))
        for report in reports:
            merged.variant_drift += report.variant_drift
            merged.job_drift += report.job_drift
            merged.stuck_jobs += report.stuck_jobs
            merged.jobs_in_flight += report.jobs_in_flight
        return merged


def verify(conn: Connection, ctx: FoldContext, *, limit: int = 1000, chunk_size: int = 2000) -> VerifyReport:
    """Read everything in one REPEATABLE READ snapshot, so the worker running meanwhile is no drift."""
    report = VerifyReport()
    with conn.transaction():
        conn.execute(QUERIES["transaction_snapshot"])
        cursor = store.checkpoint_get(conn, ctx.partition).cursor
        params = {"partition": ctx.partition, "limit": limit, **store.cursor_params(cursor)}
        in_flight = {row[0] for row in conn.execute(QUERIES["verify_jobs_pending"], params)}
        report.jobs_in_flight = len(in_flight)
        report.flagged_jobs = _scalar(conn, "job_flags_count")
        for row in conn.execute(QUERIES["verify_variant_drift"], params):
            report.variant_drift.append(
                {
                    "variant_id": str(row[0]),
                    "row": None
                    if row[1] is None and row[2] is None
                    else {"job_id": _s(row[1]), "status": row[2], "step": row[3]},
                    "events": None if row[4] is None else {"job_id": _s(row[4]), "status": row[5], "step": row[6]},
                }
            )
        final = ctx.pipeline.final
        for job_id, status, step in conn.execute(QUERIES["verify_stuck_jobs"], {**params, "final_step": final}):
            if job_id not in in_flight:
                report.stuck_jobs.append({"job_id": str(job_id), "status": status, "current_step": step})
        after = uuid.UUID(int=0)
        while len(report.job_drift) < limit:
            job_ids = [
                row[0]
                for row in conn.execute(
                    QUERIES["verify_job_ids_after"], {"partition": ctx.partition, "after": after, "limit": chunk_size}
                )
            ]
            if not job_ids:
                break
            after = job_ids[-1]
            checked = [j for j in job_ids if j not in in_flight]
            folded = fold_jobs(checked, store.variant_states_to_fold(conn, checked), ctx)
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


def repair(conn: Connection, ctx: FoldContext, report: VerifyReport) -> tuple[int, int]:
    """Fix what ``report`` found; return (resync events written, jobs rebuilt)."""
    events = 0
    for drift in report.variant_drift:
        with conn.transaction():
            state_job = uuid.UUID(drift["events"]["job_id"]) if drift["events"] else None
            conn.execute(
                QUERIES["variant_resync"], {"variant_id": uuid.UUID(drift["variant_id"]), "state_job_id": state_job}
            )
            events += 1
    jobs = sorted({uuid.UUID(d["job_id"]) for d in report.job_drift + report.stuck_jobs})
    for start in range(0, len(jobs), 500):
        rebuild_jobs(conn, ctx, jobs[start : start + 500], dry_run=False)
    return events, len(jobs)


def _s(value: object) -> str | None:
    return None if value is None else str(value)


def _scalar(conn: Connection, query: str) -> int:
    row = conn.execute(QUERIES[query]).fetchone()
    assert row is not None
    return int(row[0])
