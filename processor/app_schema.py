"""The application's tables as they are: the types of the columns the product reads and writes.

`jobs.status`, `jobs.current_step`, `jobs_variants.status` and `jobs_variants.current_step` may be
`text`, `varchar(n)`, an enum or a domain. The product writes them through four cast functions
(outbox_job_status, outbox_job_step, outbox_variant_status, outbox_variant_step), which `outbox
migrate` writes for the columns' actual types, and it reads them as text. Before anything is
changed, it checks that every status, and every step of the pipeline, fits each column: a value a
column would refuse at the processor's write would stop its batch for good, so it is refused up
front, with the column, its type and the value.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from outbox.limits import VariantStatus
from processor.errors import ConfigurationError
from processor.fold import Pipeline
from processor.store import Connection, catalog


@dataclass(frozen=True)
class Column:
    table: str
    column: str
    type: str  # as format_type() spells it, with its modifier: text, character varying(20), job_status
    type_name: str  # the type itself, qualified, without a modifier (bpchar, not "character")
    max_length: int | None  # of a character type with a length, through domains
    is_string: bool  # a string type (through domains): text is assigned to it as it is
    cast_function: str  # the product's function that casts text to it

    @property
    def cast_returns(self) -> str:
        """What the cast function returns. Text, for a string type: the column's assignment then checks
        the length (an explicit cast to varchar(n) would cut a longer value short) and a domain's
        constraints, and the function stays right when the column is widened or changes between
        string types. Any other type (an enum, a domain over one) itself: text is not assigned to it."""
        return "pg_catalog.text" if self.is_string else self.type_name

    @property
    def cast_body(self) -> str:
        return "SELECT p" if self.is_string else f"SELECT p::{self.type_name}"

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


def columns(conn: Connection) -> list[Column]:
    """The four columns, with their types (the tables exist: migration 0001 creates or adopts them)."""
    functions = {
        ("jobs", "status"): "outbox_job_status",
        ("jobs", "current_step"): "outbox_job_step",
        ("jobs_variants", "status"): "outbox_variant_status",
        ("jobs_variants", "current_step"): "outbox_variant_step",
    }
    return [
        Column(
            row.table_name,
            row.column_name,
            row.type,
            row.type_name,
            row.max_length,
            row.is_string,
            functions[(row.table_name, row.column_name)],
        )
        for row in catalog.app_column_types(conn)
    ]


def casts_to_write(conn: Connection, found: list[Column]) -> list[Column]:
    """The columns whose cast function is absent, or written for another type (a column's type changed)."""
    result = []
    for col in found:
        current = catalog.app_cast_function_get(conn, col.cast_function)
        if current is None or (current.returns, current.body) != (col.cast_returns, col.cast_body):
            result.append(col)
    return result


def write_casts(conn: Connection, found: list[Column]) -> list[Column]:
    """Make each cast function return its column's type; return the columns whose function changed.

    A function whose return type changes is dropped and created again (CREATE OR REPLACE cannot
    change it), with the same EXECUTE rights as before.
    """
    changed = casts_to_write(conn, found)
    for col in changed:
        current = catalog.app_cast_function_get(conn, col.cast_function)
        executors = None if current is None else current.executors
        catalog.app_cast_function_write(conn, col.cast_function, col.cast_returns, col.cast_body, executors)
    return changed


def cast_problems(conn: Connection) -> list[str]:
    """Cast functions that no longer fit their column (its type was changed after migrate)."""
    return [
        f"{col.name} is {col.type}, but {col.cast_function}() was written for another type: "
        "run `outbox migrate` to write it again"
        for col in casts_to_write(conn, columns(conn))
    ]


def check_values(conn: Connection, found: list[Column], pipeline: Pipeline) -> None:
    """Refuse (one line) a status or a pipeline step that a column cannot hold."""
    for col in found:
        values = [s.value for s in VariantStatus] if col.column == "status" else list(pipeline.steps)
        for value in values:
            if col.max_length is not None and len(value) > col.max_length:
                what = "status" if col.column == "status" else "pipeline step"
                raise ConfigurationError(
                    f"{col.name} ({col.type}) is too short for the {what} {value!r} ({len(value)} characters); "
                    "widen the column; nothing was changed"
                )
            try:
                with conn.transaction():  # a savepoint: a failed cast leaves the caller's transaction usable
                    # The column's own type (the cast functions may not exist yet: migrate --dry-run).
                    catalog.app_value_cast(conn, col.type_name, value)
            except psycopg.DataError as exc:
                what = "status" if col.column == "status" else "pipeline step"
                raise ConfigurationError(
                    f"{col.name} ({col.type}) cannot hold the {what} {value!r}: "
                    f"{str(exc).strip().splitlines()[0]}; widen or extend the column's type; nothing was changed"
                ) from None
            except psycopg.errors.CheckViolation as exc:
                raise ConfigurationError(
                    f"{col.name} ({col.type}) refuses {value!r}: {str(exc).strip().splitlines()[0]}; "
                    "nothing was changed"
                ) from None
