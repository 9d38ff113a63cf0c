"""Write jobs and variant changes, and so their events, in the caller's transaction.

These calls never commit: each change and its event (appended by the capture trigger that
``outbox migrate`` installs, the same one that captures plain SQL and ORM writers) commit or roll
back together with whatever else the caller's transaction does. What the API adds over plain SQL is
validation before anything is written: statuses and steps are checked against the event model and
the pipeline, ids and the application's own columns before the first statement.

Each call is written once, as an operation (outbox.connections): the sync functions here run it on
a sync connection, ``outbox.aio``'s on an asyncio one, so both check and write exactly the same.
Called inside an OpenTelemetry span, ``create_job`` and ``update_variant`` carry its trace context
into their events (outbox.tracing).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pydantic
from psycopg import sql

from outbox import tracing
from outbox.connections import Operation, Statement, run
from outbox.errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidEventError,
    UnknownStepError,
    VariantNotFoundError,
)
from outbox.events import VariantChanged, VariantStatus
from outbox.sqlfile import load_queries

_QUERIES = load_queries("outbox", "queries.sql")

# The columns create_job writes itself; ``columns=``/``variant_columns=`` are for the others.
_OWN_COLUMNS = {
    "jobs": ("job_id", "status", "current_step", "updated_at"),
    "jobs_variants": ("job_variants_id", "job_id", "status", "current_step", "updated_at"),
}


def create_job(
    conn: Any,
    *,
    variants: int | Sequence[uuid.UUID | str] = 1,
    job_id: uuid.UUID | str | None = None,
    step: str | None = None,
    columns: Mapping[str, Any] | None = None,
    variant_columns: Mapping[str, Any] | None = None,
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """Create a job and its variants, all ``queued``, with one event per variant.

    ``variants`` is a count (ids are generated) or the variant ids to use. ``step`` is the step the
    variants start at (None: not started). ``columns`` gives the job row's values for the
    application's own columns (``{"user_id": 42}``), ``variant_columns`` those of every variant row.
    Returns ``(job_id, variant_ids)``.

    ``conn``: a SQLAlchemy ``Connection`` or ``Session``, or a psycopg ``Connection``, in the
    transaction to write in (asyncio: ``outbox.aio.create_job``).
    """
    operation = create_job_operation(
        variants=variants, job_id=job_id, step=step, columns=columns, variant_columns=variant_columns
    )
    return run(conn, operation, call="create_job")


def update_variant(
    conn: Any,
    variant_id: uuid.UUID | str,
    *,
    status: VariantStatus | str,
    step: str | None = None,
) -> None:
    """Set a variant's status (and step, when given); its event is appended in the same transaction.

    The UPDATE takes the variant's row lock, under which the event's version is assigned: the
    processor applies a variant's changes in the order they committed. A change to the same status
    and step writes no event. Raises ``InvalidEventError`` (a ``pydantic.ValidationError``) for an
    invalid status or step, ``UnknownStepError`` for a step the pipeline lacks and
    ``VariantNotFoundError`` for an unknown variant, all of them ``outbox.OutboxError`` (outbox.errors).
    ``conn`` as for ``create_job`` (asyncio: ``outbox.aio.update_variant``).
    """
    run(conn, update_variant_operation(variant_id, status=status, step=step), call="update_variant")


def hold_job(
    conn: Any,
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
    run(conn, hold_job_operation(job_id, status=status, step=step, reason=reason), call="hold_job")


def release_job(conn: Any, job_id: uuid.UUID | str) -> bool:
    """Hand a held job back to the processor, which folds it from its variants again; False if it was not held."""
    return run(conn, release_job_operation(job_id), call="release_job")


# ----- the operations, shared with outbox.aio


def create_job_operation(
    *,
    variants: int | Sequence[uuid.UUID | str],
    job_id: uuid.UUID | str | None,
    step: str | None,
    columns: Mapping[str, Any] | None,
    variant_columns: Mapping[str, Any] | None,
) -> Operation[tuple[uuid.UUID, list[uuid.UUID]]]:
    if isinstance(variants, bool | str | bytes | float) or not isinstance(variants, int | Iterable):
        raise ArgumentTypeError(f"variants must be a count or a list of variant ids (got {type(variants).__name__})")
    if isinstance(variants, int):
        if variants < 1:
            raise InvalidArgumentError(f"a job needs at least one variant (got {variants})")
        variant_ids = [uuid.uuid4() for _ in range(variants)]
    else:
        variant_ids = [_as_uuid(v, "variant id") for v in variants]
        if not variant_ids:
            raise InvalidArgumentError("a job needs at least one variant")
        if len(set(variant_ids)) != len(variant_ids):
            raise InvalidArgumentError("the variant ids of a job must differ")
    job_uuid = uuid.uuid4() if job_id is None else _as_uuid(job_id, "job id")
    _event(VariantStatus.QUEUED, step)  # validates step
    job_values = _app_columns("jobs", columns)
    variant_values = _app_columns("jobs_variants", variant_columns)
    if step is not None:
        _check_step(step, (yield _pipeline_has_step(step)).first)
    params: dict[str, Any] = {
        "job_id": job_uuid,
        "step": step,
        "first_variant_id": variant_ids[0],
        "other_variant_ids": variant_ids[1:],
    }
    traceparent = tracing.current_traceparent()
    if traceparent is not None:  # the caller has a span: its context goes into the events (outbox.tracing)
        yield Statement(_QUERIES["trace_context_set"], {"traceparent": traceparent}, returns_rows=True)
    yield Statement(_job_create(params, job_values, variant_values), params)
    return job_uuid, variant_ids


def update_variant_operation(
    variant_id: uuid.UUID | str, *, status: VariantStatus | str, step: str | None
) -> Operation[None]:
    change = _event(status, step)
    params = {"variant_id": _as_uuid(variant_id, "variant id"), "status": change.status.value, "step": change.step}
    traceparent = tracing.current_traceparent()
    if traceparent is None:
        updated = yield Statement(_QUERIES["variant_update"], params)
    else:  # the caller has a span: the statement itself puts its context in the event (outbox.tracing)
        updated = yield Statement(_QUERIES["variant_update_traced"], {**params, "traceparent": traceparent})
    if updated.rowcount == 0:
        if change.step is not None:  # the step may be the reason: say so
            _check_step(change.step, (yield _pipeline_has_step(change.step)).first)
        raise VariantNotFoundError(f"no variant with id {variant_id}")


def hold_job_operation(
    job_id: uuid.UUID | str, *, status: VariantStatus | str, step: str | None, reason: str
) -> Operation[None]:
    status = _status(status)
    if not reason:
        raise InvalidArgumentError("a hold needs a reason")
    params = {"job_id": _as_uuid(job_id, "job id"), "status": status.value, "step": step, "reason": reason}
    yield Statement(_QUERIES["job_hold"], params, returns_rows=True)


def release_job_operation(job_id: uuid.UUID | str) -> Operation[bool]:
    released = yield Statement(_QUERIES["job_release"], {"job_id": _as_uuid(job_id, "job id")}, returns_rows=True)
    return bool(released.first and released.first[0])


def _event(status: VariantStatus | str, step: str | None) -> VariantChanged:
    """The change as the event model validates it; a refusal as the product's error, in pydantic's words."""
    try:
        return VariantChanged.model_validate({"status": status, "step": step})
    except pydantic.ValidationError as exc:
        raise InvalidEventError.of(exc) from None


def _status(status: VariantStatus | str) -> VariantStatus:
    try:
        return VariantStatus(status)
    except ValueError as exc:  # "'paused' is not a valid VariantStatus"
        raise InvalidArgumentError(str(exc)) from None


def _pipeline_has_step(step: str) -> Statement:
    return Statement(_QUERIES["pipeline_has_step"], {"step": step}, returns_rows=True)


def _check_step(step: str, found: tuple[Any, ...] | None) -> None:
    """Refuse a step the pipeline lacks: its job could not be folded (the worker would flag it)."""
    if found is not None and not found[0]:
        steps = ", ".join(found[1] or [])
        raise UnknownStepError(
            f"step {step!r} is not in the pipeline ({steps}); change the pipeline with `outbox pipeline set`"
        )


def _app_columns(table: str, values: Mapping[str, Any] | None) -> dict[str, Any]:
    """The application's own columns given for ``table``, checked: {quoted name: value}."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ArgumentTypeError(
            f"the {table} columns must be a mapping of column name to value (got {type(values).__name__})"
        )
    quoted = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"a {table} column name must be a non-empty string (got {name!r})")
        if name in _OWN_COLUMNS[table]:
            raise InvalidArgumentError(
                f"create_job writes {table}.{name} itself; pass only the application's own columns"
            )
        if "%" in name or ":" in name:  # they would read as parameters in the statement
            raise InvalidArgumentError(
                f"create_job cannot write the column {name!r} (its name has % or :); insert it with SQL"
            )
        quoted[sql.Identifier(name).as_string()] = value
    return quoted


def _job_create(params: dict[str, Any], job_values: dict[str, Any], variant_values: dict[str, Any]) -> str:
    """The job_create statement with the application's columns in its slots, their values in ``params``."""
    query = _QUERIES["job_create"]
    if not job_values and not variant_values:
        return query
    slots: dict[str, list[str]] = {"job columns": [], "job values": [], "variant columns": [], "variant values": []}
    for kind, values in (("job", job_values), ("variant", variant_values)):
        for name, value in values.items():
            key = f"app_{len(params)}"
            params[key] = value
            slots[f"{kind} columns"].append(f", {name}")
            slots[f"{kind} values"].append(f", %({key})s")
    slots["variant copies"] = [f", f.{name}" for name in variant_values]
    for slot, parts in slots.items():
        query = query.replace(f"/*{slot}*/", "".join(parts))
    return query


def _as_uuid(value: uuid.UUID | str, what: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise InvalidArgumentError(f"{what} must be a UUID (got {value!r})") from None
