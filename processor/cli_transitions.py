"""The `outbox transitions`, `outbox subscriptions ...`, `outbox deliver` and `outbox subscribe` commands.

processor.cli registers them on the main app (``register``).
"""

from __future__ import annotations

import importlib
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console

from outbox.subscriber import Subscriber
from outbox.subscription import RetryPolicy
from processor import render, store, subscriptions
from processor.cli_common import DatabaseOption, JsonOption, LogLevelOption, setup, stop_on_signals
from processor.database import DatabaseUrl, connect
from processor.errors import ConfigurationError, SubscriptionError
from processor.migrate import check_ready
from processor.worker import application_name

NameArgument = Annotated[str, typer.Argument(help="The subscription's name.", show_default=False)]
SessionTimeoutOption = Annotated[
    float,
    typer.Option(
        "--session-timeout",
        min=1,
        help="Seconds after which the server ends this consumer's idle (or frozen) session, so that a standby "
        "takes over; each transition must be handled within it.",
    ),
]
StandbyIntervalOption = Annotated[
    float, typer.Option("--standby-interval", min=0.05, help="Seconds between a standby's tries to become active.")
]


def transitions(
    job: Annotated[str | None, typer.Option("--job", help="Only this job's transitions.", show_default=False)] = None,
    after: Annotated[int, typer.Option("--after", min=0, help="Only transitions with a higher id.")] = 0,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (without --follow).")] = 1000,
    follow: Annotated[bool, typer.Option("--follow", help="Keep printing new transitions (Ctrl-C ends).")] = False,
    as_json: JsonOption = False,
    database_url: DatabaseOption = None,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """List job transitions in order (one JSON object per line with --json)."""
    job_id = _uuid(job, "--job") if job is not None else None
    with _ready(database_url, log_level, "transitions") as (_db, console, conn):
        while True:
            page = subscriptions.transitions(conn, after=after, job_id=job_id, limit=limit)
            for transition in page:
                if as_json:
                    print(transition.to_json_text(), flush=True)
                else:
                    console.print(render.transition_line(transition))
                after = transition.transition_id
            if not follow:
                return
            if len(page) < limit:
                store.transitions_listen(conn)
                for _ in conn.notifies(timeout=1.0, stop_after=1):
                    pass


subscriptions_app = typer.Typer(
    help="Durable subscriptions to job transitions: create, list, reset, drop, failures, retry.",
    no_args_is_help=True,
)


@subscriptions_app.command("create")
def subscriptions_create(
    name: NameArgument,
    from_: Annotated[
        str, typer.Option("--from", help="start: every transition kept; now: those written from now on.")
    ] = "now",
    status: Annotated[
        str | None,
        typer.Option("--status", help="Only transitions to these statuses (comma-separated).", show_default="all"),
    ] = None,
    database_url: DatabaseOption = None,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Create a subscription (its consumer: outbox.Subscriber, or `outbox deliver`)."""
    if from_ not in ("start", "now"):
        raise typer.BadParameter(f"must be start or now (got {from_!r})", param_hint="--from")
    statuses = subscriptions.parse_statuses(status)
    with _ready(database_url, log_level, "subscriptions") as (_db, console, conn):
        position = subscriptions.create(conn, name, from_start=from_ == "start", to_statuses=statuses)
    console.print(f"subscription {name} created at position {position}"
                  + (f", transitions to {', '.join(statuses)}" if statuses else ""))  # fmt: skip


@subscriptions_app.command("list")
def subscriptions_list(
    as_json: JsonOption = False, database_url: DatabaseOption = None, log_level: LogLevelOption = "WARNING"
) -> None:
    """Each subscription with its position, lag, and failed transitions."""
    with _ready(database_url, log_level, "subscriptions") as (_db, console, conn):
        found = subscriptions.list_subscriptions(conn)
    if as_json:
        print(json.dumps(render.to_json(found), indent=2))
    else:
        render.subscriptions_text(found, console)


@subscriptions_app.command("reset")
def subscriptions_reset(
    name: NameArgument,
    to: Annotated[str, typer.Option("--to", help="start, now, or a transition id (delivered from the next one).")],
    database_url: DatabaseOption = None,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Move a subscription's position (its failures are forgotten); its consumer goes on from there."""
    with _ready(database_url, log_level, "subscriptions") as (_db, console, conn):
        position = subscriptions.reset(conn, name, to)
    console.print(f"subscription {name} now at position {position}")


@subscriptions_app.command("drop")
def subscriptions_drop(
    name: NameArgument, database_url: DatabaseOption = None, log_level: LogLevelOption = "WARNING"
) -> None:
    """Remove a subscription (prune no longer keeps transitions for it)."""
    with _ready(database_url, log_level, "subscriptions") as (_db, console, conn):
        subscriptions.drop(conn, name)
    console.print(f"subscription {name} dropped")


@subscriptions_app.command("failures")
def subscriptions_failures(
    name: NameArgument, as_json: JsonOption = False, database_url: DatabaseOption = None,
    log_level: LogLevelOption = "WARNING",
) -> None:  # fmt: skip
    """Transitions the subscription's handler failed on: being retried, or parked with their error."""
    with _ready(database_url, log_level, "subscriptions") as (_db, console, conn):
        found = subscriptions.failures(conn, name)
    if as_json:
        print(json.dumps(render.to_json(found), indent=2))
    else:
        render.failures_text(found, console)


@subscriptions_app.command("retry")
def subscriptions_retry(
    name: NameArgument,
    transition_id: Annotated[int | None, typer.Argument(help="One parked transition (default: all).")] = None,
    database_url: DatabaseOption = None,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Deliver parked transitions again (the consumer takes them before anything new)."""
    with _ready(database_url, log_level, "subscriptions") as (_db, console, conn):
        ids = subscriptions.retry(conn, name, transition_id)
    console.print(f"{len(ids)} parked transitions of {name} to be delivered again")
    if transition_id is not None and not ids:
        raise SystemExit(1)


def deliver(
    name: NameArgument,
    webhook: Annotated[str, typer.Option("--webhook", envvar="OUTBOX_WEBHOOK_URL", help="The http(s) URL to POST to.")],
    secret: Annotated[
        str | None,
        typer.Option(
            "--secret",
            envvar="OUTBOX_WEBHOOK_SECRET",
            show_default=False,
            help="whsec_... (Standard Webhooks): sign each request. Prefer the variable: "
            "a command line is visible to other users.",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for each answer.")] = 10.0,
    max_attempts: Annotated[
        int, typer.Option("--max-attempts", min=1, help="Attempts per transition before it is parked.")
    ] = 10,
    max_delay: Annotated[
        float, typer.Option("--max-delay", min=0, help="Longest wait between attempts, seconds.")
    ] = 300.0,
    until_idle: Annotated[bool, typer.Option("--until-idle", help="Deliver what there is, then exit.")] = False,
    session_timeout: SessionTimeoutOption = 60.0,
    standby_interval: StandbyIntervalOption = 5.0,
    database_url: DatabaseOption = None,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Deliver a subscription's transitions as signed HTTP POSTs (Standard Webhooks), at least once, in order."""
    from processor.webhooks import Webhook

    _, db, console = setup(database_url, log_level)
    if timeout >= session_timeout / 2:
        raise typer.BadParameter(
            f"must be below half of --session-timeout ({session_timeout:g} s)", param_hint="--timeout"
        )
    try:
        target = Webhook.parse(webhook, secret, timeout)
        policy = RetryPolicy(max_attempts=max_attempts, first_delay=min(1.0, max_delay), max_delay=max_delay)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    with connect(db, application_name=application_name("deliver")) as conn:
        check_ready(conn)
        if not subscriptions.list_subscriptions(conn, subscriptions.checked_name(name)):
            raise SubscriptionError(
                f"no subscription named {name!r}; create it with `outbox subscriptions create {name}`"
            )
    subscriber = _subscriber(
        name, db.url.render_as_string(hide_password=False), target.handler(), retry=policy,
        application_name=application_name("deliver"), session_timeout=session_timeout,
        standby_interval=standby_interval, per_transaction=1,  # a POST is not repeated for another's failure
    )  # fmt: skip
    if until_idle:
        count = subscriber.run_until_idle()
        console.print(f"{count} transitions delivered, {subscriber.parked} parked")
        return
    with stop_on_signals(subscriber):
        subscriber.run()


def subscribe(
    name: NameArgument,
    handler: Annotated[
        str,
        typer.Option(
            "--handler",
            help="module:function, called as function(connection, transition) in the "
            "acknowledging transaction (psycopg connection).",
        ),
    ],
    until_idle: Annotated[bool, typer.Option("--until-idle", help="Deliver what there is, then exit.")] = False,
    max_attempts: Annotated[
        int, typer.Option("--max-attempts", min=1, help="Attempts per transition before it is parked.")
    ] = 10,
    session_timeout: SessionTimeoutOption = 60.0,
    standby_interval: StandbyIntervalOption = 5.0,
    database_url: DatabaseOption = None,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Run a subscription's consumer as a process, with a handler of yours (SIGTERM: finish the transition, exit 0)."""
    function = _import_handler(handler)
    with _ready(database_url, log_level, "subscribe") as (db, console, _conn):
        pass  # checked: migrated, and reachable with these credentials
    subscriber = _subscriber(
        name, db.url.render_as_string(hide_password=False), function,
        retry=RetryPolicy(max_attempts=max_attempts), application_name=application_name("subscribe"),
        session_timeout=session_timeout, standby_interval=standby_interval,
    )  # fmt: skip
    if until_idle:
        count = subscriber.run_until_idle()
        console.print(f"{count} transitions handled, {subscriber.parked} parked")
        return
    with stop_on_signals(subscriber):
        subscriber.run()


@contextmanager
def _ready(database_url: str | None, log_level: str, command: str) -> Iterator[tuple[DatabaseUrl, Console, Any]]:
    """Settings, logging and a connection to a database the product has migrated (else one line, exit 1)."""
    _, db, console = setup(database_url, log_level)
    with connect(db, application_name=application_name(command)) as conn:
        check_ready(conn)
        yield db, console, conn


def _subscriber(*args: Any, **kwargs: Any) -> Subscriber:
    try:
        return Subscriber(*args, **kwargs)
    except ValueError as exc:  # settings that do not fit together (session timeout vs intervals)
        raise ConfigurationError(str(exc)) from None


def _import_handler(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise typer.BadParameter(f"expected module:function (got {spec!r})", param_hint="--handler")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise typer.BadParameter(f"cannot import {module_name!r}: {exc}", param_hint="--handler") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise typer.BadParameter(f"{module_name} has no function {attribute!r}", param_hint="--handler")
    return function


def _uuid(value: str, hint: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise typer.BadParameter(f"not a UUID: {value!r}", param_hint=hint) from None


def register(app: typer.Typer) -> None:
    app.command()(transitions)
    app.add_typer(subscriptions_app, name="subscriptions")
    app.command()(deliver)
    app.command()(subscribe)
