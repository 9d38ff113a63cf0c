"""Install and upgrade the product's schema: versioned, forward-only, idempotent.

`outbox migrate` applies the numbered files of schema/migrations/ (the only install path;
schema/schema.sql is the same schema in one readable file, kept equal by a test). A worker runs on a
database whose schema is at least its own version (its own package's newest migration) and still
serves it: each migration from 0014 on declares, in a header line ``-- Serves workers from: N``, the
oldest worker version it keeps working for (decision 0013), so that a migration need not stop the
workers already running (a rolling upgrade); no later migration re-admits a worker an earlier one
stopped serving.
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import psycopg

from processor import app_schema, fold_config, schema_check, store
from processor.errors import ConfigurationError, SchemaError
from processor.fold import FailurePolicy, Pipeline
from processor.store import Connection, catalog
from processor.store import migrations as schema_store
from processor.store.checkpoint import checkpoints_lock_all

# The pipeline a new database gets when no OUTBOX_PIPELINE_STEPS is given and jobs_variants uses no
# other step (an empty database, the demo's embedded one).
DEFAULT_PIPELINE = Pipeline(("ingest", "preprocess", "inference", "iou_eval"))

_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
_SERVES_WORKERS_FROM = re.compile(r"^-- Serves workers from: (\d+)\s*$", re.MULTILINE)
_PREPARE_STEP = re.compile(r"^-- step:.*$", re.MULTILINE)
_PREPARE_WHEN = re.compile(r"^-- when:.*$", re.MULTILINE)
# A prepare step waits this long for a lock before it gives up (and migrate with it): behind a lock
# request that waits, every writer waits too.
PREPARE_LOCK_TIMEOUT = "5s"


class LegacyTriggerPolicy(StrEnum):
    """What migrate does with a legacy trigger that writes job state.

    docs/operations.md, "Adopting it on an existing database".
    """

    REPLACE = "replace"  # drop it and say so: the processor owns job state from the commit on
    REFUSE = "refuse"  # change nothing and say how to allow it (an unattended migrate, docker compose)


def legacy_refusal(legacy: list[schema_check.LegacyTrigger]) -> str:
    """Why migrate refuses to drop ``legacy`` under LegacyTriggerPolicy.REFUSE, and what allows it."""
    found = ", ".join(f"{trigger.trigger} ({trigger.how})" for trigger in legacy)
    what = f"trigger {found} on jobs_variants writes job state and is"
    if len(legacy) > 1:
        what = f"triggers {found} on jobs_variants write job state and are"
    return (
        f"the legacy {what} kept (OUTBOX_LEGACY_TRIGGER=refuse): set OUTBOX_LEGACY_TRIGGER=replace "
        "(or --legacy-trigger replace) to let migrate drop it; nothing was changed"
    )


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def summary(self) -> str:
        """The first paragraph of the migration's header comment, without its "NNNN:" label."""
        lines: list[str] = []
        for line in self.sql().splitlines():
            text = line.lstrip("-").strip() if line.startswith("--") else None
            if not text:
                if lines or text is None:
                    break
                continue
            lines.append(text)
        summary = re.sub(r"^\d{4}:\s*", "", " ".join(lines))
        return summary or self.name

    def serves_workers_from(self) -> int | None:
        """The oldest worker version this migration still serves (its header line), None when it declares
        none: then only workers of its own version (as every migration before 0014)."""
        match = _SERVES_WORKERS_FROM.search(self.sql())
        return int(match.group(1)) if match else None

    def prepare_steps(self) -> tuple[str | None, list[str]]:
        """``NNNN_name.prepare.sql``, if the migration has one: the query that says whether its steps
        are to run (None: always), and the steps, run before its transaction, each in its own, while
        writers write (see ``prepare``)."""
        path = self.path.with_suffix(".prepare.sql")
        if not path.exists():
            return None, []
        header, *parts = _PREPARE_STEP.split(path.read_text(encoding="utf-8"))
        when = _PREPARE_WHEN.split(header)
        return (when[1].strip() if len(when) > 1 else None), [part.strip() for part in parts if part.strip()]

    def creates_triggers(self) -> set[str]:
        return set(re.findall(r"^CREATE TRIGGER (\w+)", self.sql(), re.MULTILINE | re.IGNORECASE))


@dataclass
class MigrateReport:
    applied: list[Migration] = field(default_factory=list)
    already_applied: int = 0
    removed_triggers: list[schema_check.LegacyTrigger] = field(default_factory=list)
    restored_triggers: list[schema_check.TriggerProblem] = field(default_factory=list)
    config_set: fold_config.FoldConfig | None = None  # the fold configuration, when this run set it


def schema_dir() -> Path:
    """Where this code's own schema/ is: inside the package in a wheel, else at the top of a source
    checkout. Never configurable: its newest migration is the worker's version (latest_version)."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "schema", package_dir.parent / "schema"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise SchemaError(f"schema/migrations not found next to {package_dir}; is the package installed whole?")


def migrations() -> list[Migration]:
    found = []
    for path in sorted((schema_dir() / "migrations").iterdir()):
        match = _MIGRATION_FILE.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


@functools.cache
def latest_version() -> int:
    """This code's schema version: the worker's version, for the window of schema versions (the
    newest migration its own package ships, so that no setting can make a worker claim another)."""
    return len(migrations())


def migrate(
    conn: Connection,
    *,
    pipeline: Pipeline | None = None,
    policy: FailurePolicy | None = None,
    legacy_policy: LegacyTriggerPolicy = LegacyTriggerPolicy.REPLACE,
) -> MigrateReport:
    """Apply the missing migrations, set the fold configuration the first time, and remove legacy
    job-state triggers, in one transaction: a refusal changes nothing.

    ``pipeline`` and ``policy`` (OUTBOX_PIPELINE_STEPS, OUTBOX_FAILURE_POLICY) are what a database
    without a configuration gets (None: the default pipeline, if every step jobs_variants uses is
    in it; settled); on a database that has one, they must match it. ``legacy_policy`` REFUSE
    raises SchemaError, changing nothing, where a legacy trigger would be dropped.
    """
    report = MigrateReport()
    # An idle connection runs in autocommit meanwhile, so that the prepare steps can run and the
    # session lock below opens no transaction of its own (conn.transaction() then makes one).
    switch = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE and not conn.autocommit
    if switch:
        conn.autocommit = True
    try:
        # The lock for the session, around the prepare steps and the transaction: a second migrate
        # waits for the first's commit, then finds nothing left to do.
        schema_store.migrations_session_lock(conn)
        try:
            prepare(conn)
            _migrate_in_one_transaction(conn, report, pipeline, policy, legacy_policy)
        finally:
            with contextlib.suppress(psycopg.Error):  # a lost session has lost its lock too
                schema_store.migrations_session_unlock(conn)
    finally:
        if switch:
            conn.autocommit = False
    return report


def _migrate_in_one_transaction(
    conn: Connection,
    report: MigrateReport,
    pipeline: Pipeline | None,
    policy: FailurePolicy | None,
    legacy_policy: LegacyTriggerPolicy,
) -> None:
    with conn.transaction():
        schema_store.migrations_lock(conn)
        schema_store.migrations_table_create(conn)
        done = schema_store.migrations_applied(conn)
        report.already_applied = len(done)
        for migration in migrations():
            if migration.version in done:
                continue
            schema_store.migration_apply(conn, migration.sql())
            schema_store.migration_record(conn, migration.version, migration.name, migration.serves_workers_from())
            report.applied.append(migration)
        # The application's column types: the casts the product writes them through, and whether
        # every status and step fits (refused before anything is committed).
        columns = app_schema.columns(conn)
        app_schema.write_casts(conn, columns)
        report.config_set = _set_fold_config(conn, pipeline, policy)
        app_schema.check_values(conn, columns, fold_config.load(conn).pipeline)
        # The product's triggers, as they must be (put back if dropped, enabled if disabled).
        report.restored_triggers = schema_check.restore_triggers(conn)
        # Two writers of job state must not coexist: the legacy trigger is what lost updates.
        # Checked on every migrate, in case one was put back.
        report.removed_triggers = schema_check.legacy_triggers(conn)
        if report.removed_triggers and legacy_policy is LegacyTriggerPolicy.REFUSE:
            raise SchemaError(legacy_refusal(report.removed_triggers))  # rolls everything back
        schema_check.drop_legacy(conn, report.removed_triggers)


def prepare(conn: Connection) -> list[Migration]:
    """Run the prepare steps of the next migration, when it is the only one missing.

    Some migrations would hold the writers back for as long as they read or index a whole table
    (0015 turns the populated outbox into a partitioned one). Their slow, concurrent-safe part is a
    separate file of steps (a column with a constant default, a CHECK validated while writers
    write, CREATE INDEX CONCURRENTLY), each idempotent and run in its own transaction, so that what
    the migration then does under the writers' lock reads no row. Only on a database one migration
    behind and on an idle connection: with several migrations missing (a new install, an old
    database) the migration does the same work itself, in its transaction. Two migrates take turns
    (the migrations lock, held for the session). Returns the migrations prepared.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return []
    autocommit = conn.autocommit
    conn.autocommit = True  # CREATE INDEX CONCURRENTLY runs in no transaction block (switched while idle)
    try:
        schema_store.migrations_session_lock(conn)
        try:
            return _prepare_steps_run(conn)
        finally:
            schema_store.migrations_session_unlock(conn)
    finally:
        conn.autocommit = autocommit


def _prepare_steps_run(conn: Connection) -> list[Migration]:
    if not schema_store.migrations_table_exists(conn):
        return []
    done = schema_store.migrations_applied(conn)
    missing = [m for m in migrations() if m.version not in done]
    if len(missing) != 1:
        return []
    when, steps = missing[0].prepare_steps()
    if not steps or (when is not None and not schema_store.prepare_wanted(conn, when)):
        return []
    schema_store.lock_timeout_set(conn, PREPARE_LOCK_TIMEOUT)
    try:
        for step in steps:
            schema_store.migration_apply(conn, step)
    except psycopg.errors.LockNotAvailable as exc:
        raise SchemaError(
            f"migration {missing[0].version:04d} could not prepare: it waited more than {PREPARE_LOCK_TIMEOUT} for a "
            "lock, or for the transactions open in the database to end (CREATE INDEX CONCURRENTLY waits for every "
            "snapshot older than itself); end the long transaction and run migrate again"
        ) from exc
    finally:
        schema_store.lock_timeout_reset(conn)
    return missing


@dataclass
class MigratePlan:
    """What `outbox migrate` would do, read without changing anything (`outbox migrate --dry-run`)."""

    migrations: list[Migration] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # one line each, in order
    refusal: str | None = None  # why migrate would refuse, changing nothing


def plan(
    conn: Connection,
    *,
    pipeline: Pipeline | None = None,
    policy: FailurePolicy | None = None,
    legacy_policy: LegacyTriggerPolicy = LegacyTriggerPolicy.REPLACE,
) -> MigratePlan:
    """Read what `migrate` would do, in a read-only transaction: nothing is written or locked for writers."""
    result = MigratePlan()
    with store.one_snapshot(conn):
        done: set[int] = set()
        if schema_store.migrations_table_exists(conn):
            done = schema_store.migrations_applied(conn)
        result.migrations = [m for m in migrations() if m.version not in done]
        tables = catalog.app_tables_present(conn)
        if 1 not in done:
            _plan_adoption(conn, tables, result)
        for migration in result.migrations:
            result.steps.append(f"apply migration {migration.version:04d}_{migration.name}: {migration.summary()}")
        if tables.jobs and tables.jobs_variants:
            columns = app_schema.columns(conn)
            result.steps.append("column types: " + ", ".join(f"{c.name} {c.type}" for c in columns))
            _plan_fold_config(conn, columns, done, pipeline, policy, result)
            for col in app_schema.casts_to_write(conn, columns):
                if not col.is_string or 10 in done:  # 0010 writes those of string types
                    result.steps.append(f"write {col.cast_function}() for {col.name} ({col.type})")
        if done:
            _plan_trigger_restores(conn, result)
        if tables.jobs_variants:
            _plan_legacy_triggers(conn, legacy_policy, result)
        if not result.steps and not result.migrations:
            result.steps.append("nothing: the database is up to date")
    return result


def _plan_adoption(conn: Connection, tables: catalog.AppTables, result: MigratePlan) -> None:
    """A first migrate: the application's tables adopted or created, their index, the initial events."""
    for table, present in (("jobs", tables.jobs), ("jobs_variants", tables.jobs_variants)):
        result.steps.append(f"{'adopt' if present else 'create'} table {table} (its columns and rows kept)")
    index = catalog.app_job_id_index(conn) if tables.jobs_variants else None
    result.steps.append(
        f"use the existing index {index} on jobs_variants (job_id)"
        if index
        else "create index outbox_jobs_variants_job_id_idx on jobs_variants (job_id) (writers of "
        "jobs_variants wait while it is built: on a large table, create it CONCURRENTLY first)"
    )
    variants = catalog.app_variants_count(conn) if tables.jobs_variants else 0
    result.steps.append(
        f"append {variants} events, one per variant with a job, so that the first "
        "run folds every existing job (repairing the stuck ones)"
    )


def _plan_fold_config(
    conn: Connection,
    columns: list[app_schema.Column],
    done: set[int],
    pipeline: Pipeline | None,
    policy: FailurePolicy | None,
    result: MigratePlan,
) -> None:
    """The fold configuration migrate would set or keep, or why it refuses (result.refusal)."""
    try:
        current = fold_config.load(conn) if 9 in done else None
    except SchemaError:
        current = None
    try:
        if current is None:
            chosen = pipeline or DEFAULT_PIPELINE
            outside = fold_config.steps_outside(conn, chosen)
            if outside:
                raise ConfigurationError(
                    f"jobs_variants uses steps that the pipeline {','.join(chosen.steps)} lacks: "
                    f"{fold_config.describe_outside(outside)}; set OUTBOX_PIPELINE_STEPS to every step"
                )
            result.steps.append(
                f"set the pipeline to {','.join(chosen.steps)} and the failure policy to "
                f"{(policy or FailurePolicy.SETTLED).value}"
            )
        else:
            fold_config.check_setting(current, pipeline.steps if pipeline else None, policy)
            chosen = current.pipeline
            result.steps.append(f"keep {current.describe()}")
        app_schema.check_values(conn, columns, chosen)
    except ConfigurationError as exc:
        result.refusal = str(exc)


def _plan_trigger_restores(conn: Connection, result: MigratePlan) -> None:
    """The product's triggers found missing or disabled, but those a pending migration creates anyway."""
    created = set().union(*(m.creates_triggers() for m in result.migrations))
    for problem in schema_check.trigger_problems(conn):
        if problem.trigger not in created:
            result.steps.append(f"restore trigger {problem.trigger} on {problem.table} (it is {problem.state})")


def _plan_legacy_triggers(conn: Connection, legacy_policy: LegacyTriggerPolicy, result: MigratePlan) -> None:
    """The legacy triggers that write job state: dropped, or (REFUSE) the reason migrate stops."""
    found = schema_check.legacy_triggers(conn)
    for legacy in found:
        result.steps.append(
            f"drop legacy trigger {legacy.trigger} on jobs_variants ({legacy.how}; its function is kept): "
            "two writers of job state must not coexist"
        )
    if found and legacy_policy is LegacyTriggerPolicy.REFUSE and result.refusal is None:
        result.refusal = legacy_refusal(found)


def _set_fold_config(
    conn: Connection, pipeline: Pipeline | None, policy: FailurePolicy | None
) -> fold_config.FoldConfig | None:
    """Set the fold configuration when the database has none; check it against the given one otherwise."""
    try:
        current = fold_config.load(conn)
    except SchemaError:
        current = None
    if current is not None:
        fold_config.check_setting(current, pipeline.steps if pipeline else None, policy)
        return None
    chosen = pipeline or DEFAULT_PIPELINE
    outside = fold_config.steps_outside(conn, chosen)
    if outside:
        source = "OUTBOX_PIPELINE_STEPS" if pipeline else f"the default pipeline ({','.join(chosen.steps)})"
        raise ConfigurationError(
            f"jobs_variants uses steps that {source} lacks: {fold_config.describe_outside(outside)}; set "
            "OUTBOX_PIPELINE_STEPS to every step, in order, the last one final; nothing was changed"
        )
    checkpoints_lock_all(conn)
    fold_config.store_config(conn, chosen, policy or FailurePolicy.SETTLED, refold=False)
    return fold_config.load(conn)


def schema_refusal(version: int, serves_workers_from: int, worker: int) -> str | None:
    """Why a worker of version ``worker`` cannot run on a schema at ``version`` that serves workers from
    ``serves_workers_from`` on (one line, saying what to upgrade); None when it can.

    The window: the schema must have every migration the worker knows (its SQL calls what they
    create), and must still serve it (a newer migration keeps the versioned functions that older
    workers call for as long as it declares it serves them). ``serves_workers_from`` is the highest
    any applied migration declares (store.migrations.migrations_state): a later migration cannot
    re-admit a worker an earlier one stopped serving. Checked at start-up (check_ready) and every
    standby interval (check_window), so a worker still connected across a migration that no longer
    serves it stops with this line rather than on a missing function.
    """
    if version < worker:
        return f"the outbox schema is at version {version}, this worker needs {worker}: run `outbox migrate`"
    if serves_workers_from > worker:
        return (
            f"the outbox schema is at version {version}, newer than this worker knows ({worker}), and serves "
            f"workers of version {serves_workers_from} and newer: upgrade the worker"
        )
    return None


def check_ready(conn: Connection) -> None:
    """Refuse to process on a database that is not migrated, does not serve this worker's version, or
    still has a legacy trigger."""
    if not schema_store.migrations_table_exists(conn):
        raise SchemaError("the database has no outbox schema: run `outbox migrate` first")
    check_window(conn)
    fold_config.load(conn)  # refuses a database without a pipeline
    legacy = schema_check.legacy_triggers(conn)
    if legacy:
        raise SchemaError("; ".join(trigger.describe() for trigger in legacy))


def check_window(conn: Connection) -> None:
    """Raise SchemaError (one line, saying what to upgrade) when the schema does not serve this worker's
    version (schema_refusal)."""
    state = schema_store.migrations_state(conn)
    refusal = schema_refusal(state.version, state.serves_workers_from, latest_version())
    if refusal is not None:
        raise SchemaError(refusal)
