"""`outbox explain`: the report on jobs in each situation, its JSON shape, and its plans on a large outbox."""

from __future__ import annotations

import importlib
import json
import pkgutil
import uuid
from typing import Any

import pytest

import outbox
from processor import store
from processor.database import connect
from processor.errors import OutboxError
from processor.explain import Agreement, EventState, explain, parse_job_id
from processor.render import to_json
from processor.retention import parse_duration, retain
from tests.helpers import JOBS_OF_TEN_VARIANTS, drain, write_jobs_behind_the_processor

MOVE = "UPDATE jobs_variants SET status = %s, current_step = %s WHERE job_variants_id = %s"


def new_job(engine: Any, variants: int, *moves: tuple[int, str, str]) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A job of ``variants`` variants, then each (variant index, status, step) move, one transaction each."""
    with engine.begin() as c:
        job_id, ids = outbox.create_job(c, variants=variants)
    for index, status, step in moves:
        with engine.begin() as c:
            outbox.update_variant(c, ids[index], status=status, step=step)
    return job_id, ids


def finish(engine: Any, variants: list[uuid.UUID]) -> None:
    for variant in variants:
        with engine.begin() as c:
            outbox.update_variant(c, variant, status="done", step="iou_eval")


def test_done_job(conn, engine, settings):
    job_id, ids = new_job(engine, 3)
    finish(engine, ids)
    drain(settings)

    report = explain(conn, job_id)
    assert (report.job.status, report.job.current_step) == ("done", "iou_eval")
    assert (report.fold.status, report.fold.current_step) == ("done", "iou_eval")
    assert report.fold.decision == "done at `iou_eval`: all 3 variants done at `iou_eval`"
    assert report.fold.job_row_matches
    assert report.fold.verdict == "the job row is the fold of its variants' stored states"
    assert report.hold is None and report.flag is None and report.awaiting_fold is None and report.row_lock is None
    assert [v.variant_id for v in report.variants] == sorted(ids)
    for variant in report.variants:
        assert variant.agreement is Agreement.AGREE and variant.note == ""
        assert variant.events_total == 2 and variant.events_pending == 0 and not variant.events_pruned
        assert [e.state for e in variant.events] == [EventState.APPLIED, EventState.APPLIED]
        newest = variant.events[0]
        assert newest.stored and newest.event_type == "variant_changed"
        assert (newest.status, newest.step) == ("done", "iou_eval")
        assert variant.events[1].event_id < newest.event_id and variant.events[1].status == "queued"
    assert report.dead_letters == ()
    newest_transition = report.transitions[0]  # newest first
    assert (newest_transition.to_status, newest_transition.to_step) == ("done", "iou_eval")


def test_running_job_in_words_then_an_event_in_flight(conn, engine, settings):
    job_id, ids = new_job(engine, 3, (2, "running", "segment"))
    finish(engine, ids[:2])
    drain(settings)

    report = explain(conn, job_id)
    assert (report.fold.status, report.fold.current_step) == ("running", "segment")
    assert report.fold.decision == (
        f"running at `segment`: 2 of 3 variants done at `iou_eval`, variant {ids[2]} is `running` at `segment`"
    )
    assert report.fold.job_row_matches

    # A committed event that no batch has applied yet: in flight, and the variant's row is ahead of its state.
    with engine.begin() as c:
        outbox.update_variant(c, ids[2], status="done", step="iou_eval")
    report = explain(conn, job_id)
    (late,) = [v for v in report.variants if v.variant_id == ids[2]]
    assert late.events[0].state is EventState.IN_FLIGHT and not late.events[0].stored
    assert late.events[1].state is EventState.APPLIED and late.events[1].stored
    assert late.events_pending == 1
    assert late.agreement is Agreement.IN_FLIGHT
    assert (report.job.status, report.fold.status) == ("running", "running")  # the fold of what is stored
    assert report.checkpoint.worker is None
    assert report.fold.verdict == (
        "the job row is the fold of its variants' stored states; 1 newer event(s) of its variants are not in job "
        "state yet; no worker holds partition 0: nothing applies them (`outbox run`)"
    )
    drain(settings)
    report = explain(conn, job_id)
    assert report.fold.status == "done" and report.fold.job_row_matches
    assert all(e.state is EventState.APPLIED for v in report.variants for e in v.events)


def test_flagged_job_with_a_step_the_pipeline_lacks(conn, engine, settings):
    job_id, ids = new_job(engine, 2)
    drain(settings)
    conn.execute(MOVE, ["running", "transcode", ids[0]])  # plain SQL: capture does not know the pipeline
    drain(settings)

    report = explain(conn, job_id)
    assert report.flag is not None and "transcode" in report.flag.reason
    assert report.fold.status is None and report.fold.unfoldable is not None
    assert "is not in the pipeline" in report.fold.unfoldable
    assert report.fold.decision.startswith("cannot be folded: ")
    assert report.fold.verdict.startswith("flagged: the job row is left as it was (queued at ingest)")
    assert "`outbox pipeline set`" in report.fold.verdict
    assert all(v.agreement is Agreement.AGREE for v in report.variants)


def test_job_with_a_dead_letter(conn, engine, settings):
    job_id, ids = new_job(engine, 2)
    drain(settings)
    conn.execute(
        "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
        "VALUES ('variant_changed', 1, %s, %s, nextval('outbox_variant_versions'), %s)",
        [job_id, ids[1], '{"status": "exploded", "step": "ingest"}'],
    )
    drain(settings)

    report = explain(conn, job_id)
    (letter,) = report.dead_letters
    assert letter.variant_id == ids[1] and "status" in letter.reason and not letter.event_pruned
    assert report.flag is not None
    assert report.fold.unfoldable is not None and "dead letter" in report.fold.unfoldable
    assert "`outbox dead-letters retry`" in report.fold.verdict
    (bad,) = [v for v in report.variants if v.variant_id == ids[1]]
    newest = bad.events[0]
    assert newest.event_id == letter.event_id and newest.dead_letter is not None
    assert newest.state is EventState.APPLIED  # the checkpoint moved past it: parked, not pending
    assert newest.stored and bad.stored is not None and bad.stored.problem is not None
    assert bad.agreement is Agreement.DISAGREE and bad.note.startswith("the stored state is a problem")


def test_event_held_back_by_an_open_transaction(conn, engine, settings, db):
    job_id, ids = new_job(engine, 2)
    drain(settings)
    with connect(db, application_name="support-console", autocommit=False) as writer:
        writer.execute(MOVE, ["done", "iou_eval", ids[0]])  # captured in its transaction; not committed
        pid = writer.info.backend_pid
        xid = writer.execute("SELECT pg_current_xact_id()::xid::text").fetchone()
        report = explain(conn, job_id)
        writer.rollback()
        (held,) = [v for v in report.variants if v.variant_id == ids[0]]
        opened = held.open_transaction
        assert opened is not None
        assert (opened.pid, opened.application_name, opened.wrote_events) == (pid, "support-console", True)
        assert xid is not None and opened.xid == xid[0]
        assert opened.since is not None and opened.state == "idle in transaction"
        assert "its events stay invisible" in opened.describe()
        assert held.events_total == 1 and held.agreement is Agreement.AGREE  # the change is not visible yet
        (other,) = [v for v in report.variants if v.variant_id == ids[1]]
        assert other.open_transaction is None
        # The verdict says it, not only the variant's line: this is how a job looks stuck.
        assert f"a change of variant {ids[0]} waits for transaction {xid[0]} of backend pid {pid}" in (
            report.fold.verdict
        )

        writer.execute("SELECT 1 FROM jobs_variants WHERE job_variants_id = %s FOR UPDATE", [ids[1]])
        report = explain(conn, job_id)
        writer.rollback()
        (locked,) = [v for v in report.variants if v.variant_id == ids[1]]
        assert locked.open_transaction is not None and not locked.open_transaction.wrote_events
        assert "holds the row locked" in locked.open_transaction.describe()
    assert all(v.open_transaction is None for v in explain(conn, job_id).variants)


def test_after_prune_the_baseline_explains_the_state(conn, engine, settings):
    job_id, ids = new_job(engine, 2)
    finish(engine, ids)
    drain(settings)
    retain(conn, parse_duration("0s"))

    report = explain(conn, job_id)
    assert report.fold.status == "done" and report.fold.job_row_matches
    for variant in report.variants:
        assert variant.events == () and variant.events_total == 0 and variant.events_pruned
        assert variant.baseline is not None and (variant.baseline.status, variant.baseline.step) == ("done", "iou_eval")
        assert variant.agreement is Agreement.AGREE


def test_held_job_and_drift(conn, engine, settings):
    job_id, _ = new_job(engine, 2, (0, "running", "detect"))
    drain(settings)
    write_jobs_behind_the_processor(conn, "UPDATE jobs SET status = 'done' WHERE job_id = %s", [job_id])
    report = explain(conn, job_id)
    assert not report.fold.job_row_matches
    assert report.fold.verdict == (
        "drift: the job row says done at ingest but the fold of its variants' stored states gives running at "
        "ingest: `outbox verify --repair` rebuilds it"
    )
    with conn.transaction():
        outbox.hold_job(conn, job_id, status="failed", reason="cancelled by support")
    report = explain(conn, job_id)
    assert report.hold is not None and report.hold.reason == "cancelled by support"
    assert report.fold.verdict.startswith("held by the application since ")


def test_unknown_or_malformed_job_id(conn):
    with pytest.raises(OutboxError, match=r"^no such job: "):
        explain(conn, uuid.uuid4())
    with pytest.raises(OutboxError, match=r"^not a job id"):
        parse_job_id("not-a-uuid")


OPT = (str, type(None))  # a status or step: null where there is none (a variant not started yet)
JSON_SHAPE: dict[str, Any] = {
    "job_id": str,
    "partition": int,
    "job": {"status": str, "current_step": OPT, "updated_at": str},
    "hold": None,
    "flag": None,
    "awaiting_fold": None,
    "row_lock": None,
    "checkpoint": {"partition": int, "done_snapshot": str, "catching_up_to": None, "updated_at": str, "worker": None},
    "fold": {
        "status": str, "current_step": str, "unfoldable": None, "decision": str, "job_row_matches": bool,
        "verdict": str,
    },
    "variants": [{
        "variant_id": str, "partition": int,
        "row": {"job_id": str, "status": str, "current_step": OPT},
        "stored": {"job_id": str, "version": int, "status": str, "step": OPT, "removed": bool, "problem": None,
                   "event_id": int},
        "baseline": None, "agreement": str, "note": str, "events_total": int, "events_pending": int,
        "events_pruned": bool, "open_transaction": None,
        "events": [{
            "event_id": int, "txid": int, "job_id": str, "event_type": str, "version": int, "status": OPT,
            "step": OPT, "created_at": str, "state": str, "stored": bool, "dead_letter": None,
        }],
    }],
    "dead_letters": [],
    "transitions": [{
        "transition_id": int, "from_status": OPT, "from_step": OPT, "to_status": str, "to_step": OPT,
        "written_by": str, "transitioned_at": str,
    }],
}  # fmt: skip


def check_shape(value: Any, shape: Any, where: str = "$") -> None:
    """``value`` has exactly the keys of ``shape``, each of its type (None: null; a list: each item's shape)."""
    if isinstance(shape, dict):
        assert isinstance(value, dict) and value.keys() == shape.keys(), f"{where}: {sorted(value)}"
        for key, inner in shape.items():
            check_shape(value[key], inner, f"{where}.{key}")
    elif isinstance(shape, list):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            check_shape(item, shape[0], f"{where}[{i}]")
    elif shape is None:
        assert value is None, f"{where}: {value!r}"
    else:  # a type, or a tuple of types
        assert isinstance(value, shape) and not (shape is int and isinstance(value, bool)), f"{where}: {value!r}"


def test_json_shape(conn, engine, settings):
    job_id, _ = new_job(engine, 2, (0, "running", "segment"))
    drain(settings)
    document = json.loads(json.dumps(to_json(explain(conn, job_id))))
    check_shape(document, JSON_SHAPE)
    assert document["variants"] and document["transitions"] and all(v["events"] for v in document["variants"])
    assert document["variants"][0]["events"][0]["state"] == "applied"
    assert document["variants"][0]["agreement"] == "agree"


def test_json_shape_of_the_optional_parts(conn, engine, settings, db):
    job_id, ids = new_job(engine, 2)
    drain(settings)
    conn.execute(
        "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
        "VALUES ('mystery', 1, %s, %s, nextval('outbox_variant_versions'), '{}')",
        [job_id, ids[0]],
    )
    drain(settings)
    with conn.transaction():
        outbox.hold_job(conn, job_id, status="failed", reason="support")
    with connect(db, application_name="open", autocommit=False) as writer:
        writer.execute(MOVE, ["running", "detect", ids[1]])
        writer.execute("SELECT 1 FROM jobs WHERE job_id = %s FOR UPDATE", [job_id])
        document = json.loads(json.dumps(to_json(explain(conn, job_id))))
        writer.rollback()
    check_shape(document["hold"], {"status": str, "current_step": None, "reason": str, "held_at": str})
    check_shape(document["flag"], {"reason": str, "flagged_at": str})
    check_shape(document["row_lock"], {"pid": int, "application_name": str, "state": str, "since": str})
    check_shape(document["fold"]["unfoldable"], str)
    (letter,) = document["dead_letters"]
    check_shape(letter, {
        "event_id": int, "variant_id": str, "reason": str, "holds_job": bool, "parked_at": str, "discarded_at": None,
        "event_type": str, "event_pruned": bool,
    })  # fmt: skip
    first, second = sorted(document["variants"], key=lambda v: v["variant_id"] != str(ids[0]))
    check_shape(first["events"][0]["dead_letter"], {"reason": str, "holds_job": bool, "discarded": bool})
    check_shape(second["open_transaction"], {
        "pid": int, "application_name": str, "state": str, "since": str, "xid": str, "prepared_gid": None,
        "wrote_events": bool,
    })  # fmt: skip


# The plans: every statement of explain reads by a key or an index, on an outbox of 120,000 events.
LARGE = JOBS_OF_TEN_VARIANTS  # 20,000 events through capture
# Three events per variant, appended as capture appends them but set-based (capture's trigger would
# take most of the test's time; the plans only need the rows).
MORE = """
INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload)
SELECT 'variant_changed', 1, v.job_id, v.job_variants_id, nextval('outbox_variant_versions'),
       jsonb_build_object('status', 'running', 'step', s.step)
FROM jobs_variants AS v
CROSS JOIN unnest(ARRAY['ingest', 'detect', 'segment']) WITH ORDINALITY AS s (step, n)
ORDER BY s.n, v.job_variants_id
"""
BIG_TABLES = ("outbox_events", "jobs", "jobs_variants", "outbox_variant_states", "outbox_variant_baseline")


def store_query(name: str) -> str:
    """A statement of the store by name, from whichever concern's SQL file holds it."""
    for module in pkgutil.iter_modules(store.__path__):
        queries = getattr(importlib.import_module(f"processor.store.{module.name}"), "QUERIES", {})
        if name in queries:
            return str(queries[name])
    raise KeyError(name)


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


def test_every_read_uses_an_index_on_a_large_outbox(conn, settings):
    with conn.transaction():
        conn.execute(LARGE)
    drain(settings)
    retain(conn, parse_duration("0s"))  # a baseline for every variant
    conn.execute(MORE)
    drain(settings)
    conn.execute(MORE)
    conn.execute("ANALYZE")
    assert conn.execute("SELECT count(*) FROM outbox_events").fetchone()[0] >= 120_000  # type: ignore[index]
    job_id, variant_ids = conn.execute(
        "SELECT job_id, array_agg(job_variants_id) FROM jobs_variants GROUP BY job_id LIMIT 1"
    ).fetchone()  # type: ignore[misc]
    params = {"job_id": job_id, "variant_ids": variant_ids, "limit": 20, "job_ids": [job_id]}
    for name in (
        "job_overview_get", "job_variants_inspect", "variant_events_recent", "job_dead_letters_list",
        "job_transitions_recent", "variant_states_to_fold", "job_holds_list", "jobs_lock_holders",
    ):  # fmt: skip
        row = conn.execute(f"EXPLAIN (FORMAT JSON) {store_query(name)}", params).fetchone()
        assert row is not None
        for node in plan_nodes(row[0][0]["Plan"]):
            # No big table read whole, nor walked along an index without a condition on it; and the
            # pending rule (a set-returning SQL function) is inlined, never run for the whole outbox.
            if node.get("Relation Name") in BIG_TABLES:
                assert node["Node Type"] != "Seq Scan", f"{name} reads {node['Relation Name']} whole"
                if node["Node Type"] in ("Index Scan", "Index Only Scan"):
                    assert "Index Cond" in node, f"{name} walks {node['Index Name']} without a condition"
            assert node.get("Function Name") != "outbox_events_pending", f"{name} runs outbox_events_pending whole"
    # And explain's answer on it, as a smoke test of the whole.
    report = explain(conn, job_id)
    assert len(report.variants) == 10
    for variant in report.variants:
        assert variant.events_total == 6 and variant.events_pending == 3 and variant.events_pruned
        states = [e.state for e in variant.events]
        assert states == [EventState.IN_FLIGHT] * 3 + [EventState.APPLIED] * 3


def test_a_running_job_names_the_variant_it_waits_for_not_the_failed_one(conn, engine, settings):
    """Failure policy settled: a failed variant waits for the others; the words name the one still running."""
    job_id, ids = new_job(engine, 2)
    with engine.begin() as sa:
        outbox.update_variant(sa, ids[0], status="failed", step="detect")
        outbox.update_variant(sa, ids[1], status="running", step="segment")
    drain(settings)
    decision = explain(conn, job_id).fold.decision
    assert decision.startswith("running at `detect`: 0 of 2 variants done at `iou_eval`"), decision
    assert f"variant {ids[1]} is `running` at `segment`" in decision
    assert str(ids[0]) not in decision
    assert decision.endswith("1 failed, the job waits for the others (failure policy settled)")
