"""The `outbox` command: migrate, run, demo, backlog, explain, replay, verify, dead-letters, prune.

Every flag falls back to an OUTBOX_* environment variable (shown in --help). Errors print one line
with their cause and exit 1; a usage error exits 2.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from outbox.limits import PARTITIONS_MAX, PARTITIONS_MIN
from processor import cli_transitions, fold_config, render, store
from processor.cli_common import DatabaseOption, JsonOption, LogLevelOption, setup, stop_on_signals
from processor.database import DatabaseUrl, connect, redact
from processor.errors import OutboxError, PartitionMissingError
from processor.fold import FailurePolicy, Pipeline
from processor.migrate import LegacyTriggerPolicy, check_ready
from processor.migrate import migrate as run_migrations
from processor.service import WorkerService
from processor.settings import Settings, Wakeup
from processor.wakeup import Wake
from processor.worker import application_name

app = typer.Typer(
    name="outbox",
    help="Transactional-outbox processor: keeps each job's state in step with its variants.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"outbox {version('pg-outbox-processor')}")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Transactional-outbox processor: keeps each job's state in step with its variants."""


def _json_requested() -> bool:
    return "--json" in sys.argv[1:]


PipelineOption = Annotated[
    str | None,
    typer.Option(
        "--pipeline-steps",
        envvar="OUTBOX_PIPELINE_STEPS",
        help="Comma-separated steps, the last one final. The database keeps the pipeline (`outbox pipeline "
        "show`); given here, it must match it (`outbox migrate` sets it the first time).",
        show_default="the database's",
    ),
]
PolicyOption = Annotated[
    FailurePolicy | None,
    typer.Option(
        "--failure-policy",
        envvar="OUTBOX_FAILURE_POLICY",
        help="When a job is failed: settled (once every variant is finished) or immediate. Kept in the database, "
        "like the pipeline.",
        show_default="the database's",
    ),
]
# Partition numbers as the schema allows them (outbox.limits: PARTITIONS_MIN to PARTITIONS_MAX partitions).
PartitionOption = Annotated[
    int | None,
    typer.Option(
        envvar="OUTBOX_PARTITION", min=0, max=PARTITIONS_MAX - 1, help="Partition to work on.", show_default="all"
    ),
]


def _migrate(
    db: DatabaseUrl,
    console: Console,
    settings: Settings,
    *,
    quiet: bool = False,
    legacy_policy: LegacyTriggerPolicy = LegacyTriggerPolicy.REPLACE,
) -> None:
    with connect(db, application_name=application_name("migrate")) as conn:
        report = run_migrations(
            conn, pipeline=settings.pipeline, policy=settings.failure_policy, legacy_policy=legacy_policy
        )
    for legacy in report.removed_triggers:
        console.print(
            f"removed legacy trigger {legacy.trigger} on jobs_variants (function {legacy.function} is kept; "
            f"{legacy.how}): a trigger that writes job state from variant counts loses updates under concurrent "
            "commits; the outbox processor now owns job state"
        )
    for restored in report.restored_triggers:
        console.print(
            f"restored trigger {restored.trigger} on {restored.table} (it was {restored.state}); changes made "
            "meanwhile were not captured: run `outbox verify --repair`"
        )
    if report.applied:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in report.applied)
        console.print(f"migrated {db.redacted()}: applied {names}")
    elif not quiet:
        console.print(f"{db.redacted()} is up to date (schema version {report.already_applied})")
    if report.config_set is not None and not quiet:
        console.print(f"fold configuration set: {report.config_set.describe()} (change it with `outbox pipeline set`)")


@app.command()
def migrate(
    database_url: DatabaseOption = None,
    pipeline_steps: PipelineOption = None,
    failure_policy: PolicyOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be done (and what would be refused); change nothing.")
    ] = False,
    show_plan: Annotated[
        bool, typer.Option("--show-plan", help="Print what it will do (as --dry-run does), then do it.")
    ] = False,
    legacy_trigger: Annotated[
        LegacyTriggerPolicy,
        typer.Option(
            envvar="OUTBOX_LEGACY_TRIGGER",
            help="A trigger on jobs_variants that writes job state: replace (drop it, say so) or refuse (change "
            "nothing, exit 1).",
        ),
    ] = LegacyTriggerPolicy.REPLACE,
    wakeup: Annotated[
        Wakeup | None,
        typer.Option(
            envvar="OUTBOX_WAKEUP",
            help="notify: writers of jobs_variants NOTIFY the worker when they commit (for workers run with "
            "OUTBOX_WAKEUP=notify; costs writers a lock at commit); poll: they do not. Unset: left as it is.",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Create or adopt the jobs tables and install the outbox (idempotent); with OUTBOX_PARTITIONS, set the count.

    The first migrate also sets the pipeline (OUTBOX_PIPELINE_STEPS; the default one only if every
    step jobs_variants uses is in it).
    """
    settings, db, console = setup(database_url, log_level, pipeline_steps=pipeline_steps, failure_policy=failure_policy)
    if dry_run or show_plan:
        from processor.migrate import plan

        with connect(db, application_name=application_name("migrate")) as conn:
            found = plan(conn, pipeline=settings.pipeline, policy=settings.failure_policy, legacy_policy=legacy_trigger)
        console.print(f"outbox migrate on {db.redacted()} {'would (nothing was changed)' if dry_run else 'will'}:")
        for step in found.steps:
            console.print(f"  - {step}")
        if found.refusal:
            raise OutboxError(f"migrate {'would refuse' if dry_run else 'refuses'}: {found.refusal}")
        if dry_run:
            return
    # Under --legacy-trigger refuse, migrate itself refuses too: a trigger created since the plan was read.
    _migrate(db, console, settings, legacy_policy=legacy_trigger)
    if settings.partitions is not None:
        _repartition(db, console, settings.partitions, timeout=60.0, as_json=False)
    if wakeup is not None:
        with connect(db, application_name=application_name("migrate")) as conn:
            # CREATE/DROP TRIGGER: writers of jobs_variants wait a moment for its lock.
            store.wakeup_trigger_set(conn, enabled=wakeup is Wakeup.NOTIFY)
        console.print(
            "wake-up: writers now notify the worker when they commit (OUTBOX_WAKEUP=notify)"
            if wakeup is Wakeup.NOTIFY
            else "wake-up: writers do not notify; workers poll (OUTBOX_WAKEUP=poll)"
        )


@app.command()
def repartition(
    partitions: Annotated[
        int, typer.Argument(min=PARTITIONS_MIN, max=PARTITIONS_MAX, help="The new partition count.", show_default=False)
    ],
    database_url: DatabaseOption = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds to wait for the workers to drain the outbox; then change nothing.")
    ] = 60.0,
    as_json: JsonOption = False,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Change the partition count: holds writers back, waits for a drained outbox, then switches (docs/design.md)."""
    _, db, console = setup(database_url, log_level)
    _repartition(db, console, partitions, timeout=timeout, as_json=as_json)


def _repartition(db: DatabaseUrl, console: Console, partitions: int, *, timeout: float, as_json: bool) -> None:
    from processor.repartition import repartition as run_repartition

    status = Console(stderr=True)
    with connect(db, application_name=application_name("repartition")) as conn:
        check_ready(conn)
        with status.status("holding writers back, waiting for the workers to drain the outbox") as spinner:
            report = run_repartition(
                conn, partitions, timeout=timeout, on_wait=lambda p: spinner.update(f"waiting for the workers: {p}")
            )
    if as_json:
        print(json.dumps({
            "before": report.before, "after": report.after, "events_moved": report.events_moved,
            "writers_held_seconds": round(report.writers_held_seconds, 3),
        }))  # fmt: skip
    elif report.before == report.after:
        console.print(f"the database already has {report.after} partition(s); nothing to do")
    else:
        console.print(
            f"partitions: {report.before} -> {report.after}; {report.events_moved} applied events relabelled; "
            f"writers held back for {report.writers_held_seconds:.2f} s. "
            f"Workers follow at their next rebalance (set OUTBOX_PARTITIONS={report.after} where it is set)."
        )


@app.command()
def run(
    database_url: DatabaseOption = None,
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="Exit 0 once nothing more can be processed right now.")
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(
            envvar="OUTBOX_BATCH_SIZE", min=1, max=100_000, help="Events per transaction.", show_default="5000"
        ),
    ] = None,
    partition: Annotated[
        int | None,
        typer.Option(
            envvar="OUTBOX_PARTITION",
            min=0,
            max=PARTITIONS_MAX - 1,
            help="Consume only this partition.",
            show_default="a fair share of all",
        ),
    ] = None,
    pipeline_steps: PipelineOption = None,
    failure_policy: PolicyOption = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="OUTBOX_METRICS_PORT", min=1, max=65535, help="Serve Prometheus /metrics and /health on this port."
        ),
    ] = None,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Run the worker: apply outbox events to job state, one active worker per partition."""
    settings, db, console = setup(
        database_url, log_level, batch_size=batch_size, partition=partition, pipeline_steps=pipeline_steps,
        failure_policy=failure_policy,
    )  # fmt: skip
    if settings.database_url is None:
        _migrate(db, console, settings, quiet=True)  # the embedded database is created and migrated on first use
    # The class an application embeds (processor/service.py): it owns /metrics, /health and their refresh.
    service = WorkerService.from_settings(settings, db, metrics_port=metrics_port)
    with stop_on_signals(service):
        stats = service.run(until_idle=until_idle)
    console.print(
        f"processed {stats.events} events in {stats.batches} batches: "
        f"{stats.jobs_changed} job state changes, {stats.dead_letters} dead letters"
    )
    if settings.wakeup is Wakeup.NOTIFY:
        wakes = service.worker.waiter.wakes
        console.print(
            f"woke up {wakes[Wake.NOTIFY]} times on a notification, {wakes[Wake.TIMEOUT]} at the poll interval"
        )


@app.command()
def demo(
    database_url: DatabaseOption = None,
    jobs: Annotated[int, typer.Option(min=1, max=100_000, help="Jobs to create.")] = 200,
    min_variants: Annotated[int, typer.Option(min=1, help="Fewest variants per job.")] = 3,
    max_variants: Annotated[int, typer.Option(min=1, help="Most variants per job.")] = 12,
    writers: Annotated[int, typer.Option(min=1, max=64, help="Concurrent writer connections.")] = 8,
    fail_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Chance that a variant fails a step once, then is retried.")
    ] = 0.05,
    seed: Annotated[int | None, typer.Option(help="Random seed, for a repeatable run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Create jobs and drive them through the pipeline from concurrent writers while the worker runs.

    It writes demo jobs into the database: point it at the embedded default or a scratch database.
    """
    from processor.demo import DemoOptions, render_report, run_demo

    if min_variants > max_variants:
        raise typer.BadParameter("must not exceed --max-variants", param_hint="--min-variants")
    settings, db, console = setup(database_url, log_level)
    progress = Console(stderr=True, soft_wrap=True)  # stdout stays for the summary
    _migrate(db, progress, settings, quiet=True)
    with connect(db, application_name=application_name("demo")) as conn:
        config = fold_config.load(conn)
    progress.print(
        f"demo on {db.redacted()}: {jobs} jobs x {min_variants}-{max_variants} variants, {writers} writers, "
        f"pipeline {' -> '.join(config.pipeline.steps)}"
    )
    options = DemoOptions(jobs, min_variants, max_variants, writers, fail_rate, seed)
    report = run_demo(settings, db, config.pipeline.steps, options, progress)
    if as_json:
        print(json.dumps(report.summary(), indent=2))
    else:
        render_report(report, console)
    if report.jobs_stuck or report.jobs_done != report.jobs:
        raise OutboxError(f"{report.jobs_stuck} jobs stuck, {report.jobs - report.jobs_done} not done")


@app.command()
def check(
    database_url: DatabaseOption = None,
    max_lag: Annotated[
        float, typer.Option(min=0, help="Fail when the oldest pending work is older than this many seconds.")
    ] = 60.0,
    as_json: JsonOption = False,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """One probe for monitoring: exit 1 on lag, a partition without a worker, flagged jobs, dead letters,
    a subscription behind or with parked transitions, a missing or disabled trigger of the product, or a
    legacy writer of job state."""
    from processor.health import run_checks

    _, db, console = setup(database_url, log_level)
    with connect(db, application_name=application_name("check")) as conn:
        report = run_checks(conn, max_lag=max_lag)
    if as_json:
        print(json.dumps(render.health_json(report), indent=2))
    else:
        render.health_text(report, console)
    if not report.ok:
        raise SystemExit(1)


@app.command()
def healthcheck(
    port: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_METRICS_PORT",
            min=1,
            max=65535,
            help="The worker's metrics port (`run --metrics-port`).",
            show_default=False,
        ),
    ],
    host: Annotated[str, typer.Option(help="Where the worker runs.")] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for its answer.")] = 5.0,
) -> None:
    """Probe a running worker's /health (a container's HEALTHCHECK): exit 0 on 200, else 1 with the reason.

    It reads only the worker's HTTP endpoint, never the database: `outbox check` is the probe for that.
    """
    from processor.probe import probe_health

    problem = probe_health(host, port, timeout)
    if problem is not None:
        raise OutboxError(problem)
    print(f"ok: the worker on port {port} is healthy")


@app.command()
def backlog(
    database_url: DatabaseOption = None,
    partition: PartitionOption = None,
    max_lag: Annotated[
        float | None,
        typer.Option(min=0, help="Exit 3 when the oldest pending event is older than this many seconds."),
    ] = None,
    as_json: JsonOption = False,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Show the event backlog: pending events, lag, the consumer, standbys, dead letters."""
    from processor.backlog import collect_backlog

    settings, db, console = setup(database_url, log_level, partition=partition)
    with connect(db, application_name=application_name("backlog")) as conn:
        check_ready(conn)
        report = collect_backlog(conn, settings.partition)
    if as_json:
        print(json.dumps(render.to_json(report), indent=2))
    else:
        render.backlog_text(report, console)
    lag = report.oldest_pending_age_seconds
    if max_lag is not None and lag is not None and lag > max_lag:
        print(f"error: oldest pending event is {lag:.1f} s old, over --max-lag {max_lag:g}", file=sys.stderr)
        raise SystemExit(3)


@app.command()
def explain(
    job_id: Annotated[str, typer.Argument(help="The job's id (a UUID).", show_default=False)],
    events: Annotated[int, typer.Option("--events", min=1, max=1000, help="Newest events shown per variant.")] = 20,
    transitions: Annotated[
        int, typer.Option("--transitions", min=1, max=1000, help="Newest job transitions shown.")
    ] = 20,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Why a job is in its state: its row, variants, events (applied, in flight, invisible), flags, the fold."""
    from processor.explain import explain as run_explain
    from processor.explain import parse_job_id

    job = parse_job_id(job_id)
    _, db, console = setup(database_url, log_level)
    with connect(db, application_name=application_name("explain")) as conn:
        check_ready(conn)
        report = run_explain(conn, job, events=events, transitions=transitions)
    if as_json:
        print(json.dumps(render.to_json(report), indent=2))
    else:
        render.explain_text(report, console)


@contextmanager
def _operation(
    database_url: str | None, log_level: str, partition: int | None, role: str
) -> Iterator[tuple[Settings, Console, Any, list[int]]]:
    """Settings, an output console, a checked connection and the partitions to act on.

    The fold configuration is the database's; a process whose own setting differs stops here.
    """
    settings, db, console = setup(database_url, log_level, partition=partition)
    with connect(db, application_name=application_name(role)) as conn:
        check_ready(conn)
        fold_config.check_setting(fold_config.load(conn), settings.pipeline_steps, settings.failure_policy)
        count = store.partitions_get(conn)
        if settings.partition is not None and settings.partition >= count:
            raise PartitionMissingError(settings.partition)
        partitions = [settings.partition] if settings.partition is not None else list(range(count))
        yield settings, console, conn, partitions


def _progress(total: int, description: str) -> Progress:
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=False,
    )  # fmt: skip
    progress.add_task(description, total=total)
    return progress


def _parse_since(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 date or time", param_hint="--since") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@app.command()
def replay(
    database_url: DatabaseOption = None,
    job: Annotated[list[uuid.UUID] | None, typer.Option("--job", help="A job to rebuild (repeatable).")] = None,
    since: Annotated[
        str | None, typer.Option(help="Rebuild the jobs with events written since this ISO 8601 time (UTC if naive).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the jobs that would change; change nothing.")
    ] = False,
    partition: PartitionOption = None,
    as_json: JsonOption = False,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Rebuild job state from the outbox: all jobs, --job ID..., or --since TIME. Safe while the worker runs."""
    from processor.replay import replay as run_replay

    started = _parse_since(since)
    with _operation(database_url, log_level, partition, "replay") as (settings, console, conn, _partitions):
        if job:
            wanted = sorted(set(job))
            job_ids = store.job_ids_existing(conn, wanted)
            unknown = sorted(set(wanted) - set(job_ids))
            if unknown:
                raise OutboxError(f"no such job: {', '.join(str(j) for j in unknown)}; nothing was replayed")
            if settings.partition is not None:
                job_ids = store.job_ids_in_partition(conn, job_ids, settings.partition)
        elif started is not None:
            job_ids = store.job_ids_with_events_since(conn, settings.partition, started)
        else:
            job_ids = store.job_ids_all(conn, settings.partition)
        with _progress(len(job_ids), "replaying jobs" + (" (dry run)" if dry_run else "")) as progress:
            changes = run_replay(
                conn, job_ids, dry_run=dry_run, on_chunk=lambda n: progress.advance(progress.task_ids[0], n)
            )
    if as_json:
        print(json.dumps(render.replay_json(len(job_ids), changes, dry_run=dry_run), indent=2))
    else:
        render.replay_text(len(job_ids), changes, dry_run=dry_run, console=console)


@app.command()
def verify(
    database_url: DatabaseOption = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Fix drift through the processor (events, replay), then check again; exit 1 if anything is left.",
        ),
    ] = False,
    wait: Annotated[
        float,
        typer.Option(min=0, max=3600, help="With --repair: seconds to wait for the workers to apply resync events."),
    ] = 30.0,
    partition: PartitionOption = None,
    as_json: JsonOption = False,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Compare event-derived state with jobs_variants and jobs; exit 1 on drift or flagged jobs."""
    from processor.verify import repair as run_repair
    from processor.verify import verify as run_verify

    with _operation(database_url, log_level, partition, "verify") as (settings, console, conn, _partitions):
        report = run_verify(conn, settings.partition)
        repaired = after = None
        if repair and not report.ok:
            repaired = run_repair(conn, report, wait=wait)
            after = run_verify(conn, settings.partition)
    if as_json:
        print(json.dumps(render.verify_json(report, repaired, after), indent=2))
    else:
        render.verify_text(report, console)
        if repaired is not None and after is not None:
            render.repair_text(repaired, after, console)
    final = after if after is not None else report
    if not final.ok:
        raise SystemExit(1)


pipeline_app = typer.Typer(
    help="The pipeline steps and failure policy every worker folds with (kept in the database).",
    no_args_is_help=True,
)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("show")
def pipeline_show(
    database_url: DatabaseOption = None, as_json: JsonOption = False, log_level: LogLevelOption = "WARNING"
) -> None:
    """Show the database's pipeline and failure policy."""
    _, db, console = setup(database_url, log_level)
    with connect(db, application_name=application_name("pipeline")) as conn:
        check_ready(conn)
        config = fold_config.load(conn)
    if as_json:
        print(json.dumps({
            "pipeline_steps": list(config.pipeline.steps), "failure_policy": config.policy.value,
            "version": config.version,
        }))  # fmt: skip
    else:
        console.print(f"{' -> '.join(config.pipeline.steps)} (final: {config.pipeline.final}); "
                      f"failure policy {config.policy.value}; version {config.version}")  # fmt: skip


@pipeline_app.command("set")
def pipeline_set(
    steps: Annotated[
        str | None,
        typer.Argument(help="Comma-separated steps, the last one final. Unset: keep the steps.", show_default=False),
    ] = None,
    failure_policy: Annotated[
        FailurePolicy | None,
        typer.Option("--failure-policy", help="settled or immediate. Unset: keep it.", show_default=False),
    ] = None,
    database_url: DatabaseOption = None,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Change the pipeline (or failure policy) for every worker; every job is folded again."""
    if steps is None and failure_policy is None:
        raise typer.BadParameter("give the new steps, --failure-policy, or both")
    pipeline = None
    if steps is not None:
        try:
            pipeline = Pipeline(tuple(step.strip() for step in steps.split(",")))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="STEPS") from None
    _, db, console = setup(database_url, log_level)
    with connect(db, application_name=application_name("pipeline")) as conn:
        check_ready(conn)
        result = fold_config.change(conn, pipeline, failure_policy)
    if not result.changed:
        console.print(f"nothing to change: {result.after.describe()}")
        return
    console.print(
        f"{result.before.describe()} -> {result.after.describe()}; {result.jobs_queued} jobs queued to be folded "
        "again by the workers (set OUTBOX_PIPELINE_STEPS to the new steps where it is set, or unset it)"
    )


dead_letters_app = typer.Typer(help="Events that could not be applied: list, retry, discard.", no_args_is_help=True)
app.add_typer(dead_letters_app, name="dead-letters")


@dead_letters_app.command("list")
def dead_letters_list(
    database_url: DatabaseOption = None,
    include_discarded: Annotated[bool, typer.Option("--include-discarded")] = False,
    as_json: JsonOption = False,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """List dead letters with the reason each could not be applied."""
    from processor.dead_letters import list_dead_letters

    with _operation(database_url, log_level, None, "dead-letters") as (_, console, conn, _partitions):
        letters = list_dead_letters(conn, include_discarded=include_discarded)
    if as_json:
        print(json.dumps(render.to_json(letters), indent=2))
    else:
        render.dead_letters_text(letters, console)


EventIdsArgument = Annotated[
    list[int] | None, typer.Argument(help="Event ids (see `dead-letters list`).", show_default=False)
]


def _act_on_dead_letters(
    action: str,
    event_ids: list[int] | None,
    all_: bool,
    database_url: str | None,
    partition: int | None,
    log_level: str,
) -> None:
    """Run retry or discard on the chosen dead letters; exit 1 if any did not succeed."""
    from processor import dead_letters

    if not event_ids and not all_:
        raise typer.BadParameter("give one or more event ids (or --all, for retry)")
    run_action = dead_letters.retry if action == "retry" else dead_letters.discard
    success = dead_letters.APPLIED if action == "retry" else dead_letters.DISCARDED
    with _operation(database_url, log_level, partition, "dead-letters") as (settings, console, conn, _partitions):
        if all_:
            event_ids = [letter.event_id for letter in dead_letters.list_dead_letters(conn, limit=1_000_000)]
        chosen = event_ids or []
        if settings.partition is not None:
            by_partition = dead_letters.partitions_of(conn, chosen)
            outcomes = {
                e: "not a dead letter of the partition given"
                for e in chosen
                if by_partition.get(e) != settings.partition
            }
            chosen = [e for e in chosen if e not in outcomes]
        else:
            outcomes = {}
        outcomes.update(run_action(conn, chosen) if chosen else {})
    render.outcomes_text(event_ids or [], outcomes, console)
    if any(outcome != success for outcome in outcomes.values()):
        raise SystemExit(1)


@dead_letters_app.command("retry")
def dead_letters_retry(
    event_ids: EventIdsArgument = None,
    all_: Annotated[bool, typer.Option("--all", help="Retry every dead letter.")] = False,
    database_url: DatabaseOption = None,
    partition: PartitionOption = None,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Apply dead letters again (after fixing their payload, the pipeline setting or the worker)."""
    _act_on_dead_letters("retry", event_ids, all_, database_url, partition, log_level)


@dead_letters_app.command("discard")
def dead_letters_discard(
    event_ids: EventIdsArgument = None,
    database_url: DatabaseOption = None,
    partition: PartitionOption = None,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Ignore dead letters for good: their jobs are rebuilt without them."""
    _act_on_dead_letters("discard", event_ids, False, database_url, partition, log_level)


@app.command()
def prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age of applied events to remove: 90s, 30m, 12h, 7d, 2w.")
    ],
    database_url: DatabaseOption = None,
    log_level: LogLevelOption = "WARNING",
    partition: Annotated[
        int | None, typer.Option("--partition", hidden=True, help="Ignored: segments hold every partition's events.")
    ] = None,
) -> None:
    """Remove applied events and acknowledged transitions older than a duration, by whole segments;
    replay stays correct (it starts from a baseline)."""
    from processor.retention import parse_duration, retain

    if partition is not None:  # accepted so that a scheduled `prune --partition N` of an older version goes on
        Console(stderr=True).print(
            "prune acts on every partition (the outbox's segments hold every partition's events): "
            "--partition is ignored"
        )

    try:
        age = parse_duration(older_than)
    except OutboxError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    # Segments hold every partition's events: prune acts on all partitions, whatever OUTBOX_PARTITION says.
    with _operation(database_url, log_level, None, "prune") as (_, console, conn, _partitions):
        # Transient: the live count goes away at the end; the summary below stays.
        progress = Progress(
            TextColumn("pruning"),
            TextColumn("{task.completed:,} events folded"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        with progress:
            task = progress.add_task("pruning", total=None)
            report = retain(conn, age, on_events=lambda n: progress.advance(task, n))
    console.print(render.prune_summary(older_than, report))


def main() -> None:
    """Run the CLI; every error is one line on stderr (usage errors exit 2, others 1)."""
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="outbox", standalone_mode=False)
    except typer.Abort:
        _fail("interrupted", code=130)
    except typer.TyperException as exc:  # command-line errors (typer's click): usage errors exit 2
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help(), file=sys.stderr)
            raise SystemExit(2) from None
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        message += _from_environment(exc)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(" ".join(message.split()) + hint, code=getattr(exc, "exit_code", 2))
    except psycopg.Error as exc:  # first: DatabaseUnavailableError is an OutboxError too, worded as the driver's
        _fail(f"database error: {_describe(exc)}")
    except OutboxError as exc:  # outbox.errors: the product's own, subscriptions' included
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    raise SystemExit(code if isinstance(code, int) else 0)


def _from_environment(exc: Exception) -> str:
    """Name the variable when a bad value came from the environment, not the command line."""
    # Typer's click (bundled in newer typer): read by attribute, not imported.
    param, ctx = getattr(exc, "param", None), getattr(exc, "ctx", None)
    name, envvar = getattr(param, "name", None), getattr(param, "envvar", None)
    if ctx is None or not name or not envvar:
        return ""
    source = ctx.get_parameter_source(name)
    if getattr(source, "name", None) != "ENVIRONMENT":
        return ""
    return f" (from {envvar if isinstance(envvar, str) else envvar[0]})"


def _describe(exc: BaseException) -> str:
    """The exception and its causes, one line, password scrubbed."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).strip().splitlines()[0] if str(seen).strip() else type(seen).__name__
        parts.append(text)
        seen = seen.__cause__
    return redact(": ".join(parts), _env_db())


def _env_db() -> DatabaseUrl | None:
    import os

    raw = os.environ.get("OUTBOX_DATABASE_URL")
    try:
        return DatabaseUrl.parse(raw) if raw else None
    except OutboxError:
        return None


def _fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    if _json_requested():  # a --json caller always gets a document on stdout
        print(json.dumps({"ok": False, "error": message}))
    raise SystemExit(code)


cli_transitions.register(app)

if __name__ == "__main__":
    main()
