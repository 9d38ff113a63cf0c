"""The README's lifespan example ("Embedding the worker"), run as written.

The block is taken from README.md by its marker comment and run against a real database; the
lifespan is driven as an ASGI server drives it (enter at start-up, exit at shutdown), with no web
framework installed: the example needs none.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from outbox.subscription import SUBSCRIBER_LOCK_CLASS, SubscriberState
from processor import store, subscriptions
from processor.database import connect
from processor.service import WorkerState
from tests.fix_database import TEST_STEPS
from tests.helpers import finish_jobs, wait_for, wait_for_async
from tests.reference import actual_job_states, reference_job_states

MARKER = "# README example: lifespan"
README = Path(__file__).parents[2] / "README.md"


def readme_block(marker: str) -> str:
    blocks = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if marker in block]
    assert len(blocks) == 1, f"README.md has {len(blocks)} python blocks marked {marker!r}"
    return blocks[0]


def test_the_readme_lifespan_example_runs_the_worker_and_a_subscriber_and_stops_both(db, conn, engine, monkeypatch):
    for name in [name for name in os.environ if name.startswith("OUTBOX_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OUTBOX_DATABASE_URL", db.url.render_as_string(hide_password=False))
    monkeypatch.setenv("OUTBOX_STANDBY_INTERVAL", "0.1")  # what the example leaves to the environment
    conn.execute("CREATE TABLE notifications (job_id uuid, status text)")
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "notify-done", from_start=False, to_statuses=["done", "failed"])
    example: dict[str, Any] = {}
    exec(compile(readme_block(MARKER), "README.md (lifespan example)", "exec"), example)
    app = SimpleNamespace(state=SimpleNamespace())  # what the example uses of a Starlette app
    lifespan, outbox_health = example["lifespan"], example["outbox_health"]

    def notified() -> int:
        return int(conn.execute("SELECT count(*) FROM notifications").fetchone()[0])

    async def serve() -> tuple[int, dict[str, Any]]:
        async with lifespan(app):

            async def healthy() -> bool:
                return outbox_health(app)[0] == 200

            await wait_for_async(healthy, what="the worker and the subscriber to be up")
            await asyncio.to_thread(finish_jobs, engine, 10)

            async def reacted() -> bool:
                return await asyncio.to_thread(notified) == 10

            await wait_for_async(reacted, what="a reaction to each finished job")
            return outbox_health(app)

    status, body = asyncio.run(serve())
    assert status == 200
    assert body["worker"]["state"] == "active" and body["worker"]["partitions"] == [0] and body["worker"]["ok"]
    assert json.loads(json.dumps(body)) == body  # plain JSON
    assert body["worker"]["events"] == 40
    assert body["subscriber"]["state"] == "active" and body["subscriber"]["delivered"] == 10

    # Shut down: both stopped, their locks released, nothing handled twice, job state right.
    worker, subscriber = app.state.outbox_worker, app.state.outbox_subscriber
    assert worker.health().state is WorkerState.STOPPED
    assert subscriber.health().state is SubscriberState.STOPPED
    assert outbox_health(app)[0] == 503

    def locks_held() -> int:
        return int(
            conn.execute(
                # This test's database only: advisory locks of other databases' workers show in pg_locks too.
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND (classid = %s::oid AND objsubid = 2 OR classid = %s::oid)",
                [store.CONSUMER_LOCK_CLASS, SUBSCRIBER_LOCK_CLASS],
            ).fetchone()[0]
        )

    # Released, or gone with the connection that held them: a backend ends a moment after its client
    # closed the connection, so the server is waited for (a session left open would fail this).
    try:
        wait_for(lambda: locks_held() == 0, timeout=5, what="the consumers' locks to be released")
    except AssertionError:
        holders = conn.execute(
            "SELECT l.classid, l.objid, l.objsubid, a.application_name, a.state, a.query FROM pg_locks l "
            "JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND a.datname = current_database()"
        ).fetchall()
        raise AssertionError(f"locks still held: {holders}") from None
    assert conn.execute("SELECT count(DISTINCT job_id), count(*) FROM notifications").fetchone() == (10, 10)
    assert actual_job_states(conn) == reference_job_states(conn, TEST_STEPS)
