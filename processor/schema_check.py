"""Is the product's part of the schema in place, and is anything else writing job state?

Three kinds of problem, all checked by `outbox migrate` (which repairs them), by `outbox check`,
and by every running worker once per standby interval (it logs each problem once, answers 503 on
/health and sets a metric while one lasts):

- a trigger of the product missing or disabled (`ALTER TABLE ... DISABLE TRIGGER`, `DROP
  TRIGGER`): without the capture triggers, changes of variants are not captured and their jobs go
  stale; without the guard, job state can be written behind the processor;
- a legacy writer of job state: a trigger on jobs_variants whose function, or a function it calls,
  writes jobs.status or jobs.current_step (in any form: `UPDATE [ONLY] [schema.]jobs` or a view over
  it, with comments in between, `INSERT ... ON CONFLICT DO UPDATE`, `MERGE`, dynamic SQL). Two
  writers of job state must not coexist: that is the bug this product replaces. (The guard refuses
  their writes at once anyway; this finds them before they fail.);
- a cast function that no longer fits its column's type (processor/app_schema.py): the column's type
  was changed after `outbox migrate` wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass

from processor import app_schema, sql_scan
from processor.store import Connection, catalog

# The product's triggers: (table, trigger). The NOTIFY wake-up trigger is optional (migrate --wakeup).
PRODUCT_TRIGGERS = (
    ("jobs_variants", "outbox_capture_variant_insert_delete"),
    ("jobs_variants", "outbox_capture_variant_update"),
    ("jobs", "outbox_guard_job_state"),
)

# The triggers that capture the changes of variants: without them no event is written.
CAPTURE_TRIGGERS = tuple(trigger for table, trigger in PRODUCT_TRIGGERS if table == "jobs_variants")

JOB_STATE_COLUMNS = frozenset({"status", "current_step"})
_DEPTH = 4  # how deep calls are followed


@dataclass(frozen=True)
class TriggerProblem:
    table: str
    trigger: str
    state: str  # "missing" or "disabled"

    def describe(self) -> str:
        what = "captures the changes of variants" if self.table == "jobs_variants" else "guards job state"
        return f"trigger {self.trigger} on {self.table} is {self.state} (it {what}): run `outbox migrate` to restore it"


@dataclass(frozen=True)
class LegacyTrigger:
    trigger: str
    function: str
    how: str  # which function writes jobs, and how

    def describe(self) -> str:
        return (
            f"legacy trigger {self.trigger} on jobs_variants writes job state ({self.how}): run `outbox migrate` "
            "to remove it"
        )


def trigger_problems(conn: Connection) -> list[TriggerProblem]:
    """The product's triggers that are missing or do not fire (disabled, or only in replica mode)."""
    found = {(row.table_name, row.trigger): row.enabled for row in catalog.product_triggers_get(conn)}
    problems = []
    for table, trigger in PRODUCT_TRIGGERS:
        enabled = found.get((table, trigger))
        if enabled is None:
            problems.append(TriggerProblem(table, trigger, "missing"))
        elif enabled not in ("O", "A"):
            problems.append(TriggerProblem(table, trigger, "disabled"))
    return problems


def legacy_triggers(conn: Connection) -> list[LegacyTrigger]:
    """Triggers on jobs_variants, other than the product's, that write jobs.status or jobs.current_step.

    Writing other columns of jobs (updated_at, a count) or creating a job is not writing job state.
    The function is read with processor.sql_scan, and so is every function it calls (resolved as
    PostgreSQL would, through the search path), four deep, and every string it runs as dynamic SQL
    (a placeholder target counts as jobs when the function or the trigger's arguments name jobs).
    """
    found = []
    for app in catalog.app_triggers_get(conn):
        how = _writes_job_state(conn, app.function, app.source, arguments=list(app.arguments), depth=0, seen=set())
        if how is not None:
            found.append(LegacyTrigger(app.trigger, app.function, how))
    return found


def _writes_job_state(
    conn: Connection, function: str, source: str | None, *, arguments: list[str], depth: int, seen: set[str]
) -> str | None:
    """How ``function`` (or one it calls) writes job state, or None."""
    seen.add(function)
    found = sql_scan.scan(source or "")
    names_jobs = any(text.strip().lower() in ("jobs", "public.jobs") for text in found.strings + arguments)
    for write in found.writes:
        state = ", ".join(sorted(write.columns & JOB_STATE_COLUMNS))
        if state and write.target is not None and _is_job_state(conn, write.target):
            return f"{function} writes {state} of {'.'.join(write.target)}"
    for text in found.dynamic:
        for write in sql_scan.scan(text).writes:
            state = ", ".join(sorted(write.columns & JOB_STATE_COLUMNS))
            named = names_jobs if write.target is None else _is_job_state(conn, write.target)
            if state and named:
                return f"{function} runs dynamic SQL that writes {state} of jobs"
    if depth >= _DEPTH:
        return None
    for name in sorted(found.calls):
        for callee in catalog.app_functions_get(conn, list(name)):
            if callee.function in seen:
                continue
            how = _writes_job_state(conn, callee.function, callee.source, arguments=[], depth=depth + 1, seen=seen)
            if how is not None:
                return f"{function} calls {how}"
    return None


def _is_job_state(conn: Connection, target: tuple[str, ...]) -> bool:
    """Whether ``target`` names the jobs table, or a view over it."""
    return catalog.relation_is_jobs(conn, list(target))


@dataclass(frozen=True)
class SchemaReport:
    """What one check found (empty lists: all is in place)."""

    triggers: list[TriggerProblem]
    legacy: list[LegacyTrigger]
    casts: list[str]

    def problems(self) -> list[str]:
        """Every problem, one line each."""
        return [p.describe() for p in self.triggers] + [t.describe() for t in self.legacy] + self.casts

    def capture_enabled(self) -> dict[str, bool]:
        """Each capture trigger on jobs_variants: whether it is present and fires."""
        broken = {p.trigger for p in self.triggers if p.table == "jobs_variants"}
        return {trigger: trigger not in broken for trigger in CAPTURE_TRIGGERS}


def report(conn: Connection) -> SchemaReport:
    """Check the product's triggers, legacy writers of job state and the cast functions."""
    return SchemaReport(trigger_problems(conn), legacy_triggers(conn), app_schema.cast_problems(conn))


def problems(conn: Connection) -> list[str]:
    """Every problem, one line each (empty: all is in place)."""
    return report(conn).problems()


def restore_triggers(conn: Connection) -> list[TriggerProblem]:
    """Create the missing product triggers and enable the disabled ones (inside migrate's transaction)."""
    fixed = trigger_problems(conn)
    for problem in fixed:
        if problem.state == "missing":
            catalog.product_trigger_create(conn, problem.trigger)
        else:
            catalog.trigger_enable(conn, problem.table, problem.trigger)
    return fixed


def drop_legacy(conn: Connection, legacy: list[LegacyTrigger]) -> None:
    for trigger in legacy:
        catalog.trigger_drop(conn, "jobs_variants", trigger.trigger)
