"""Every report of the `outbox` commands in both forms: for a person (lines and tables) and for a program (``--json``).

The operations (processor/backlog.py, verify.py, explain.py, ...) return typed reports (frozen dataclasses of
UUIDs, datetimes and enums) and never format them; the commands (processor/cli.py, cli_transitions.py) only
choose the form. One module, so that the two forms of a report are read side by side and change together:
``to_json`` turns any report into its document (UUIDs as strings, times as ISO 8601, enums as their values,
keys in the dataclass's field order), and each report has its text form below.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from outbox.subscription import Transition
from processor.backlog import BacklogReport
from processor.explain import ExplainedVariant, ExplainReport, StoredState, describe_at, describe_time
from processor.health import HealthReport
from processor.replay import JobChange, JobStatus
from processor.retention import RetentionReport
from processor.store import DeadLetterRecord, Segmented, SubscriptionFailure, SubscriptionInfo
from processor.verify import RepairReport, VerifyReport


def to_json(value: Any) -> Any:
    """The JSON document of a report: dataclasses as objects, in their fields' order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [to_json(item) for item in value]
    return value


def _add_row(table: Table, *cells: str) -> None:
    table.add_row(*(Text(cell) for cell in cells))  # as written: data is never read as rich markup


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


# `outbox backlog`.


def backlog_text(report: BacklogReport, console: Console) -> None:
    which = "all partitions" if report.partition is None else f"partition {report.partition}"
    table = Table(title=f"outbox backlog ({which} of {report.partition_count})", show_header=False,
                  title_justify="left")  # fmt: skip
    table.add_column(style="bold")
    table.add_column()
    for name, value in _backlog_lines(report):
        table.add_row(name, value)
    console.print(table)
    if len(report.partitions) > 1:
        console.print(_backlog_partitions(report))
    if report.pending_top_jobs:
        top = Table("job", "pending events", title="jobs with the most pending events", title_justify="left")
        for job in report.pending_top_jobs:
            top.add_row(str(job.job_id), str(job.pending_events))
        console.print(top)


def _backlog_lines(report: BacklogReport) -> list[tuple[str, str]]:
    age, checkpoint, consumer = report.oldest_pending_age_seconds, report.checkpoint, report.consumer
    if len(report.partitions) > 1:
        owner = "see partitions"
    elif consumer is None:
        owner = "none"
    else:
        owner = f"pid {consumer.pid} on {consumer.host} since {_iso(consumer.since)}"
    return [
        ("pending events", f"{report.pending_events:,}"),
        ("oldest pending", "-" if age is None else f"{age:.1f} s"),
        ("throughput", f"{report.throughput_events_per_second:,.1f} events/s (last minute)"),
        ("last applied", f"event {checkpoint.last_event_id} at {_iso(checkpoint.applied_at)}"),
        ("events applied", f"{checkpoint.events_applied:,}"),
        ("consumer", owner),
        ("standbys", str(report.standbys)),
        ("dead letters", str(report.dead_letters)),
        ("flagged jobs", str(report.flagged_jobs)),
        ("jobs awaiting fold", str(report.jobs_awaiting_fold)),
        ("outbox size", f"{report.outbox.bytes / 1e6:,.1f} MB, ~{report.outbox.rows_estimate:,} rows"),
        ("pending by type", ", ".join(f"{k}: {v}" for k, v in report.pending_by_event_type.items()) or "-"),
    ]


def _backlog_partitions(report: BacklogReport) -> Table:
    parts = Table(
        "partition", "owner (pid@host)", "pending", "oldest pending", "events applied", "events/s",
        title="partitions", title_justify="left",
    )  # fmt: skip
    for item in report.partitions:
        owner = f"{item.owner_pid}@{item.owner_host}" if item.owner_pid is not None else "none"
        age = item.oldest_pending_age_seconds
        parts.add_row(
            str(item.partition), owner, f"{item.pending_events:,}", "-" if age is None else f"{age:.1f} s",
            f"{item.events_applied:,}", f"{item.throughput_events_per_second:,.1f}",
        )  # fmt: skip
    return parts


# `outbox check`.


def health_json(report: HealthReport) -> dict[str, Any]:
    return {"ok": report.ok, "error": report.error, "checks": to_json(report.checks)}


def health_text(report: HealthReport, console: Console) -> None:
    table = Table("check", "", "detail", title="outbox check", title_justify="left")
    for item in report.checks:
        table.add_row(item.name, "ok" if item.ok else "FAIL", item.detail)
    console.print(table)


# `outbox verify [--repair]`.


def verify_json(
    report: VerifyReport, repaired: RepairReport | None = None, after: VerifyReport | None = None
) -> dict[str, Any]:
    document: dict[str, Any] = {
        **to_json(report), "drift": report.drift, "flagged_jobs": report.flagged_jobs, "ok": report.ok,
    }  # fmt: skip
    if repaired is not None and after is not None:
        document["repaired"] = to_json(repaired)
        document["after_repair"] = verify_json(after)
    return document


def verify_text(report: VerifyReport, console: Console) -> None:
    # Each side is shown as its JSON object: the same words in both forms.
    for variant in report.variant_drift:
        row, events = to_json(variant.row), to_json(variant.events)
        console.print(f"variant {variant.variant_id}: row {row} but events say {events}")
    for job in report.job_drift:
        console.print(f"job {job.job_id}: jobs says {to_json(job.jobs)} but its variants give {to_json(job.events)}")
    for stuck in report.stuck_jobs:
        console.print(f"job {stuck.job_id} is {stuck.status} although all its variants are done")
    for flag in report.flagged:
        letters = f" (dead letters {', '.join(str(e) for e in flag.dead_letters)})" if flag.dead_letters else ""
        console.print(f"job {flag.job_id} is flagged{letters}: {flag.reason}")
    for hold in report.held:
        console.print(f"job {hold.job_id} is held at {hold.status}/{hold.current_step} (not compared): {hold.reason}")
    console.print(verify_summary(report))


def repair_text(repaired: RepairReport, after: VerifyReport, console: Console) -> None:
    console.print(
        f"repaired: {repaired.resync_events} resync events written, {repaired.jobs_rebuilt} jobs rebuilt"
        + (f"; {repaired.not_applied} resync events not applied yet (is `outbox run` running?)"
           if repaired.not_applied else "")
    )  # fmt: skip
    for line in repaired.cannot_repair:
        console.print(f"cannot repair: {line}")
    console.print("after repair: " + ("no drift, nothing flagged" if after.ok else verify_summary(after)))


def verify_summary(report: VerifyReport) -> str:
    return (
        f"{len(report.variant_drift)} variants and {len(report.job_drift)} jobs drifted, "
        f"{len(report.stuck_jobs)} stuck; {report.flagged_jobs} flagged, {len(report.held)} held, "
        f"{report.jobs_in_flight} in flight (skipped)"
    )


# `outbox replay`.


def replay_json(job_count: int, changes: Sequence[JobChange], *, dry_run: bool) -> dict[str, Any]:
    def state(value: JobStatus | None) -> list[str | None] | None:  # [status, current_step], as before
        return None if value is None else [value.status, value.current_step]

    return {
        "jobs": job_count, "dry_run": dry_run,
        "changed": [{"job_id": str(c.job_id), "before": state(c.before), "after": state(c.after)} for c in changes],
    }  # fmt: skip


def replay_text(job_count: int, changes: Sequence[JobChange], *, dry_run: bool, console: Console) -> None:
    for change in changes:
        console.print(("would change " if dry_run else "changed ") + change.describe())
    verb = "would change" if dry_run else "changed"
    console.print(f"replayed {job_count} jobs: {len(changes)} {verb}")


# `outbox prune`.


def prune_summary(older_than: str, report: RetentionReport) -> str:
    """The summary line, then one line per segment kept (and why)."""
    events, transitions = report.removed(Segmented.EVENTS), report.removed(Segmented.TRANSITIONS)
    gone = sum(1 for s in report.segments if s.kept_because is None and s.rows)
    lines = [
        f"pruned {events} events older than {older_than} ({gone} segments truncated); "
        f"{report.baseline_updates} variant baselines updated; {transitions} job transitions removed "
        "(none that a subscription still needs)"
    ]
    for kept in report.kept():
        what = "events" if kept.table is Segmented.EVENTS else "transitions"
        lines.append(f"kept segment {kept.segment} of the {what} ({kept.rows} rows): {kept.kept_because}")
    return "\n".join(lines)


# `outbox dead-letters`.


def dead_letters_text(letters: Sequence[DeadLetterRecord], console: Console) -> None:
    table = Table("event", "job", "type", "reason", "parked at", title=f"{len(letters)} dead letters")
    for letter in letters:
        table.add_row(
            str(letter.event_id), str(letter.job_id), str(letter.event_type), letter.reason,
            letter.parked_at.isoformat(),
        )  # fmt: skip
    console.print(table)


def outcomes_text(event_ids: Sequence[int], outcomes: Mapping[int, str], console: Console) -> None:
    for event_id in event_ids:
        console.print(f"event {event_id}: {outcomes[event_id]}")


# `outbox subscriptions` and `outbox transitions`.


def subscriptions_text(found: Sequence[SubscriptionInfo], console: Console) -> None:
    table = Table("name", "position", "statuses", "lag", "oldest unacknowledged", "retrying", "parked",
                  title=f"{len(found)} subscriptions")  # fmt: skip
    for s in found:
        table.add_row(
            s.name, str(s.position), ",".join(s.to_statuses or ["all"]), str(s.lag),
            s.oldest_unacknowledged.isoformat(timespec="seconds") if s.oldest_unacknowledged else "-",
            str(s.retrying), str(s.parked),
        )  # fmt: skip
    console.print(table)


def failures_text(found: Sequence[SubscriptionFailure], console: Console) -> None:
    table = Table("transition", "job", "to", "attempts", "state", "last error", title=f"{len(found)} failures")
    for f in found:
        table.add_row(str(f.transition_id), str(f.job_id), str(f.to_status), str(f.attempts),
                      "parked" if f.parked_at else "retrying", f.last_error)  # fmt: skip
    console.print(table)


def transition_line(t: Transition) -> str:
    step = f" at {t.to_step}" if t.to_step else ""
    was = f"{t.from_status}" + (f" at {t.from_step}" if t.from_step else "")
    return (f"{t.transition_id}  {t.transitioned_at.isoformat(timespec='milliseconds')}  job {t.job_id}  "
            f"{was} -> {t.to_status}{step}" + ("  (hold)" if t.written_by == "hold" else ""))  # fmt: skip


# `outbox explain`: the decision as lines (never wrapped, for grep), the rest as tables.


def explain_text(report: ExplainReport, console: Console) -> None:
    def line(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    fold = report.fold
    line(f"job {report.job_id}: {describe_at(report.job.status, report.job.current_step)} "
         f"(row updated {describe_time(report.job.updated_at)})")  # fmt: skip
    line(f"fold: {fold.decision}")
    line(f"verdict: {fold.verdict}")
    console.print(_explain_summary(report))
    console.print(_explain_variants(report))
    for v in report.variants:
        if v.open_transaction is not None:
            line(f"variant {v.variant_id}: invisible change: {v.open_transaction.describe()}")
    for v in report.variants:
        if v.events:
            console.print(_explain_events(report, v))
        elif v.events_pruned:
            line(f"variant {v.variant_id}: no event left, all pruned (its baseline keeps the state)")
    _print_table_or(console, _explain_dead_letters(report), "dead letters: none")
    _print_table_or(console, _explain_transitions(report), "transitions: none kept")


def _print_table_or(console: Console, table: Table | None, none: str) -> None:
    if table is None:
        console.print(none, markup=False, highlight=False)
    else:
        console.print(table)


def _explain_summary(report: ExplainReport) -> Table:
    summary = Table(show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    for name, value in [
        ("held", _held(report)),
        (
            "flagged",
            f"yes, since {describe_time(report.flag.flagged_at)}: {report.flag.reason}" if report.flag else "no",
        ),
        ("awaiting fold", _awaiting(report)),
        ("job row lock", _row_lock(report)),
        ("partition", f"{report.partition}; worker: {_worker(report)}"),
        ("checkpoint", _checkpoint(report)),
    ]:
        summary.add_row(name, Text(value))
    return summary


def _held(report: ExplainReport) -> str:
    hold = report.hold
    if hold is None:
        return "no"
    at = f"{hold.status}{f'/{hold.current_step}' if hold.current_step else ''}"
    return f"yes, at {at} since {describe_time(hold.held_at)}: {hold.reason}"


def _awaiting(report: ExplainReport) -> str:
    awaiting = report.awaiting_fold
    if awaiting is None:
        return "no"
    retry = f", retry at {describe_time(awaiting.retry_at)}" if awaiting.retry_at else ""
    return f"since {describe_time(awaiting.since)}{retry}"


def _row_lock(report: ExplainReport) -> str:
    lock = report.row_lock
    if lock is None:
        return "none"
    return f"backend pid {lock.pid} ({lock.application_name}, {lock.state}), open since {describe_time(lock.since)}"


def _worker(report: ExplainReport) -> str:
    worker = report.checkpoint.worker
    if worker is None:
        return "none (no worker holds this partition)"
    return f"backend pid {worker.pid} ({worker.application_name}) since {describe_time(worker.since)}"


def _checkpoint(report: ExplainReport) -> str:
    cp = report.checkpoint
    catching_up = f", catching up to {cp.catching_up_to}" if cp.catching_up_to else ""
    return f"done snapshot {cp.done_snapshot}{catching_up} (moved {describe_time(cp.updated_at)})"


def _explain_variants(report: ExplainReport) -> Table:
    variants = Table("variant", "row (jobs_variants)", "stored (outbox_variant_states)", "agreement", "events",
                     title="variants", title_justify="left")  # fmt: skip
    for v in report.variants:
        row = "-" if v.row is None else describe_at(v.row.status, v.row.current_step) + _other_job(v.row.job_id, report)
        stored = "-" if v.stored is None else _stored(v.stored, report)
        counts = f"{v.events_total} ({v.events_pending} pending)"
        if v.events_pruned and v.baseline is not None:
            counts += f"; pruned up to version {v.baseline.version} (baseline: {_stored(v.baseline, report)})"
        agreement = v.agreement.value + (f": {v.note}" if v.note else "")
        _add_row(variants, str(v.variant_id), row, stored, agreement, counts)
    return variants


def _explain_events(report: ExplainReport, v: ExplainedVariant) -> Table:
    newest = f"the {len(v.events)} newest of " if len(v.events) < v.events_total else ""
    title = f"variant {v.variant_id}: {newest}{v.events_total} events"
    events = Table("event", "txid", "version", "type", "status", "step", "written", "state", title=title,
                   title_justify="left")  # fmt: skip
    for e in v.events:
        state = e.state.value.replace("_", " ")
        if e.stored:
            state += ", stored state"
        if e.dead_letter is not None:
            state += f", dead letter{' (discarded)' if e.dead_letter.discarded else ''}: {e.dead_letter.reason}"
        if e.job_id != report.job_id:
            state += f", of job {e.job_id}"
        _add_row(events, str(e.event_id), str(e.txid), str(e.version), e.event_type, e.status or "-", e.step or "-",
                 describe_time(e.created_at), state)  # fmt: skip
    return events


def _explain_dead_letters(report: ExplainReport) -> Table | None:
    if not report.dead_letters:
        return None
    letters = Table("event", "variant", "reason", "holds job", "parked", "discarded", title="dead letters",
                    title_justify="left")  # fmt: skip
    for d in report.dead_letters:
        _add_row(
            letters, str(d.event_id) + (" (event pruned)" if d.event_pruned else ""), str(d.variant_id or "-"),
            d.reason, "yes" if d.holds_job else "no", describe_time(d.parked_at), describe_time(d.discarded_at),
        )  # fmt: skip
    return letters


def _explain_transitions(report: ExplainReport) -> Table | None:
    if not report.transitions:
        return None
    history = Table("transition", "from", "to", "by", "at", title="transitions (newest first)",
                    title_justify="left")  # fmt: skip
    for t in report.transitions:
        _add_row(history, str(t.transition_id), describe_at(t.from_status, t.from_step),
                 describe_at(t.to_status, t.to_step), t.written_by, describe_time(t.transitioned_at))  # fmt: skip
    return history


def _stored(state: StoredState, report: ExplainReport) -> str:
    if state.removed:
        text = "removed"
    elif state.problem is not None:
        text = f"problem: {state.problem}"
    else:
        text = describe_at(state.status, state.step)
    return f"{text} (version {state.version}, event {state.event_id})" + _other_job(state.job_id, report)


def _other_job(job_id: uuid.UUID | None, report: ExplainReport) -> str:
    return "" if job_id == report.job_id else f", in job {job_id}"
