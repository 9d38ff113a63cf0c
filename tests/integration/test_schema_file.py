"""schema/schema.sql is the schema the migrations build, object for object.

Two databases on the same application tables: one built by `outbox migrate` from the migrations
(the only install path), one by schema/schema.sql followed by `outbox migrate` (which then applies
no migration, as schema.sql records them all, and writes what depends on the application: the cast
functions and the fold configuration). Their catalogs are compared item by item (columns, constraints,
indexes, sequences, functions as pg_get_functiondef prints them, triggers and whether they fire,
views, owners and grants after schema/roles.sql, the seeded rows and the recorded migrations); the
assertion names every item that differs, with both sides.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from processor.database import DatabaseUrl, connect
from processor.fold import Pipeline
from processor.migrate import migrate, schema_dir
from tests.fix_database import TEST_STEPS, create_database, drop_database

ROLES_SQL = schema_dir() / "roles.sql"
SCHEMA_SQL = schema_dir() / "schema.sql"

# The application's tables as a team might already have them (the adoption path): types of their
# own, an index on job_id under another name, a column the product does not know.
ADOPTED_TABLES = """
CREATE TYPE job_status AS ENUM ('queued', 'running', 'done', 'failed', 'cancelled');
CREATE DOMAIN step_name AS varchar(64) CHECK (VALUE <> '');
CREATE TABLE jobs (job_id uuid PRIMARY KEY, status job_status, current_step step_name, updated_at timestamptz);
CREATE TABLE jobs_variants (
    job_variants_id uuid PRIMARY KEY,
    job_id uuid REFERENCES jobs,
    status varchar(20),
    current_step text,
    updated_at timestamptz,
    payload text
);
CREATE INDEX app_variants_by_job ON jobs_variants (job_id, updated_at);
"""

# Each item: (kind, name) -> its definition. One query per kind, each on the product's objects and
# the application tables it installs triggers and an index on.
_CATALOG: dict[str, str] = {
    "column": """
        SELECT c.relname || '.' || a.attname,
               format('#%s %s%s%s%s%s', rank() OVER (PARTITION BY c.oid ORDER BY a.attnum),
                      format_type(a.atttypid, a.atttypmod),
                      CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END,
                      coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), ''),
                      CASE a.attidentity WHEN 'a' THEN ' IDENTITY ALWAYS' WHEN 'd' THEN ' IDENTITY BY DEFAULT'
                           ELSE '' END,
                      coalesce(' acl=' || (SELECT array_agg(x ORDER BY x::text) FROM unnest(a.attacl) AS x)::text, ''))
        FROM pg_attribute AS a
        JOIN pg_class AS c ON c.oid = a.attrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'p') AND a.attnum > 0 AND NOT a.attisdropped
    """,
    "relation": """
        SELECT c.relname, format('%s owner=%s options=%s acl=%s', c.relkind, pg_get_userbyid(c.relowner),
                                 c.reloptions, (SELECT array_agg(x ORDER BY x::text) FROM unnest(c.relacl) AS x))
        FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'p', 'S')
    """,
    "constraint": """
        SELECT c.relname || '.' || k.conname, pg_get_constraintdef(k.oid)
        FROM pg_constraint AS k JOIN pg_class AS c ON c.oid = k.conrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public'
    """,
    "index": """
        SELECT i.relname, pg_get_indexdef(i.oid)
        FROM pg_index AS x JOIN pg_class AS i ON i.oid = x.indexrelid
        JOIN pg_namespace AS n ON n.oid = i.relnamespace
        WHERE n.nspname = 'public'
    """,
    "sequence": """
        SELECT c.relname, format('%s start %s increment %s min %s max %s cache %s cycle %s',
                                 format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
                                 s.seqcache, s.seqcycle)
        FROM pg_sequence AS s JOIN pg_class AS c ON c.oid = s.seqrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public'
    """,
    "function": """
        SELECT p.oid::regprocedure::text,
               format(E'owner=%s acl=%s\n%s', pg_get_userbyid(p.proowner),
                      (SELECT array_agg(x ORDER BY x::text) FROM unnest(p.proacl) AS x), pg_get_functiondef(p.oid))
        FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.prokind IN ('f', 'p')
    """,
    "trigger": """
        SELECT c.relname || '.' || t.tgname, format('enabled=%s %s', t.tgenabled, pg_get_triggerdef(t.oid))
        FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND NOT t.tgisinternal
    """,
    "view": """
        SELECT c.relname, pg_get_viewdef(c.oid)
        FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('v', 'm')
    """,
    "type": """
        SELECT t.typname, format('%s %s', t.typtype, format_type(t.oid, NULL))
        FROM pg_type AS t JOIN pg_namespace AS n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'c')
          AND NOT EXISTS (SELECT FROM pg_class AS c WHERE c.oid = t.typrelid AND c.relkind <> 'c')
    """,
    # The rows the schema seeds, and the migrations it records (applied_at aside).
    "row": """
        SELECT 'outbox_schema_migrations ' || version, name FROM outbox_schema_migrations
        UNION ALL
        SELECT 'outbox_checkpoints ' || partition,
               format('%s %s %s %s fold_config_version=%s', done_snapshot, target_snapshot, last_txid, last_event_id,
                      fold_config_version)
        FROM outbox_checkpoints
        UNION ALL
        SELECT 'outbox_partitioning', partitions::text FROM outbox_partitioning
        UNION ALL
        SELECT 'outbox_fold_config', format('%s %s version=%s', pipeline_steps, failure_policy, version)
        FROM outbox_fold_config
        UNION ALL
        SELECT format('outbox_segments %s %s', relation, segment),
               CASE WHEN opened_at IS NULL THEN 'free' WHEN closed_at IS NULL THEN 'current' ELSE 'closed' END
        FROM outbox_segments
    """,
}


def catalog(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], str]:
    """Every item of the product's schema, by (kind, name)."""
    items: dict[tuple[str, str], str] = {}
    for kind, query in _CATALOG.items():
        for name, definition in conn.execute(query).fetchall():
            items[(kind, name)] = definition
    return items


def catalog_diff(from_migrations: dict[tuple[str, str], str], from_file: dict[tuple[str, str], str]) -> list[str]:
    """One readable paragraph per item that differs (empty: the same schema)."""
    differences = []
    for key in sorted(from_migrations.keys() | from_file.keys()):
        kind, name = key
        left, right = from_migrations.get(key), from_file.get(key)
        if left == right:
            continue
        if right is None:
            differences.append(f"{kind} {name}: only the migrations build it:\n    {left}")
        elif left is None:
            differences.append(f"{kind} {name}: only schema.sql builds it:\n    {right}")
        elif "\n" in left or "\n" in right:  # a function: the lines that differ
            lines = difflib.unified_diff(left.splitlines(), right.splitlines(), "migrations", "schema.sql", lineterm="")
            differences.append(f"{kind} {name} differs:\n" + "\n".join(f"    {line}" for line in lines))
        else:
            differences.append(f"{kind} {name} differs:\n  migrations: {left}\n  schema.sql: {right}")
    return differences


def _build(database: DatabaseUrl, app_tables: str, install: Callable[[psycopg.Connection[Any]], None]) -> dict:
    with connect(database, application_name="outbox-tests") as conn:
        if app_tables:
            conn.execute(app_tables.encode())
            conn.commit()
        install(conn)
        migrate(conn, pipeline=Pipeline(TEST_STEPS))  # after schema.sql: the application-dependent part only
        conn.commit()
        conn.execute(ROLES_SQL.read_bytes())
        conn.commit()
        return catalog(conn)


def _schema_file(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute(SCHEMA_SQL.read_bytes())


@pytest.mark.parametrize("app_tables", ["", ADOPTED_TABLES], ids=["tables-created", "tables-adopted"])
def test_schema_sql_builds_the_catalog_the_migrations_build(server_url, app_tables):
    case = "adopted" if app_tables else "created"
    names = [f"outbox_schema_{kind}_{case}_{os.getpid()}" for kind in ("migrations", "file")]
    for name in names:
        drop_database(server_url, name)
    try:
        from_migrations = _build(create_database(server_url, names[0]), app_tables, lambda conn: None)
        from_file = _build(create_database(server_url, names[1]), app_tables, _schema_file)
    finally:
        for name in names:
            drop_database(server_url, name)
    assert from_migrations, "the catalog query found nothing"
    differences = catalog_diff(from_migrations, from_file)
    assert not differences, "schema/schema.sql differs from the migrations:\n" + "\n".join(differences)


def test_the_diff_names_what_differs():
    """The assertion's words, for a column, a function and a missing index."""
    left = {("column", "t.a"): "#1 text", ("function", "f()"): "body 1", ("index", "i"): "CREATE INDEX i"}
    right = {("column", "t.a"): "#1 integer", ("function", "f()"): "body 1"}
    assert catalog_diff(left, right) == [
        "column t.a differs:\n  migrations: #1 text\n  schema.sql: #1 integer",
        "index i: only the migrations build it:\n    CREATE INDEX i",
    ]


def test_schema_sql_records_the_latest_migration():
    from processor.migrate import migrations

    text = Path(SCHEMA_SQL).read_text(encoding="utf-8")
    latest = migrations()[-1]
    assert f"({latest.version}, '{latest.name}')" in text, "schema.sql must record every migration it equals"
