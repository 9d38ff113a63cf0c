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
from psycopg import sql

from outbox.events import VariantStatus
from processor.errors import ConfigurationError
from processor.fold import Pipeline
from processor.store import QUERIES, Connection


@dataclass(frozen=True)
class Column:
    table: str
    column: str
    type: str  # as format_type() spells it, with its modifier: text, character varying(20), job_status
    base_type: str  # the same without the modifier: what the cast function returns
    max_length: int | None  # of a character type with a length
    cast_function: str  # the product's function that casts text to it

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


def columns(conn: Connection) -> list[Column]:
    """The four columns, with their types (the tables exist: migration 0001 creates or adopts them)."""
    rows = conn.execute(QUERIES["app_column_types"]).fetchall()
    functions = {
        ("jobs", "status"): "outbox_job_status",
        ("jobs", "current_step"): "outbox_job_step",
        ("jobs_variants", "status"): "outbox_variant_status",
        ("jobs_variants", "current_step"): "outbox_variant_step",
    }
    return [Column(t, c, type_, base, length, functions[(t, c)]) for t, c, type_, base, length in rows]


def write_casts(conn: Connection, found: list[Column]) -> list[Column]:
    """Make each cast function return its column's type; return the columns whose function changed.

    A function whose return type changes is dropped and created again (CREATE OR REPLACE cannot
    change it), with the same EXECUTE rights as before.
    """
    changed = []
    for col in found:
        row = conn.execute(QUERIES["app_cast_function_get"], {"name": col.cast_function}).fetchone()
        if row is not None and row[0] == col.base_type:
            continue
        grantees = list(row[1]) if row is not None else []
        function = sql.Identifier(col.cast_function)
        # format_type()'s output: a type name PostgreSQL itself quoted. Without its length: an explicit
        # cast to varchar(n) would cut a longer value short, where the assignment refuses it.
        type_ = sql.SQL(col.base_type)
        conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}(text)").format(function))
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION {}(p text) RETURNS {} LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT p::{} $$"
            ).format(function, type_, type_)
        )
        if row is not None:
            conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {}(text) FROM PUBLIC").format(function))
            for grantee in grantees:
                target = sql.SQL("PUBLIC") if grantee == "-" else sql.Identifier(grantee)
                conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {}(text) TO {}").format(function, target))
        changed.append(col)
    return changed


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
                    conn.execute(sql.SQL("SELECT %s::text::{}").format(sql.SQL(col.base_type)), [value])
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
