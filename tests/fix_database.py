"""Database fixtures: one PostgreSQL server per session, a fresh database per test.

The server is, in order of preference: OUTBOX_TEST_DATABASE_URL (a maintenance database on a
server where the tests may create databases; CI points it at the local server), a testcontainers
PostgreSQL when Docker is available, else a server of the session's own built from the embedded
server's binaries (pgserver ships them: nothing but Python is needed). A template database is migrated
once per session; each test gets a ``CREATE DATABASE ... TEMPLATE`` copy (as Procrastinate does).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy
from psycopg import sql

from processor.database import DatabaseUrl, connect
from processor.fold import Pipeline
from processor.migrate import migrate
from processor.settings import Settings, load_settings

# The pipeline of the test databases (the template is migrated with it; subprocess_env sets it).
TEST_STEPS = ("ingest", "detect", "segment", "iou_eval")

_counter = itertools.count()


def _docker_available() -> bool:
    """Whether a Docker engine answers (testcontainers needs one; these CI machines have none)."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False  # checked first: a client that fails to connect leaks its socket
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def server_url() -> Iterator[DatabaseUrl]:
    """A maintenance database URL on the session's PostgreSQL server."""
    raw = os.environ.get("OUTBOX_TEST_DATABASE_URL")
    if raw:
        yield DatabaseUrl.parse(raw)
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as container:
            yield DatabaseUrl.parse(container.get_connection_url())
        return
    # The embedded server's binaries, as a server of the session's own that listens on TCP: the
    # tests that need TCP (a proxy, PgBouncer) or client tools of the same version (pg_dump) run
    # on it as on any server. (The embedded server itself, as users get it, is tested by the tests
    # marked `embedded`.)
    from tests.reliability.fix_server import bundled_bindir, running_server

    with running_server(bundled_bindir(), host_auth="trust", max_connections=200) as server:  # as CI's local server
        yield server.url


def _admin(server: DatabaseUrl) -> psycopg.Connection[Any]:
    return connect(server, application_name="outbox-tests", autocommit=True)


def create_database(server: DatabaseUrl, name: str, template: str | None = None) -> DatabaseUrl:
    with _admin(server) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(query)
    return DatabaseUrl(server.url.set(database=name))


def drop_database(server: DatabaseUrl, name: str) -> None:
    with _admin(server) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def template_db(server_url: DatabaseUrl) -> Iterator[str]:
    name = f"outbox_tpl_{os.getpid()}"
    drop_database(server_url, name)
    db = create_database(server_url, name)
    with connect(db, application_name="outbox-tests") as conn:
        migrate(conn, pipeline=Pipeline(TEST_STEPS))
    yield name
    drop_database(server_url, name)


@pytest.fixture
def empty_db(server_url: DatabaseUrl) -> Iterator[DatabaseUrl]:
    """A fresh database with nothing installed (for adoption and legacy tests)."""
    name = f"outbox_t_{os.getpid()}_{next(_counter)}"
    yield create_database(server_url, name)
    drop_database(server_url, name)


@pytest.fixture
def db(server_url: DatabaseUrl, template_db: str) -> Iterator[DatabaseUrl]:
    """A fresh, migrated database for one test."""
    name = f"outbox_t_{os.getpid()}_{next(_counter)}"
    yield create_database(server_url, name, template=template_db)
    drop_database(server_url, name)


@pytest.fixture
def settings(db: DatabaseUrl) -> Settings:
    return make_settings(db)


def make_settings(db: DatabaseUrl, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db.url.render_as_string(hide_password=False),
        "pipeline_steps": "ingest,detect,segment,iou_eval",
        "poll_interval_min": 0.002,
        "poll_interval_max": 0.05,
        "standby_interval": 0.2,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def conn(db: DatabaseUrl) -> Iterator[psycopg.Connection[Any]]:
    with connect(db, application_name="outbox-tests", autocommit=True) as connection:
        yield connection


@pytest.fixture
def engine(db: DatabaseUrl) -> Iterator[sqlalchemy.Engine]:
    eng = db.create_engine(pool_size=12, max_overflow=4)
    yield eng
    eng.dispose()


def subprocess_env(db: DatabaseUrl | None, **extra: str) -> dict[str, str]:
    """Environment for running the CLI as a subprocess against ``db``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    if db is not None:
        env["OUTBOX_DATABASE_URL"] = db.url.render_as_string(hide_password=False)
    env["OUTBOX_PIPELINE_STEPS"] = "ingest,detect,segment,iou_eval"
    env.update(extra)
    return env


@pytest.fixture
def engine_factory() -> Iterator[Any]:
    """Engines for databases other than ``db``, disposed after the test."""
    engines: list[sqlalchemy.Engine] = []

    def make(database: DatabaseUrl) -> sqlalchemy.Engine:
        eng = database.create_engine()
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.dispose()
