"""Is the product's part of the schema in place, and is anything else writing job state?

Two kinds of problem, both checked by `outbox migrate` (which repairs them), by `outbox check`,
and by every running worker once per standby interval (it logs each problem once, answers 503 on
/health and sets a metric while one lasts):

- a trigger of the product missing or disabled (`ALTER TABLE ... DISABLE TRIGGER`, `DROP
  TRIGGER`): without the capture triggers, changes of variants are not captured and their jobs go
  stale; without the guard, job state can be written behind the processor;
- a legacy writer of job state: a trigger on jobs_variants whose function, or a function it calls,
  writes `jobs` (in any form: `UPDATE [ONLY] [schema.]jobs`, with comments in between, `INSERT ...
  ON CONFLICT DO UPDATE`, `MERGE`, or a dynamic `EXECUTE` naming jobs). Two writers of job state
  must not coexist: that is the bug this product replaces. (The guard refuses their writes at
  once anyway; this finds them before they fail.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

from processor.store import QUERIES, Connection

# The product's triggers: (table, trigger). The NOTIFY wake-up trigger is optional (migrate --wakeup).
PRODUCT_TRIGGERS = (
    ("jobs_variants", "outbox_capture_variant_insert_delete"),
    ("jobs_variants", "outbox_capture_variant_update"),
    ("jobs", "outbox_guard_job_state"),
)

_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_JOBS = r"(?:\w+\s*\.\s*|\"[^\"]+\"\s*\.\s*)?\"?jobs\"?(?![\w\"])"  # jobs, "jobs", app.jobs (not jobs_variants)
_WRITES_JOBS = re.compile(rf"\b(?:update\s+(?:only\s+)?|insert\s+into\s+|merge\s+into\s+){_JOBS}", re.IGNORECASE)
_DYNAMIC = re.compile(r"\bexecute\b", re.IGNORECASE)
_DYNAMIC_JOBS = re.compile(r"'[^']*\b(?:update|insert|merge)\b[^']*'|'jobs'|%I", re.IGNORECASE)
_CALLS = re.compile(r"\b([a-z_][a-z0-9_]*)\s*\(", re.IGNORECASE)


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
    found = {(row[0], row[1]): row[2] for row in conn.execute(QUERIES["product_triggers_get"])}
    problems = []
    for table, trigger in PRODUCT_TRIGGERS:
        enabled = found.get((table, trigger))
        if enabled is None:
            problems.append(TriggerProblem(table, trigger, "missing"))
        elif enabled not in ("O", "A"):
            problems.append(TriggerProblem(table, trigger, "disabled"))
    return problems


def legacy_triggers(conn: Connection) -> list[LegacyTrigger]:
    """Triggers on jobs_variants, other than the product's, that write job state (see the module)."""
    found = []
    for trigger, function, source in conn.execute(QUERIES["app_triggers_get"]).fetchall():
        how = _writes_jobs(conn, function, source, depth=0, seen=set())
        if how is not None or trigger == "check_all_variants_done_trigger":
            found.append(LegacyTrigger(trigger, function, how or "the legacy aggregation trigger"))
    return found


def _writes_jobs(conn: Connection, function: str, source: str, *, depth: int, seen: set[str]) -> str | None:
    """How ``function`` (or one it calls, three deep) writes jobs, or None."""
    seen.add(function)
    code = _COMMENTS.sub(" ", source or "")
    if _WRITES_JOBS.search(code):
        return f"{function} writes jobs"
    if _DYNAMIC.search(code) and _DYNAMIC_JOBS.search(code) and re.search(r"\bjobs\b", code, re.IGNORECASE):
        return f"{function} runs dynamic SQL that names jobs"
    if depth >= 3:
        return None
    names = sorted({name.lower() for name in _CALLS.findall(code)})
    if not names:
        return None
    for callee, callee_source in conn.execute(QUERIES["app_functions_get"], {"names": names}).fetchall():
        if callee in seen:
            continue
        how = _writes_jobs(conn, callee, callee_source, depth=depth + 1, seen=seen)
        if how is not None:
            return f"{function} calls {how}"
    return None


def problems(conn: Connection) -> list[str]:
    """Every problem, one line each (empty: all is in place)."""
    return [p.describe() for p in trigger_problems(conn)] + [t.describe() for t in legacy_triggers(conn)]


def restore_triggers(conn: Connection) -> list[TriggerProblem]:
    """Create the missing product triggers and enable the disabled ones (inside migrate's transaction)."""
    fixed = trigger_problems(conn)
    for problem in fixed:
        if problem.state == "missing":
            conn.execute(QUERIES[f"trigger_create_{problem.trigger}"])
        else:
            conn.execute(
                sql.SQL("ALTER TABLE {} ENABLE TRIGGER {}").format(
                    sql.Identifier(problem.table), sql.Identifier(problem.trigger)
                )
            )
    return fixed


def drop_legacy(conn: Connection, legacy: list[LegacyTrigger]) -> None:
    for trigger in legacy:
        conn.execute(sql.SQL("DROP TRIGGER {} ON jobs_variants").format(sql.Identifier(trigger.trigger)))
