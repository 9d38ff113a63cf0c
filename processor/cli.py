"""The `outbox` command: migrate, run, demo.

Every flag falls back to an OUTBOX_* environment variable (shown in --help). Errors print one line
with their cause and exit 1; a usage error exits 2.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Console

from processor.database import DatabaseUrl, RedactingFilter, connect, redact
from processor.errors import OutboxError
from processor.migrate import check_ready
from processor.migrate import migrate as run_migrations
from processor.settings import Settings, load_settings
from processor.worker import Worker, application_name

app = typer.Typer(
    name="outbox",
    help="Transactional-outbox processor: keeps each job's state in step with its variants.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="OUTBOX_DATABASE_URL",
        help="postgresql:// or postgresql+psycopg:// URL. Unset: an embedded PostgreSQL in the user's data directory.",
        show_default=False,
    ),
]
LogLevelOption = Annotated[
    str, typer.Option("--log-level", envvar="OUTBOX_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR.")
]


def _setup(database_url: str | None, log_level: str, **overrides: Any) -> tuple[Settings, DatabaseUrl, Console]:
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    settings = load_settings(database_url=database_url, **overrides)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    db = settings.database()
    handler.addFilter(RedactingFilter(db))
    console = Console(soft_wrap=True)  # long lines (URLs, trigger notes) stay whole in logs and pipes
    return settings, db, console


def _migrate(db: DatabaseUrl, console: Console, *, quiet: bool = False) -> None:
    with connect(db, application_name=application_name("migrate")) as conn:
        report = run_migrations(conn)
    for trigger, function in report.removed_triggers:
        console.print(
            f"removed legacy trigger {trigger} on jobs_variants (function {function} is kept): it wrote job "
            "state from variant counts, which loses updates under concurrent commits; the outbox processor "
            "now owns job state"
        )
    if report.applied:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in report.applied)
        console.print(f"migrated {db.redacted()}: applied {names}")
    elif not quiet:
        console.print(f"{db.redacted()} is up to date (schema version {report.already_applied})")


@app.command()
def migrate(database_url: DatabaseOption = None, log_level: LogLevelOption = "WARNING") -> None:
    """Create or adopt the jobs tables and install the outbox (idempotent)."""
    _, db, console = _setup(database_url, log_level)
    _migrate(db, console)


@app.command()
def run(
    database_url: DatabaseOption = None,
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="Exit 0 once nothing more can be processed right now.")
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option(envvar="OUTBOX_BATCH_SIZE", help="Events per transaction.", show_default="1000")
    ] = None,
    partition: Annotated[
        int | None, typer.Option(envvar="OUTBOX_PARTITION", help="Partition to consume.", show_default="0")
    ] = None,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Run the worker: apply outbox events to job state, one active worker per partition."""
    settings, db, console = _setup(database_url, log_level, batch_size=batch_size, partition=partition)
    if settings.database_url is None:
        _migrate(db, console, quiet=True)  # the embedded database is created and migrated on first use
    worker = Worker(settings, db)
    with _stop_on_signals(worker):
        stats = worker.run(until_idle=until_idle)
    console.print(
        f"processed {stats.events} events in {stats.batches} batches: "
        f"{stats.jobs_changed} job state changes, {stats.dead_letters} dead letters"
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
    import json

    from processor.demo import DemoOptions, render_report, run_demo

    if min_variants > max_variants:
        raise typer.BadParameter("must not exceed --max-variants", param_hint="--min-variants")
    settings, db, console = _setup(database_url, log_level)
    progress = Console(stderr=True, soft_wrap=True)  # stdout stays for the summary
    _migrate(db, progress, quiet=True)
    progress.print(
        f"demo on {db.redacted()}: {jobs} jobs x {min_variants}-{max_variants} variants, {writers} writers, "
        f"pipeline {' -> '.join(settings.pipeline_steps)}"
    )
    options = DemoOptions(jobs, min_variants, max_variants, writers, fail_rate, seed)
    report = run_demo(settings, db, options, progress)
    if as_json:
        print(json.dumps(report.summary(), indent=2))
    else:
        render_report(report, console)
    if report.jobs_stuck or report.jobs_done != report.jobs:
        raise OutboxError(f"{report.jobs_stuck} jobs stuck, {report.jobs - report.jobs_done} not done")


JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@app.command()
def backlog(
    database_url: DatabaseOption = None,
    partition: Annotated[
        int | None, typer.Option(envvar="OUTBOX_PARTITION", help="Partition to inspect.", show_default="0")
    ] = None,
    max_lag: Annotated[
        float | None,
        typer.Option(min=0, help="Exit 3 when the oldest pending event is older than this many seconds."),
    ] = None,
    as_json: JsonOption = False,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Show the event backlog: pending events, lag, the consumer, standbys, dead letters."""
    import json

    from processor.backlog import collect_backlog, render_backlog

    settings, db, console = _setup(database_url, log_level, partition=partition)
    with connect(db, application_name=application_name("backlog")) as conn:
        check_ready(conn)
        report = collect_backlog(conn, settings.partition)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        render_backlog(report, console)
    lag = report["oldest_pending_age_seconds"]
    if max_lag is not None and lag is not None and lag > max_lag:
        print(f"error: oldest pending event is {lag:.1f} s old, over --max-lag {max_lag:g}", file=sys.stderr)
        raise SystemExit(3)


@contextmanager
def _stop_on_signals(worker: Worker) -> Iterator[None]:
    """SIGTERM/SIGINT: finish the batch in hand, then return; a second signal aborts it."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        if worker.stopping:
            raise KeyboardInterrupt  # the open transaction rolls back with the connection
        logging.getLogger("processor").info("%s: stopping after the batch in hand", signal.Signals(signum).name)
        worker.stop()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main() -> None:
    try:
        app()
    except OutboxError as exc:
        _fail(str(exc))
    except psycopg.Error as exc:
        _fail(f"database error: {_describe(exc)}")
    except KeyboardInterrupt:
        _fail("interrupted", code=130)


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
    raise SystemExit(code)


if __name__ == "__main__":
    main()
