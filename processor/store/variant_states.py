"""Each variant's newest state, merged in from decoded events and read for the fold."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence

from psycopg.rows import kwargs_row, scalar_row

from outbox.events import VariantStatus
from outbox.sqlfile import load_queries
from processor.fold import VariantState
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "variant_states.sql")


_STATUSES = {status.value: status for status in VariantStatus}  # a dict lookup: cheaper than VariantStatus(x)


def variant_states_upsert(
    conn: Connection, partition: int, changes: Sequence[tuple[VariantState, int]], *, awaiting_fold: bool
) -> set[uuid.UUID]:
    """Store each (state, event id) unless a newer one is stored; return the jobs to fold again.

    The merge keeps each variant's newest (outbox_variant_states_newest). With ``awaiting_fold``,
    the jobs go to outbox_dirty_jobs, to await their fold, and nothing is returned.
    """
    if not changes:
        return set()
    params = {
        "partition": partition,
        "awaiting_fold": awaiting_fold,
        "variant_ids": [s.variant_id for s, _ in changes],
        "job_ids": [s.job_id for s, _ in changes],
        "versions": [s.version for s, _ in changes],
        "statuses": [s.status.value if s.status else None for s, _ in changes],
        "steps": [s.step for s, _ in changes],
        "removed": [s.removed for s, _ in changes],
        "problems": [s.problem for s, _ in changes],
        "event_ids": [event_id for _, event_id in changes],
    }
    with conn.cursor(row_factory=kwargs_row(_job_id)) as cur:
        return set(cur.execute(QUERIES["variant_states_upsert"], params).fetchall())


def _job_id(*, job_id: uuid.UUID) -> uuid.UUID:
    return job_id


def _fold_input(
    *,
    job_id: uuid.UUID,
    variant_id: uuid.UUID,
    version: int,
    status: str | None,
    step: str | None,
    problem: str | None,
) -> VariantState:
    return VariantState(variant_id, job_id, version, _STATUSES[status] if status else None, step, False, problem)


def variant_states_to_fold(conn: Connection, job_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, list[VariantState]]:
    """Each job's distinct live variant states (see the query): all that processor.fold needs."""
    with conn.cursor(row_factory=kwargs_row(_fold_input), binary=True) as cur:
        states = cur.execute(QUERIES["variant_states_to_fold"], {"job_ids": list(job_ids)}).fetchall()
    by_job: dict[uuid.UUID, list[VariantState]] = defaultdict(list)
    for state in states:
        by_job[state.job_id].append(state)
    return by_job


def replay_variants_of_jobs(conn: Connection, job_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """Every variant that belongs or belonged to the jobs."""
    params = {"job_ids": list(job_ids)}
    return conn.cursor(row_factory=scalar_row).execute(QUERIES["replay_variants_of_jobs"], params).fetchall()


def variant_states_rebuild(conn: Connection, variant_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Rebuild these variants' states from the baseline and applied events; return the jobs to fold again.

    The caller holds every checkpoint's lock (checkpoints_lock_all).
    """
    params = {"variant_ids": list(variant_ids)}
    rows = conn.cursor(row_factory=scalar_row).execute(QUERIES["variant_states_rebuild"], params)
    return {job_id for job_id in rows if job_id is not None}
