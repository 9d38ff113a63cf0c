"""outbox.sqlfile: named queries, and fragments spliced into them (``{{name}}``, ``{{file.sql:name}}``)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

from outbox.sqlfile import load_queries

_packages = itertools.count()


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A package of .sql files, written by the test (a fresh name each time: loading is cached)."""
    name = f"sqlfile_test_{next(_packages)}"
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(files: dict[str, str]) -> str:
        for filename, text in files.items():
            (root / filename).write_text(text)
        return name

    yield write
    sys.modules.pop(name, None)


def test_a_fragment_is_spliced_where_it_is_included_and_is_not_a_query(package):
    name = package(
        {
            "a.sql": """-- preamble

-- fragment: visible
-- Documents the fragment: left out of the splice.
pg_visible_in_snapshot(txid, %(snapshot)s::pg_snapshot)
  AND txid < %(xmax)s::xid8

-- name: events_probe
SELECT 1 FROM outbox_events WHERE {{visible}} AND partition = 0

-- name: events_count
-- A comment of the query stays.
SELECT count(*) FROM outbox_events WHERE {{ visible }};
"""
        }
    )
    queries = load_queries(name, "a.sql")
    assert set(queries) == {"events_probe", "events_count"}
    assert queries["events_probe"] == (
        "SELECT 1 FROM outbox_events WHERE pg_visible_in_snapshot(txid, %(snapshot)s::pg_snapshot)\n"
        "  AND txid < %(xmax)s::xid8 AND partition = 0"
    )
    assert queries["events_count"].endswith(
        "WHERE pg_visible_in_snapshot(txid, %(snapshot)s::pg_snapshot)\n  AND txid < %(xmax)s::xid8"
    )
    assert queries["events_count"].startswith("-- A comment of the query stays.")


def test_a_fragment_of_another_file_and_fragments_that_include_fragments(package):
    name = package(
        {
            "shared.sql": "-- fragment: inner\nx > 1\n\n-- fragment: outer\n({{inner}} AND y > 2)\n",
            "user.sql": "-- name: t_get\nSELECT * FROM t WHERE {{shared.sql:outer}}\n",
        }
    )
    assert load_queries(name, "user.sql") == {"t_get": "SELECT * FROM t WHERE (x > 1 AND y > 2)"}
    assert load_queries(name, "shared.sql") == {}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("-- name: q\nSELECT {{missing}}\n", "no fragment 'missing'"),
        ("-- fragment: loop\n{{loop}}\n\n-- name: q\nSELECT {{loop}}\n", "includes itself"),
        ("-- fragment: q\n1\n\n-- name: q\nSELECT 1\n", "defined twice"),
    ],
)
def test_an_unknown_fragment_a_cycle_or_a_name_used_twice_is_refused_at_load_time(package, text, error):
    name = package({"bad.sql": text})
    with pytest.raises(ValueError, match=error):
        load_queries(name, "bad.sql")


def test_the_store_statements_that_read_after_a_cursor_share_the_range_read():
    """The rule is written once (store/events.sql) and spliced into each statement that reads events after a cursor."""
    events = load_queries("processor.store", "events.sql")
    jobs = load_queries("processor.store", "jobs.sql")
    fragment = "AND (txid, event_id) > (%(range_txid)s::xid8, %(range_event_id)s::bigint)"
    for query in (events["events_probe"], events["events_apply"], jobs["jobs_awaiting_fold_add_applied"]):
        assert fragment in query and "{{" not in query
        assert "FROM unnest(%(done_xip)s::xid8[]) AS xip (txid)" in query
