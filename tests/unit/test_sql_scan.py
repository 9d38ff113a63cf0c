"""processor/sql_scan.py reads the writes of job state out of PL/pgSQL as PostgreSQL would lex it."""

from __future__ import annotations

import pytest

from processor.sql_scan import scan


def writes(text: str) -> list[tuple[tuple[str, ...] | None, set[str]]]:
    return [(w.target, set(w.columns)) for w in scan(text).writes]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("UPDATE jobs SET status = 'x' WHERE job_id = 1", [(("jobs",), {"status"})]),
        (
            "update ONLY public . jobs j set current_step = 'a', updated_at = now()",
            [(("public", "jobs"), {"current_step", "updated_at"})],
        ),
        (
            'UPDATE /* a /* nested */ comment */ "Jobs" AS j SET (status, current_step) = (1, 2)',
            [(("Jobs",), {"status", "current_step"})],
        ),
        ("WITH d AS (SELECT 1) UPDATE jobs SET status = d.x FROM d WHERE x = 1", [(("jobs",), {"status"})]),
        (
            "INSERT INTO jobs (job_id, status) VALUES (1, 'q') "
            "ON CONFLICT (job_id) DO UPDATE SET status = excluded.status",
            [(("jobs",), {"status"})],
        ),
        ("INSERT INTO jobs (job_id, status) VALUES (1, 'q') ON CONFLICT DO NOTHING", []),
        (
            "MERGE INTO jobs AS j USING s ON s.id = j.job_id WHEN MATCHED THEN UPDATE SET current_step = s.step",
            [(("jobs",), {"current_step"})],
        ),
        ("SELECT * FROM jobs FOR UPDATE", []),
        ("-- UPDATE jobs SET status = 1\nSELECT 1", []),
        ("SELECT $x$UPDATE jobs SET status = 1$x$", []),  # a string, not a statement
        ("UPDATE jobs SET status = 'a' WHERE x = (SELECT y = 1 FROM t)", [(("jobs",), {"status"})]),
    ],
)
def test_writes_are_read_with_their_target_and_columns(text, expected):
    assert writes(text) == expected


def test_dynamic_sql_is_read_from_the_strings_that_begin_a_statement():
    found = scan(
        "EXECUTE 'UPDATE ' || quote_ident(TG_ARGV[0]) || ' SET status = $1 WHERE job_id = ' || NEW.job_id::text;"
        "EXECUTE format(E'UPDATE %I SET current_step = \\'x\\'', 'jobs');"
        "RAISE EXCEPTION 'invalid status; to update jobs set status = ... use the support tool';"
    )
    assert [(w.target, set(w.columns)) for d in found.dynamic for w in scan(d).writes] == [
        (None, {"status"}),
        (None, {"current_step"}),
    ]
    assert "jobs" in found.strings


def test_calls_are_read_with_their_qualified_names():
    found = scan('PERFORM app."RecalcJob"(NEW.job_id); PERFORM helper(1); SELECT coalesce(a, b), count(*) FROM t')
    assert {("app", "RecalcJob"), ("helper",), ("count",)} <= found.calls
    assert ("coalesce",) not in found.calls
