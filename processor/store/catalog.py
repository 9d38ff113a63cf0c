"""The catalog: the application's tables and columns as they are, the product's triggers on them,
other triggers that might write job state, and the statements that repair them inside migrate."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql
from psycopg.rows import class_row, scalar_row

from outbox.sqlfile import load_queries
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "catalog.sql")


@dataclass(frozen=True, slots=True)
class AppTables:
    jobs: bool
    jobs_variants: bool


@dataclass(frozen=True, slots=True)
class ColumnType:
    """One of the four application columns the product reads and writes (processor/app_schema.py)."""

    table_name: str
    column_name: str
    type: str  # as format_type() spells it, with its modifier
    type_name: str  # the type itself, qualified, without a modifier
    max_length: int | None  # of a character type with a length, through domains
    is_string: bool  # a string type, through domains


@dataclass(frozen=True, slots=True)
class CastFunction:
    returns: str
    body: str
    executors: list[str]  # roles with EXECUTE ("-": PUBLIC)


@dataclass(frozen=True, slots=True)
class ProductTrigger:
    table_name: str
    trigger: str
    enabled: str  # pg_trigger.tgenabled: O, A fire; D, R do not


@dataclass(frozen=True, slots=True)
class AppTrigger:
    trigger: str
    function: str
    source: str | None
    arguments: list[str]


@dataclass(frozen=True, slots=True)
class AppFunction:
    function: str
    source: str | None


def app_tables_present(conn: Connection) -> AppTables:
    row = conn.cursor(row_factory=class_row(AppTables)).execute(QUERIES["app_tables_present"]).fetchone()
    assert row is not None
    return row


def app_job_id_index(conn: Connection) -> str | None:
    """The application's btree index that leads with jobs_variants.job_id, if any."""
    index = conn.cursor(row_factory=scalar_row).execute(QUERIES["app_job_id_index"]).fetchone()
    return None if index is None else str(index)


def app_variants_count(conn: Connection) -> int:
    """Variants with a job: the events the adoption backfill appends."""
    count = conn.cursor(row_factory=scalar_row).execute(QUERIES["app_variants_count"]).fetchone()
    return int(count or 0)


def app_column_types(conn: Connection) -> list[ColumnType]:
    return conn.cursor(row_factory=class_row(ColumnType)).execute(QUERIES["app_column_types"]).fetchall()


def app_cast_function_get(conn: Connection, name: str) -> CastFunction | None:
    """A cast function as it is (its body stripped of surrounding space); None if absent."""
    row = conn.cursor(row_factory=class_row(CastFunction)).execute(QUERIES["app_cast_function_get"], {"name": name})
    found = row.fetchone()
    if found is None:
        return None
    return CastFunction(found.returns, found.body.strip(), list(found.executors))


def app_cast_function_write(conn: Connection, name: str, returns: str, body: str, executors: list[str] | None) -> None:
    """Create the cast function ``name(text)`` again, returning ``returns``, keeping who may execute it.

    STABLE, not IMMUTABLE: a cast from text to an enum is stable, and an immutable function would be
    folded while a statement is planned, where an error has no context. Still inlined.
    """
    function = sql.Identifier(name)
    conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}(text)").format(function))
    conn.execute(
        sql.SQL("CREATE FUNCTION {}(p text) RETURNS {} LANGUAGE sql STABLE PARALLEL SAFE AS {}").format(
            function, sql.SQL(returns), sql.Literal(body)
        )
    )
    if executors is not None:
        conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {}(text) FROM PUBLIC").format(function))
        for grantee in executors:
            target = sql.SQL("PUBLIC") if grantee == "-" else sql.Identifier(grantee)
            conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {}(text) TO {}").format(function, target))


def app_value_cast(conn: Connection, type_name: str, value: str) -> None:
    """Cast ``value`` to the column type ``type_name``: raises the driver's error if the type refuses it."""
    conn.execute(sql.SQL("SELECT %s::text::{}").format(sql.SQL(type_name)), [value])


def product_triggers_get(conn: Connection) -> list[ProductTrigger]:
    return conn.cursor(row_factory=class_row(ProductTrigger)).execute(QUERIES["product_triggers_get"]).fetchall()


def product_trigger_create(conn: Connection, trigger: str) -> None:
    """Create one of the product's triggers as schema.sql does."""
    conn.execute(QUERIES[f"trigger_create_{trigger}"])


def trigger_enable(conn: Connection, table: str, trigger: str) -> None:
    conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER {}").format(sql.Identifier(table), sql.Identifier(trigger)))


def trigger_drop(conn: Connection, table: str, trigger: str) -> None:
    conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(trigger), sql.Identifier(table)))


def app_triggers_get(conn: Connection) -> list[AppTrigger]:
    """Triggers on jobs_variants other than the product's, with their function's text and arguments."""
    return conn.cursor(row_factory=class_row(AppTrigger)).execute(QUERIES["app_triggers_get"]).fetchall()


def app_functions_get(conn: Connection, parts: list[str]) -> list[AppFunction]:
    """The functions a (qualified) name resolves to, the system's and the product's left out."""
    cursor = conn.cursor(row_factory=class_row(AppFunction))
    return cursor.execute(QUERIES["app_functions_get"], {"parts": parts}).fetchall()


def relation_is_jobs(conn: Connection, parts: list[str]) -> bool:
    """Whether a (qualified) name is the jobs table, or a view over it."""
    return bool(conn.cursor(row_factory=scalar_row).execute(QUERIES["relation_is_jobs"], {"parts": parts}).fetchone())
