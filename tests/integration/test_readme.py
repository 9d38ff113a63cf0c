"""The Python blocks of README.md and docs/*.md run as written, against a real database.

As eventsourcing's docs tests: each document's unmarked ```python blocks run in order in one
namespace, as a reader would type them one after the other, with what the prose says they assume:
`engine` (SQLAlchemy, psycopg driver), `async_engine` (SQLAlchemy, asyncpg driver), `database_url`,
a `notifications` table and the subscription `notify-done` (`outbox subscriptions create notify-done
--status done,failed`). A block that fails fails the test with its place in the document; a block
that is not meant to run says why in a marker (tests/markdown_blocks.py), and the lifespan block is
run by tests/integration/test_readme_lifespan.py alone.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from processor import subscriptions
from processor.database import connect
from tests.fix_database import TEST_STEPS
from tests.markdown_blocks import DOCUMENTS, ROOT, Block, blocks
from tests.reference import actual_job_states, reference_job_states


def runnable(path: Path) -> list[Block]:
    return [block for block in blocks(path) if block.language == "python" and block.marker is None]


@pytest.fixture
def reader(db: Any, conn: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The namespace the documents' blocks start from, on a fresh test database."""
    for name in [name for name in os.environ if name.startswith("OUTBOX_")]:
        monkeypatch.delenv(name)  # the blocks' settings come from what they pass, as in the docs
    monkeypatch.setenv("OUTBOX_STANDBY_INTERVAL", "0.1")
    url = db.url.render_as_string(hide_password=False)
    conn.execute("CREATE TABLE notifications (job_id uuid, status text)")
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "notify-done", from_start=False, to_statuses=["done", "failed"])
    engine = create_engine(db.url.set(drivername="postgresql+psycopg"), poolclass=NullPool)
    async_engine = create_async_engine(db.url.set(drivername="postgresql+asyncpg"), poolclass=NullPool)
    yield {"engine": engine, "async_engine": async_engine, "database_url": url, "__name__": "readme"}
    engine.dispose()
    asyncio.run(async_engine.dispose())


def run_blocks(path: Path, namespace: dict[str, Any]) -> int:
    """Run the document's unmarked Python blocks in order in ``namespace``; return how many ran."""
    ran = runnable(path)
    for block in ran:
        # Compiled with its place in the document, so a traceback points at the README's line.
        code = compile("\n" * block.line + block.code, str(block.path.relative_to(ROOT)), "exec")
        exec(code, namespace)
    return len(ran)


def test_the_readme_python_blocks_run_in_order_and_do_what_they_say(reader: dict[str, Any], conn: Any) -> None:
    assert run_blocks(ROOT / "README.md", reader) >= 3
    # The writing block finished both variants of its job, the worker block folded it, and the
    # subscriber block reacted to it becoming done: once.
    job_id = reader["job_id"]
    assert conn.execute("SELECT status, current_step FROM jobs WHERE job_id = %s", [job_id]).fetchone() == (
        "done",
        "iou_eval",
    )
    assert conn.execute("SELECT job_id, status FROM notifications").fetchall() == [(job_id, "done")]
    assert actual_job_states(conn) == reference_job_states(conn, TEST_STEPS)


@pytest.mark.parametrize("path", [p for p in DOCUMENTS if p.name != "README.md"], ids=lambda p: p.name)
def test_the_docs_python_blocks_run(reader: dict[str, Any], path: Path) -> None:
    run_blocks(path, reader)  # each document in a namespace of its own; a marked block is not run
