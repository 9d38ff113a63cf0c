"""pg_dump / pg_restore into a fresh cluster (transaction ids start over): the worker neither skips
events nor stalls, and pending work from before the dump still takes effect."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql

import outbox
from processor.database import DatabaseUrl, connect
from processor.verify import verify
from tests.fix_database import make_settings
from tests.helpers import drain, pending_work
from tests.reference import actual_job_states, reference_job_states
from tests.reliability.fix_server import OwnedServer, bundled_bindir, running_server, skip_reason

STEPS = ("ingest", "detect", "segment", "iou_eval")
MOVE = "UPDATE jobs_variants SET status = %s, current_step = %s WHERE job_id = %s"


def _major(version_text: str) -> int:
    """16 from "postgres (PostgreSQL) 16.2", 15 from "postgres (PostgreSQL) 15.20 (Debian ...)"."""
    found = re.search(r"\(PostgreSQL\)\s+(\d+)", version_text)
    return int(found.group(1)) if found else -1


@pytest.fixture
def own_server(server_url: DatabaseUrl) -> Iterator[OwnedServer]:
    """A second cluster of the session server's major version, whose pg_dump can read the first."""
    with connect(server_url, application_name="outbox-tests") as conn:
        major = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000  # type: ignore[index]
    candidates = [os.environ.get("OUTBOX_TEST_PG_BINDIR"), f"/usr/lib/postgresql/{major}/bin", str(bundled_bindir())]
    for candidate in filter(None, candidates):
        bindir = Path(candidate)
        postgres = bindir / "postgres"
        if postgres.is_file() and skip_reason(bindir) is None:
            found = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, check=False)
            if found.returncode == 0 and _major(found.stdout) == major:
                with running_server(bindir) as server:
                    yield server
                return
    pytest.skip(f"no PostgreSQL {major} binaries here (pg_dump, and a second cluster to restore into)")


def _pg_tool(server: OwnedServer, name: str) -> str:
    return str(server.bindir / name)


def dump_and_restore(db: DatabaseUrl, own_server: OwnedServer, tmp_path: Path, name: str) -> DatabaseUrl:
    """pg_dump ``db`` (the shared server) and pg_restore it as ``name`` into the test's own cluster."""
    dump = tmp_path / f"{name}.dump"
    source = db.url.render_as_string(hide_password=False).replace("postgresql+psycopg", "postgresql")
    subprocess.run([_pg_tool(own_server, "pg_dump"), "-Fc", "-f", str(dump), "-d", source], check=True, timeout=120)
    with connect(own_server.url, application_name="setup") as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    restored = DatabaseUrl(own_server.url.url.set(database=name))
    target = restored.url.render_as_string(hide_password=False).replace("postgresql+psycopg", "postgresql")
    subprocess.run(
        [_pg_tool(own_server, "pg_restore"), "--no-owner", "--exit-on-error", "-d", target, str(dump)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    return restored


def burn_transaction_ids(db: DatabaseUrl, count: int) -> None:
    """Move the server's transaction counter ``count`` ids on (each subtransaction that writes takes one)."""
    with connect(db, application_name="outbox-tests") as conn:
        conn.execute(
            "CREATE TEMP TABLE burn (i int);"
            f"DO $$ BEGIN FOR i IN 1..{int(count)} LOOP BEGIN INSERT INTO burn VALUES (i); "
            "EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$"
        )


def test_restore_into_a_fresh_cluster_neither_skips_nor_stalls(db, engine, own_server, tmp_path):
    # The source cluster's transaction ids run well ahead of the fresh one's, as in production
    # (a fresh test server may have done fewer transactions than the restore itself does).
    burn_transaction_ids(db, 5000)
    with engine.begin() as conn:
        jobs = [outbox.create_job(conn, variants=3)[0] for _ in range(30)]
    with connect(db, application_name="writer") as conn:
        for job in jobs[:10]:
            conn.execute(MOVE, ["done", "iou_eval", job])
        drain(make_settings(db))  # applied before the dump
        for job in jobs[10:20]:
            conn.execute(MOVE, ["running", "segment", job])  # pending at dump time
        source_xmax = int(conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()[0])

    restored = dump_and_restore(db, own_server, tmp_path, "restored")

    with connect(restored, application_name="writer") as conn:
        cluster_xmax = int(conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()[0])
        assert cluster_xmax < source_xmax  # the new cluster's transaction ids are behind the dump's
        for job in jobs[20:]:
            conn.execute(MOVE, ["failed", "detect", job])  # written after the restore, before the worker
        settings = make_settings(restored)
        drain(settings)
        assert pending_work(conn) == 0
        assert actual_job_states(conn) == reference_job_states(conn, STEPS)

        # And it keeps going: new events after the rebase are applied, nothing stalls.
        for job in jobs[:15]:
            conn.execute(MOVE, ["running", "ingest", job])
        stats = drain(settings)
        assert stats.events == 45
        assert actual_job_states(conn) == reference_job_states(conn, STEPS)
        assert not verify(conn).drift
    print(
        f"\nrestore: dump taken at xid {source_xmax}, restored into a cluster at xid {cluster_xmax}; "
        "pending and post-restore events applied after the rebase, later events applied normally"
    )


def test_an_interrupted_rebase_is_finished_by_the_next_start(db, engine, own_server, tmp_path, monkeypatch):
    from processor import rebase

    with engine.begin() as conn:
        jobs = [outbox.create_job(conn, variants=2)[0] for _ in range(5)]
    drain(make_settings(db))  # the checkpoint now belongs to the source cluster
    with connect(db, application_name="writer") as conn:
        for job in jobs:
            conn.execute(MOVE, ["done", "iou_eval", job])  # pending at dump time
    restored = dump_and_restore(db, own_server, tmp_path, "restored2")

    def crash(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("crash between the rebase's two phases")

    settings = make_settings(restored)
    monkeypatch.setattr(rebase, "replay", crash)  # fault injection: the process dies after phase 1
    with pytest.raises(RuntimeError, match="crash between"):
        drain(settings)
    monkeypatch.undo()
    drain(settings)
    with connect(restored, application_name="checker") as conn:
        assert conn.execute("SELECT rebase_pending FROM outbox_checkpoints").fetchone()[0] is False
        assert actual_job_states(conn) == reference_job_states(conn, STEPS)
        assert {status for status, _ in actual_job_states(conn).values()} == {"done"}
