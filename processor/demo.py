"""`outbox demo`: drive jobs through the pipeline from concurrent writers while the worker runs."""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import outbox
from processor import store, subscriptions, workload
from processor.batch import BatchResult
from processor.database import DatabaseUrl, connect
from processor.errors import SubscriptionError
from processor.settings import Settings
from processor.worker import Worker, application_name


@dataclass(frozen=True)
class DemoOptions:
    jobs: int = 200
    min_variants: int = 3
    max_variants: int = 12
    writers: int = 8
    fail_rate: float = 0.05
    seed: int | None = None


@dataclass
class DemoReport:
    jobs: int
    jobs_done: int
    jobs_stuck: int
    updates_written: int
    events_processed: int
    seconds: float
    latencies: list[float] = field(repr=False)
    # A subscription reacting to jobs becoming done or failed (outbox.Subscriber): one reaction per
    # job finished, and the time from the variant update that finished it to the handler's call.
    reactions: int = 0
    reaction_latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def events_per_second(self) -> float:
        return self.events_processed / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, float | int]:
        return {
            "jobs": self.jobs,
            "jobs_done": self.jobs_done,
            "jobs_stuck": self.jobs_stuck,
            "variant_updates_written": self.updates_written,
            "events_processed": self.events_processed,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events_per_second, 1),
            **{f"latency_p{q}_ms": round(self.latency_ms(q), 1) for q in (50, 95, 99)},
            "latency_max_ms": round(self.latency_ms(100), 1),
            "reactions": self.reactions,
            **{f"reaction_latency_p{q}_ms": round(self.latency_ms(q, self.reaction_latencies), 1) for q in (50, 99)},
        }

    def latency_ms(self, q: float, latencies: list[float] | None = None) -> float:
        latencies = self.latencies if latencies is None else latencies
        if len(latencies) < 2:
            return 1000 * max(latencies, default=0.0)
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        return 1000 * (max(latencies) if q >= 100 else cuts[int(q) - 1])


class _Observations:
    """What the worker, the subscriber and the writers report while the demo runs (each from its thread)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.applied = 0
        self.last_write: dict[uuid.UUID, float] = {}  # each job's last variant update, committed at (wall clock)
        self.reactions: dict[uuid.UUID, float] = {}  # job -> seconds from that update to the handler's call

    def on_batch(self, result: BatchResult) -> None:
        self.applied += result.events
        self.latencies.extend(result.latencies)

    def on_write(self, jobs: Iterable[uuid.UUID]) -> None:
        now = time.time()
        self.last_write.update(dict.fromkeys(jobs, now))

    def react(self, _conn: object, transition: outbox.Transition) -> None:
        now = time.time()
        self.reactions.setdefault(transition.job_id, now - self.last_write.get(transition.job_id, now))


class _Background:
    """The worker and the subscriber, each in its own thread for the length of the demo."""

    def __init__(self, settings: Settings, db: DatabaseUrl, engine: sqlalchemy.Engine, seen: _Observations) -> None:
        self.worker = Worker(settings, db, on_batch=seen.on_batch)
        self.worker_errors: list[BaseException] = []
        self.worker_thread = threading.Thread(target=self._work, name="outbox-worker", daemon=True)
        self.subscriber = outbox.Subscriber("outbox-demo", engine, seen.react, poll_interval=0.5)
        self.subscriber_thread = threading.Thread(target=self.subscriber.run, name="outbox-subscriber", daemon=True)

    def _work(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.worker_errors.append(exc)

    def start(self) -> None:
        self.worker_thread.start()
        self.subscriber_thread.start()

    def check_worker(self, deadline: float) -> None:
        """Raise if the worker failed, stopped, or has not drained by ``deadline``."""
        if self.worker_errors:
            raise self.worker_errors[0]
        if time.monotonic() > deadline or not self.worker_thread.is_alive():
            raise RuntimeError("the worker did not drain the outbox")

    def stop(self) -> None:
        self.subscriber.stop()
        if self.subscriber_thread.is_alive():
            self.subscriber_thread.join(timeout=30)
        self.worker.stop()
        if self.worker_thread.is_alive():
            self.worker_thread.join(timeout=30)


def run_demo(
    settings: Settings, db: DatabaseUrl, steps: tuple[str, ...], options: DemoOptions, console: Console
) -> DemoReport:
    rng = random.Random(options.seed)
    engine = db.create_engine(pool_size=options.writers + 3, max_overflow=0)
    seen = _Observations()
    _subscribe_from_now(db)
    background = _Background(settings, db, engine, seen)
    started = time.monotonic()
    background.start()
    try:
        jobs = workload.create_jobs(engine, options.jobs, rng, variants=(options.min_variants, options.max_variants))
        job_of = {variant: job for job, variants in jobs.items() for variant in variants}
        walks = {variant: workload.pipeline_walk(steps, options.fail_rate, rng) for variant in job_of}
        total_updates = sum(len(moves) for moves in walks.values())
        writers = workload.WalkWriters(
            db,
            engine,
            walks,
            writers=options.writers,
            seed=rng.random(),
            vias=("plain-sql", "sqlalchemy-api"),  # half the writers plain SQL (the trigger path), half the API
            on_commit=lambda variants: seen.on_write(job_of[v] for v in variants),
        ).start()
        with _progress(console) as progress, connect(db, application_name=application_name("demo")) as watch:
            bars = _Bars(progress, total_updates, total_updates + len(walks), len(jobs))
            summary = _follow_until_drained(watch, settings, list(jobs), steps[-1], writers, background, seen, bars)
            seconds = time.monotonic() - started
            if writers.errors:
                raise writers.errors[0]
            _follow_reactions(progress, seen, summary.done, background)
        return DemoReport(
            summary.total,
            summary.done,
            summary.stuck,
            writers.counts["committed"],
            seen.applied,
            seconds,
            seen.latencies,
            len(seen.reactions),
            list(seen.reactions.values()),
        )
    finally:
        background.stop()
        engine.dispose()


def _subscribe_from_now(db: DatabaseUrl) -> None:
    """Subscribe to jobs done or failed from now: a demo run again on a database reacts to its own jobs only."""
    with connect(db, application_name=application_name("demo")) as conn:
        try:
            subscriptions.create(conn, "outbox-demo", from_start=False, to_statuses=["done", "failed"])
        except SubscriptionError:
            subscriptions.reset(conn, "outbox-demo", "now")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


class _Bars:
    """The progress bars of updates written, events applied and jobs done."""

    def __init__(self, progress: Progress, updates: int, events: int, jobs: int) -> None:
        self.progress = progress
        self.updates = progress.add_task("variant updates", total=updates)
        self.events = progress.add_task("events applied", total=events)
        self.done = progress.add_task("jobs done", total=jobs)

    def show(self, written: int, applied: int, done: int) -> None:
        self.progress.update(self.updates, completed=written)
        self.progress.update(self.events, completed=applied)
        self.progress.update(self.done, completed=done)


def _follow_until_drained(
    watch: psycopg.Connection[Any],
    settings: Settings,
    job_ids: list[uuid.UUID],
    final_step: str,
    writers: workload.WalkWriters,
    background: _Background,
    seen: _Observations,
    bars: _Bars,
) -> workload.JobsSummary:
    """Show the bars until the writers are done and the worker has applied everything; the jobs' summary then."""
    deadline: float | None = None
    while True:
        writers_busy = writers.busy
        # Known before the summary is read, so that the last summary follows the last batch.
        drained = not writers_busy and store.work_pending(watch, settings.partition) == 0
        summary = workload.jobs_summary(watch, job_ids, final_step)
        bars.show(writers.counts["committed"], seen.applied, summary.done)
        if drained:
            return summary
        if not writers_busy:
            # The worker drains in well under a second here; give up loudly if it does not.
            deadline = deadline or time.monotonic() + 120
            background.check_worker(deadline)
        time.sleep(0.1)  # screen refresh, not synchronisation


def _follow_reactions(progress: Progress, seen: _Observations, done: int, background: _Background) -> None:
    """Show the subscriber's reactions until one per job done (or a minute, or the subscriber stopped)."""
    task = progress.add_task("reactions (done/failed)", total=done)
    deadline = time.monotonic() + 60
    while len(seen.reactions) < done and time.monotonic() < deadline and background.subscriber_thread.is_alive():
        progress.update(task, completed=len(seen.reactions))
        time.sleep(0.05)  # screen refresh, not synchronisation
    progress.update(task, completed=len(seen.reactions))


def render_report(report: DemoReport, console: Console) -> None:
    table = Table(title="outbox demo", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("jobs", f"{report.jobs}")
    table.add_row("jobs done", f"{report.jobs_done}")
    table.add_row("jobs stuck", f"{report.jobs_stuck}", style="red" if report.jobs_stuck else "green")
    table.add_row("variant updates written", f"{report.updates_written}")
    table.add_row("events processed", f"{report.events_processed}")
    table.add_row("elapsed", f"{report.seconds:.2f} s")
    table.add_row("events/s", f"{report.events_per_second:,.0f}")
    for q in (50, 95, 99):
        table.add_row(f"commit-to-job-state latency p{q}", f"{report.latency_ms(q):.1f} ms")
    table.add_row("commit-to-job-state latency max", f"{report.latency_ms(100):.1f} ms")
    table.add_row("reactions to done/failed", f"{report.reactions}",
                  style="green" if report.reactions == report.jobs_done else "red")  # fmt: skip
    for q in (50, 99):
        table.add_row(f"commit-to-reaction latency p{q}", f"{report.latency_ms(q, report.reaction_latencies):.1f} ms")
    console.print(table)
