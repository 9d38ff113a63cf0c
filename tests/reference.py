"""Independent references: job state, computed in SQL from jobs_variants, and an event's partition.

Written apart from processor.fold and the schema's functions (different language, different shape)
so that a shared mistake is unlikely; tests compare what the product wrote with these.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import psycopg

REFERENCE_SQL = """
WITH ranked AS (
    SELECT job_id, status,
           -- 1-based; a variant with no step yet waits for the first step
           coalesce(array_position(%(steps)s::text[], current_step), 1) AS step_rank,
           coalesce(status = 'done' AND current_step = %(final)s, false) AS finished
    FROM jobs_variants
)
SELECT job_id,
       CASE WHEN bool_and(finished) THEN 'done'
            WHEN bool_and(status = 'queued') THEN 'queued'
            WHEN bool_or(status = 'failed')
                 AND (%(immediate)s OR bool_and(finished OR status = 'failed')) THEN 'failed'
            ELSE 'running' END AS status,
       CASE WHEN bool_and(finished) THEN %(final)s
            ELSE (%(steps)s::text[])[min(step_rank) FILTER (WHERE NOT finished)] END AS current_step
FROM ranked
GROUP BY job_id
"""


def reference_job_states(
    conn: psycopg.Connection[Any], steps: tuple[str, ...], *, immediate: bool = False
) -> dict[uuid.UUID, tuple[str, str]]:
    rows = conn.execute(REFERENCE_SQL, {"steps": list(steps), "final": steps[-1], "immediate": immediate}).fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


def actual_job_states(conn: psycopg.Connection[Any]) -> dict[uuid.UUID, tuple[str, str]]:
    rows = conn.execute(
        "SELECT job_id, status::text, current_step::text FROM jobs WHERE job_id IN (SELECT job_id FROM jobs_variants)"
    ).fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


def partition_of(job_id: uuid.UUID, partitions: int) -> int:
    """The documented hash (schema/migrations/0006_partitions.sql), computed apart from the database."""
    return int(hashlib.md5(str(job_id).encode()).hexdigest()[:8], 16) % partitions
