"""Write jobs and variant changes, and so their events, in the caller's transaction.

These calls never commit: each change and its event (appended by the capture trigger that
``outbox migrate`` installs, the same one that captures plain SQL writers) commit or roll back
together with whatever else the caller's transaction does. What the API adds over plain SQL is
validation before anything is written: statuses and steps are checked against the event model.
They accept a SQLAlchemy ``Connection`` (psycopg or psycopg2 driver) or a psycopg 3 ``Connection``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy.engine import Connection as SAConnection

from outbox.events import VariantChanged, VariantStatus
from outbox.sqlfile import load_queries

_QUERIES = load_queries("outbox", "queries.sql")

AnyConnection = SAConnection | psycopg.Connection[Any]


class VariantNotFoundError(LookupError):
    """``update_variant`` was given the id of a variant that does not exist."""


class UnknownStepError(ValueError):
    """A step that is not in the pipeline every worker folds with (`outbox pipeline show`)."""


def create_job(
    conn: AnyConnection,
    *,
    variants: int | Sequence[uuid.UUID] = 1,
    job_id: uuid.UUID | None = None,
    step: str | None = None,
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """Create a job and its variants, all ``queued``, with one event per variant.

    ``variants`` is a count (ids are generated) or the variant ids to use. ``step`` is the step the
    variants start at (None: not started). Returns ``(job_id, variant_ids)``.
    """
    if isinstance(variants, int):
        if variants < 1:
            raise ValueError(f"a job needs at least one variant (got {variants})")
        variant_ids = [uuid.uuid4() for _ in range(variants)]
    else:
        variant_ids = [_as_uuid(v, "variant id") for v in variants]
        if not variant_ids:
            raise ValueError("a job needs at least one variant")
    job_id = uuid.uuid4() if job_id is None else _as_uuid(job_id, "job id")
    VariantChanged(status=VariantStatus.QUEUED, step=step)  # validates step
    if step is not None:
        _check_step(conn, step)
    _execute(conn, _QUERIES["job_insert"], {"job_id": job_id, "step": step})
    _execute(conn, _QUERIES["variants_insert"], {"job_id": job_id, "step": step, "variant_ids": variant_ids})
    return job_id, variant_ids


def update_variant(
    conn: AnyConnection,
    variant_id: uuid.UUID | str,
    *,
    status: VariantStatus | str,
    step: str | None = None,
) -> None:
    """Set a variant's status (and step, when given); its event is appended in the same transaction.

    The UPDATE takes the variant's row lock, under which the event's version is assigned: the
    processor applies a variant's changes in the order they committed. A change to the same status
    and step writes no event. Raises ``pydantic.ValidationError`` for an invalid status or step and
    ``VariantNotFoundError`` for an unknown variant.
    """
    change = VariantChanged.model_validate({"status": status, "step": step})
    updated = _execute(
        conn,
        _QUERIES["variant_update"],
        {"variant_id": _as_uuid(variant_id, "variant id"), "status": change.status.value, "step": change.step},
    )
    if updated == 0:
        if change.step is not None:
            _check_step(conn, change.step)  # raises when the step is the reason
        raise VariantNotFoundError(f"no variant with id {variant_id}")


def _check_step(conn: AnyConnection, step: str) -> None:
    """Refuse a step the pipeline lacks: its job could not be folded (the worker would flag it)."""
    row = _fetch_one(conn, _QUERIES["pipeline_has_step"], {"step": step})
    if row is not None and not row[0]:
        steps = ", ".join(row[1] or [])
        raise UnknownStepError(
            f"step {step!r} is not in the pipeline ({steps}); change the pipeline with `outbox pipeline set`"
        )


def _as_uuid(value: uuid.UUID | str, what: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise ValueError(f"{what} must be a UUID (got {value!r})") from None


def _fetch_one(conn: AnyConnection, query: str, params: dict[str, Any]) -> Any:
    if isinstance(conn, psycopg.Connection):
        return conn.execute(query, params).fetchone()
    if isinstance(conn, SAConnection):
        return conn.exec_driver_sql(query, params).fetchone()
    raise TypeError(f"expected a SQLAlchemy or psycopg Connection, got {type(conn).__name__}")


def _execute(conn: AnyConnection, query: str, params: dict[str, Any]) -> int:
    """Run one statement (no result set) on either kind of connection; return the rows it changed."""
    if isinstance(conn, psycopg.Connection):
        # Checked first: the common case of a plain psycopg connection pays one isinstance.
        return conn.execute(query, params).rowcount
    if isinstance(conn, SAConnection):
        # exec_driver_sql hands the statement to the driver as is, inside SQLAlchemy's transaction;
        # psycopg and psycopg2 both take %(name)s parameters.
        return int(conn.exec_driver_sql(query, params).rowcount)
    raise TypeError(f"expected a SQLAlchemy or psycopg Connection, got {type(conn).__name__}")


def hold_job(
    conn: AnyConnection,
    job_id: uuid.UUID | str,
    *,
    status: VariantStatus | str,
    step: str | None = None,
    reason: str,
) -> None:
    """Set a job's state yourself (a support "cancel"), in the caller's transaction.

    The processor owns ``jobs.status`` and ``jobs.current_step``: a plain UPDATE of them is refused
    (it would be undone by the job's next event). A hold writes them and keeps the processor off the
    job until ``release_job``, which hands it back: the processor then folds it from its variants.
    """
    status = VariantStatus(status)
    if not reason:
        raise ValueError("a hold needs a reason")
    _fetch_one(
        conn,
        _QUERIES["job_hold"],
        {"job_id": _as_uuid(job_id, "job id"), "status": status.value, "step": step, "reason": reason},
    )


def release_job(conn: AnyConnection, job_id: uuid.UUID | str) -> bool:
    """Hand a held job back to the processor, which folds it from its variants again; False if it was not held."""
    row = _fetch_one(conn, _QUERIES["job_release"], {"job_id": _as_uuid(job_id, "job id")})
    return bool(row and row[0])
