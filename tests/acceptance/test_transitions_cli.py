"""`outbox transitions`, `outbox subscriptions ...`, `outbox check` and `backlog` on subscriptions, as subprocesses."""

from __future__ import annotations

import json
import threading
from typing import Any

import psycopg

import outbox
from processor.database import connect
from tests.acceptance.test_cli import outbox_cli
from tests.fix_database import make_settings, subprocess_env
from tests.helpers import drain


def finished_jobs(engine: Any, count: int) -> list[Any]:
    jobs = []
    with engine.begin() as conn:
        for _ in range(count):
            job, variants = outbox.create_job(conn, variants=2)
            for variant in variants:
                outbox.update_variant(conn, variant, status="done", step="iou_eval")
            jobs.append(job)
    return jobs


def test_transitions_and_subscriptions_from_the_command_line(db, engine, conn):
    env = subprocess_env(db)
    created = outbox_cli("subscriptions", "create", "billing", "--from", "start", "--status", "done", env=env)
    assert created.returncode == 0 and "subscription billing created at position 0" in created.stdout, created.stderr
    jobs = finished_jobs(engine, 3)
    drain(make_settings(db))

    listed = outbox_cli("transitions", "--json", env=env)
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [line["transition_id"] for line in lines] == [1, 2, 3]
    assert {line["job_id"] for line in lines} == {str(job) for job in jobs}
    assert all(line["from_status"] == "queued" and line["to_status"] == "done" for line in lines)
    one = outbox_cli("transitions", "--job", str(jobs[0]), "--json", env=env)
    assert [json.loads(line)["job_id"] for line in one.stdout.splitlines()] == [str(jobs[0])]
    after = outbox_cli("transitions", "--after", "2", env=env)
    assert after.returncode == 0 and after.stdout.count("job ") == 1 and "queued -> done at iou_eval" in after.stdout

    subs = json.loads(outbox_cli("subscriptions", "list", "--json", env=env).stdout)
    assert [(s["name"], s["position"], s["lag"], s["to_statuses"]) for s in subs] == [("billing", 0, 3, ["done"])]
    backlog = json.loads(outbox_cli("backlog", "--json", env=env).stdout)
    assert backlog["subscriptions"][0]["lag_transitions"] == 3

    reset = outbox_cli("subscriptions", "reset", "billing", "--to", "now", env=env)
    assert reset.returncode == 0 and "now at position 3" in reset.stdout
    assert json.loads(outbox_cli("subscriptions", "list", "--json", env=env).stdout)[0]["lag"] == 0
    dropped = outbox_cli("subscriptions", "drop", "billing", env=env)
    assert dropped.returncode == 0
    assert json.loads(outbox_cli("subscriptions", "list", "--json", env=env).stdout) == []


def test_bad_subscription_input_gets_one_line_and_changes_nothing(db):
    env = subprocess_env(db)
    cases = [
        (("subscriptions", "create", "no spaces allowed"), "a subscription name is"),
        (("subscriptions", "create", "ok", "--status", "finished"), "unknown status 'finished'"),
        (("subscriptions", "create", "ok", "--from", "yesterday"), "must be start or now"),
        (("subscriptions", "reset", "missing", "--to", "now"), "no subscription named 'missing'"),
        (("subscriptions", "reset", "missing", "--to", "-4"), "--to must be start, now or a transition id"),
        (("subscriptions", "drop", "missing"), "no subscription named 'missing'"),
        (("transitions", "--job", "not-a-uuid"), "not a UUID"),
        (("deliver", "missing", "--webhook", "http://127.0.0.1:9/"), "no subscription named 'missing'"),
        (("deliver", "missing", "--webhook", "ftp://example.com/"), "must be an http:// or https:// URL"),
    ]
    for args, message in cases:
        result = outbox_cli(*args, env=env)
        assert result.returncode in (1, 2), (args, result.stdout, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr
    twice = [outbox_cli("subscriptions", "create", "once", env=env) for _ in range(2)]
    assert twice[0].returncode == 0 and twice[1].returncode == 1
    assert "exists already" in twice[1].stderr
    secret = "whsec_" + "A" * 10 + "!!"
    bad = outbox_cli(
        "deliver", "once", "--webhook", "http://127.0.0.1:9/", env={**env, "OUTBOX_WEBHOOK_SECRET": secret}
    )
    assert bad.returncode == 1 and "not base64" in bad.stderr and secret not in bad.stderr + bad.stdout


def test_check_fails_on_a_parked_transition_and_retry_delivers_it(db, engine, conn):
    env = subprocess_env(db)
    assert outbox_cli("subscriptions", "create", "notify", "--from", "start", env=env).returncode == 0
    finished_jobs(engine, 2)
    drain(make_settings(db))
    conn.execute("CREATE TABLE notified (transition_id bigint)")
    broken = [True]

    def handler(c: psycopg.Connection[Any], t: outbox.Transition) -> None:
        if broken[0]:
            raise RuntimeError("mail server down")
        c.execute("INSERT INTO notified VALUES (%s)", [t.transition_id])

    url = db.url.render_as_string(hide_password=False)
    policy = outbox.RetryPolicy(max_attempts=1)
    assert outbox.Subscriber("notify", url, handler, retry=policy).run_until_idle() == 0
    check = outbox_cli("check", "--json", env=env)
    assert check.returncode == 1
    (subs,) = [c for c in json.loads(check.stdout)["checks"] if c["name"] == "subscriptions"]
    assert not subs["ok"] and "notify: 2 parked" in subs["detail"]
    failures = json.loads(outbox_cli("subscriptions", "failures", "notify", "--json", env=env).stdout)
    assert [f["last_error"] for f in failures] == ["RuntimeError: mail server down"] * 2

    broken[0] = False
    retried = outbox_cli("subscriptions", "retry", "notify", env=env)
    assert retried.returncode == 0 and "2 parked transitions" in retried.stdout
    assert outbox.Subscriber("notify", url, handler, retry=policy).run_until_idle() == 2
    assert [r[0] for r in conn.execute("SELECT transition_id FROM notified ORDER BY 1")] == [1, 2]
    assert outbox_cli("check", env=env).returncode == 0


def test_an_open_hold_never_stalls_the_processor_and_its_transition_follows(db, engine, conn):
    """A hold stages its transition in the application's transaction, which takes no lock of the
    processor's: the worker folds other jobs meanwhile; once the hold commits, its transition is
    published before the job's next one."""
    settings = make_settings(db)
    with engine.begin() as c:
        held, _ = outbox.create_job(c, variants=1)
    with connect(db, application_name="holder", autocommit=False) as holder:
        outbox.hold_job(holder, held, status="failed", reason="cancelled")  # open, uncommitted
        others = finished_jobs(engine, 5)
        worker = threading.Thread(target=drain, args=(settings,))
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "the worker waited for the application's open transaction"
        done = conn.execute("SELECT count(*) FROM jobs WHERE job_id = ANY(%s) AND status = 'done'", [others])
        assert done.fetchone()[0] == 5
        holder.commit()
    drain(settings)  # an idle worker publishes the hold's transition
    with engine.begin() as c:
        outbox.release_job(c, held)
    drain(settings)
    chain = conn.execute(
        "SELECT from_status, to_status, written_by FROM outbox_job_transitions "
        "WHERE job_id = %s ORDER BY transition_id",
        [held],
    ).fetchall()
    assert [tuple(r) for r in chain][-2:] == [("queued", "failed", "hold"), ("failed", "queued", "processor")]


def test_subscribe_runs_a_handler_of_yours_as_a_process(db, engine, conn):
    env = subprocess_env(db)
    conn.execute("CREATE TABLE handled (transition_id bigint, to_status text)")
    assert outbox_cli("subscriptions", "create", "mine", "--from", "start", env=env).returncode == 0
    finished_jobs(engine, 4)
    drain(make_settings(db))
    handler = "tests.acceptance.transition_handlers:record"
    ran = outbox_cli("subscribe", "mine", "--handler", handler, "--until-idle", env=env)
    assert ran.returncode == 0 and "4 transitions handled, 0 parked" in ran.stdout, ran.stderr
    assert conn.execute("SELECT count(*), count(DISTINCT transition_id) FROM handled").fetchone() == (4, 4)
    again = outbox_cli("subscribe", "mine", "--handler", handler, "--until-idle", env=env)
    assert again.returncode == 0 and "0 transitions handled" in again.stdout
    for bad, message in [("nomodule", "expected module:function"), ("no_such_mod:f", "cannot import"),
                         ("tests.acceptance.transition_handlers:missing", "has no function")]:  # fmt: skip
        refused = outbox_cli("subscribe", "mine", "--handler", bad, env=env)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
