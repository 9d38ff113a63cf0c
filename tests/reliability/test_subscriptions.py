"""Job transitions and their subscriptions under crashes: consumers SIGKILLed, a receiver that fails.

* A subscriber process (tests/reliability/subscriber_process.py) whose handler writes an effect in
  the transaction that acknowledges, killed again and again (at random moments, and between its
  effect and its commit) and once kept down for 30 s while transitions are written: every
  transition has exactly one effect.
* `outbox deliver` against a local HTTP receiver that answers 500, times out, hangs up or answers
  2xx at random, itself killed again and again: every transition is received with a 2xx answer,
  each request is signed as the Standard Webhooks library verifies, retries repeat the same id and
  body, and delivery never goes around a transition.
* Two partitions, workers killed (also between writing job state and committing it) under 8
  writers: the transitions equal an audit trigger's record of every job state written, job by job,
  and a reader that follows them by id (as subscriptions do) sees every one.

Each test is seeded (a constant, printed with its summary), and checks against references of its own: the rows of
outbox_job_transitions, an audit trigger on jobs, and the receiver's record of each request.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import psycopg
from standardwebhooks.webhooks import Webhook as ReferenceWebhook

import outbox
from outbox.subscription import SUBSCRIBER_LOCK_CLASS
from processor import subscriptions, workload
from processor.database import DatabaseUrl, connect
from tests.fix_database import subprocess_env
from tests.helpers import WorkerProcess, make_jobs, pending_work, wait_for
from tests.integration.test_transitions import EFFECTS, JOB_STATE_AUDIT, chains
from tests.reference import partition_of
from tests.reliability.fleet import (
    Writers,
    check_final_state,
    repartition_now,
    shares,
    stop_cleanly,
    worker_env,
)

ROOT = Path(__file__).parents[2]
STEPS = ("ingest", "detect", "segment", "iou_eval")
GATE = 0x5EA1_0001  # the advisory lock key the subscriber process's handler passes (subscriber_process.py)
Conn = psycopg.Connection[Any]


# --- shared -------------------------------------------------------------------------------------


def subscription(conn: Conn, name: str) -> subscriptions.SubscriptionInfo:
    (info,) = subscriptions.list_subscriptions(conn, name)
    return info


def transition_rows(conn: Conn) -> dict[int, dict[str, Any]]:
    rows = conn.execute(
        "SELECT transition_id, job_id, partition, from_status, from_step, to_status, to_step, written_by, "
        "transitioned_at FROM outbox_job_transitions ORDER BY transition_id"
    ).fetchall()
    keys = ("transition_id", "job_id", "partition", "from_status", "from_step", "to_status", "to_step",
            "written_by", "transitioned_at")  # fmt: skip
    return {row[0]: dict(zip(keys, row, strict=True)) for row in rows}


def backend_of(conn: Conn, application: str) -> tuple[int, str | None, str | None] | None:
    row = conn.execute(
        "SELECT pid, wait_event_type, wait_event FROM pg_stat_activity WHERE application_name LIKE %s", [application]
    ).fetchone()
    return (row[0], row[1], row[2]) if row else None


def session_gone(conn: Conn, application: str) -> None:
    """Wait until no session named ``application`` (a LIKE pattern) is left: a killed process's
    backend ends once it finds its client gone (rolling back what it had not committed)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s"
    wait_for(lambda: conn.execute(query, [application]).fetchone() == (0,), what=f"the session of {application} to end")


def consumer_active(conn: Conn, application: str) -> bool:
    """Whether a session named ``application`` (a LIKE pattern) holds a subscription's consumer lock."""
    row = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::oid AND a.application_name LIKE %s "
        "AND a.datname = current_database())",
        [SUBSCRIBER_LOCK_CLASS, application],
    ).fetchone()
    return bool(row and row[0])


class Process:
    """A subprocess with its output in a file (a pipe could fill and block it)."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self) -> int:
        """SIGTERM: it finishes the transition in hand and exits."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not stop on SIGTERM:\n{self.output()[-3000:]}") from None


# --- 1. a subscriber killed again and again -----------------------------------------------------


def calls_by_process(path: Path) -> dict[int, list[int]]:
    """The handler calls each subscriber process made, in order: pid -> transition ids."""
    calls: dict[int, list[int]] = defaultdict(list)
    if path.exists():
        for line in path.read_text().split("\n")[:-1]:  # whole lines only: one may be being written
            pid, transition_id = line.split()
            calls[int(pid)].append(int(transition_id))
    return calls


def check_each_transition_has_exactly_one_effect(conn: Conn, transitions: dict[int, dict[str, Any]]) -> None:
    effects = conn.execute("SELECT transition_id, job_id, to_status FROM effects").fetchall()
    counts = Counter(row[0] for row in effects)
    twice = {t: n for t, n in counts.items() if n > 1}
    assert not twice, f"{len(twice)} transitions had more than one effect: {list(twice.items())[:10]}"
    missing = set(transitions) - set(counts)
    assert not missing, f"{len(missing)} transitions had no effect: {sorted(missing)[:10]}"
    assert set(counts) == set(transitions), f"effects of unknown transitions: {sorted(set(counts) - set(transitions))}"
    for transition_id, job_id, to_status in effects:
        row = transitions[transition_id]
        assert (job_id, to_status) == (row["job_id"], row["to_status"]), (transition_id, job_id, to_status, row)


def check_handled_in_order_and_again_after_a_kill(
    calls: dict[int, list[int]], processes: list[Process], gated: list[int]
) -> int:
    """The handler was called in order in each process; what a killed process had in hand was
    handled again by a later one (its effect rolled back with the kill). Returns the transitions
    handled more than once."""
    for pid, ids in calls.items():
        assert ids == sorted(set(ids)), f"subscriber {pid} handled transitions out of order: {ids[:20]}"
    order = [p.pid for p in processes]
    for transition_id in gated:
        handlers = [pid for pid in order if transition_id in calls.get(pid, [])]
        assert len(handlers) >= 2, f"transition {transition_id}, killed in its handler, was not handled again"
    return sum(1 for n in Counter(t for ids in calls.values() for t in ids).values() if n > 1)


def test_a_subscriber_killed_repeatedly_handles_each_transition_exactly_once(db, engine, conn, tmp_path, capsys):
    seed = 2101
    rng = random.Random(seed)
    conn.execute(EFFECTS)  # no unique constraint: a second effect of a transition would be counted
    conn.execute(JOB_STATE_AUDIT)
    subscriptions.create(conn, "effects", from_start=True, to_statuses=None)
    calls_log = tmp_path / "calls.log"
    env = subprocess_env(db, SUBSCRIBER_CALLS_LOG=str(calls_log), SUBSCRIBER_GATE=str(GATE))
    started = time.monotonic()
    kills = Counter()
    gated: list[int] = []  # transitions whose handler had written its effect when its process was killed
    processes: list[Process] = []

    def spawn() -> Process:
        process = Process(
            [sys.executable, "-m", "tests.reliability.subscriber_process", "effects"],
            env,
            tmp_path / f"subscriber-{len(processes)}.log",
        )
        processes.append(process)
        return process

    def handling(process: Process) -> bool:
        assert process.process.poll() is None, f"the subscriber exited:\n{process.output()[-3000:]}"
        return bool(calls_by_process(calls_log).get(process.pid))

    def kill_at_random(process: Process) -> None:
        wait_for(lambda: handling(process), what="the subscriber to handle a transition")
        time.sleep(rng.uniform(0, 0.8))  # the random moment of the kill
        process.kill()
        session_gone(conn, f"test-subscriber:{process.pid}")
        kills["at a random moment"] += 1

    def kill_between_effect_and_commit(process: Process) -> int:
        """Hold the gate: the handler waits after its INSERT, its transaction open; kill it there.

        Returns the subscription's lag at that moment."""
        wait_for(lambda: handling(process), what="the subscriber to handle a transition")
        with connect(db, application_name="test-gate") as gate:
            gate.execute("SELECT pg_advisory_lock(%s)", [GATE])

            def at_gate() -> bool:
                assert process.process.poll() is None, process.output()[-3000:]
                backend = backend_of(conn, f"test-subscriber:{process.pid}")
                return backend is not None and backend[1:] == ("Lock", "advisory")

            wait_for(at_gate, what="the subscriber's handler to wait at the gate")
            lag = subscription(conn, "effects").lag
            process.kill()
            gate.execute("SELECT pg_advisory_unlock(%s)", [GATE])
        session_gone(conn, f"test-subscriber:{process.pid}")
        # Its last call is the one that waited: its effect was written, not committed.
        gated.append(calls_by_process(calls_log)[process.pid][-1])
        kills["between the effect and the commit"] += 1
        return lag

    worker = WorkerProcess(worker_env(db), tmp_path / "worker.log")
    writers = workload.PipelineWriters(db, engine, threads=4, seed=seed, pace=0.08).start()
    try:
        # Kills at random moments and inside the handler's transaction, in a seeded order.
        for round_ in range(6):
            process = spawn()
            if rng.random() < 0.5 or round_ == 0:
                kill_at_random(process)
            else:
                kill_between_effect_and_commit(process)
        # Down for 30 s while transitions are written and folded.
        process = spawn()
        kill_at_random(process)
        down_from = subscription(conn, "effects")
        time.sleep(30)
        down_until = subscription(conn, "effects")
        assert down_until.position == down_from.position, "no consumer ran: the position may not move"
        missed = down_until.lag
        assert missed >= 100, f"only {missed} transitions written while the subscriber was down"
        # Back: killed again in the middle of the catch-up, at once and then at random.
        assert kill_between_effect_and_commit(spawn()) > 0, "the catch-up ended before the kill"
        kill_at_random(spawn())
        final = spawn()
        writers.stop()
        wait_for(lambda: worker.process.poll() is None and pending_work(conn) == 0, timeout=60,
                 what="the worker to fold every write")  # fmt: skip
        wait_for(lambda: consumer_active(conn, f"test-subscriber:{final.pid}"), what="the last subscriber to be active")
        wait_for(lambda: final.process.poll() is None and subscription(conn, "effects").lag == 0, timeout=60,
                 what="the subscriber to catch up")  # fmt: skip
        assert final.terminate() == 0, final.output()[-3000:]
        stop_cleanly(worker)
    finally:
        writers.stop_event.set()
        for process in processes:
            process.kill()
        worker.kill()
    elapsed = time.monotonic() - started

    transitions = transition_rows(conn)
    info = subscription(conn, "effects")
    assert info.position == max(transitions) == info.head and info.lag == 0
    assert info.retrying == info.parked == 0
    check_each_transition_has_exactly_one_effect(conn, transitions)
    # The transitions themselves are complete: each job state written is one, in order.
    assert chains(conn, "outbox_job_transitions", "transition_id") == chains(conn, "job_state_audit", "audit_id")
    redelivered = check_handled_in_order_and_again_after_a_kill(calls_by_process(calls_log), processes, gated)
    with capsys.disabled():
        print(
            f"\nsubscriber kill test (seed {seed}): {len(transitions)} transitions from {writers.transactions} writer "
            f"transactions ({writers.jobs} jobs) in {elapsed:.1f} s; {sum(kills.values())} SIGKILLs {dict(kills)}, "
            f"{missed} transitions written during the 30 s down; {redelivered} transitions handled again after a "
            "kill; each transition has exactly one effect"
        )


# --- 2. webhooks against a failing receiver, the deliverer killed ---------------------------------


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1 that fails at random (seeded) and records every request."""

    daemon_threads = True
    OUTCOMES = ("200", "204", "500", "slow", "hang up")

    def __init__(self, seed: int, slow: float) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.rng = random.Random(seed)
        self.slow = slow
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.failing = True
        self.hold = False  # the next request: recorded as answered 200, then held until released
        self.holding = threading.Event()
        self.held_body = b""
        self.release = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks"

    def answer(self, headers: dict[str, str], body: bytes) -> str:
        with self.lock:
            if self.hold:
                self.hold = False
                self.held_body = body
                outcome = "held"
            elif self.failing:
                outcome = self.rng.choices(self.OUTCOMES, weights=(20, 15, 25, 15, 25))[0]
            else:
                outcome = self.rng.choice(("200", "204"))
            self.requests.append({"headers": headers, "body": body, "outcome": outcome, "failing": self.failing})
            return outcome

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def failed(self) -> int:
        """Requests answered while the receiver failed at random."""
        with self.lock:
            return sum(1 for r in self.requests if r["failing"])


class ReceiverHandler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        outcome = self.server.answer(dict(self.headers.items()), body)
        try:
            if outcome == "hang up":
                self.close_connection = True  # closed with no answer at all
                return
            if outcome == "slow":
                time.sleep(self.server.slow)  # past the deliverer's timeout: it gives up and retries
            if outcome == "held":
                self.server.holding.set()
                self.server.release.wait(60)
            code = 200 if outcome in ("slow", "held") else int(outcome)
            self.send_response(code)
            reply = b"boom" if code == 500 else b""
            if code != 204:
                self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
        except OSError:
            pass  # the deliverer went away (timed out, killed)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def check_each_request_signed_and_one_body_per_webhook_id(
    requests: list[dict[str, Any]], secret: str
) -> dict[str, set[bytes]]:
    """Every request verifies (signed with the secret, recent), its webhook-id is its transition; a
    retry never changes the body. Returns the bodies by webhook id."""
    reference = ReferenceWebhook(secret)
    by_id: dict[str, set[bytes]] = defaultdict(set)
    ids_of_body: dict[bytes, set[str]] = defaultdict(set)
    for request in requests:
        headers, body = request["headers"], request["body"]
        payload = reference.verify(body, headers)  # raises unless signed with the secret (and recent)
        webhook_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
        assert webhook_id == str(payload["transition_id"]), (webhook_id, payload)
        by_id[webhook_id].add(body)
        ids_of_body[body].add(webhook_id)
    assert all(len(bodies) == 1 for bodies in by_id.values()), "a retry changed the body"
    assert all(len(ids) == 1 for ids in ids_of_body.values()), "one body under two webhook ids"
    return by_id


def check_every_transition_received_acknowledged_and_unchanged(
    requests: list[dict[str, Any]], by_id: dict[str, set[bytes]], transitions: dict[int, dict[str, Any]]
) -> None:
    acknowledged = {int(json.loads(r["body"])["transition_id"]) for r in requests if r["outcome"] in ("200", "204")}
    received = {int(i) for i in by_id}
    assert received == set(transitions), (
        f"not received: {sorted(set(transitions) - received)[:10]}; unknown: {sorted(received - set(transitions))[:10]}"
    )
    assert acknowledged == set(transitions), f"never answered 2xx: {sorted(set(transitions) - acknowledged)[:10]}"
    for transition_id, row in transitions.items():
        (body,) = by_id[str(transition_id)]
        got = json.loads(body)
        expected = {**row, "job_id": str(row["job_id"]), "transitioned_at": None}
        assert dt.datetime.fromisoformat(got.pop("transitioned_at")) == row["transitioned_at"], (got, row)
        got["transitioned_at"] = None
        assert got == expected


def check_posted_in_order_never_around_a_transition(
    requests: list[dict[str, Any]], transitions: dict[int, dict[str, Any]]
) -> None:
    """The first request for a transition comes after a 2xx answer to the one before it."""
    ordered = sorted(transitions)
    answered: set[int] = set()
    for request in requests:
        transition_id = int(json.loads(request["body"])["transition_id"])
        position = ordered.index(transition_id)
        assert position == 0 or ordered[position - 1] in answered, (
            f"transition {transition_id} posted before {ordered[position - 1]} was acknowledged"
        )
        if request["outcome"] in ("200", "204"):
            answered.add(transition_id)


def check_requests_in_flight_at_a_kill_came_again(requests: list[dict[str, Any]], held: list[bytes]) -> None:
    """A request the receiver took when its deliverer was killed came again, the same."""
    for body in held:
        assert body, "the held request was not the one the deliverer had in flight"
        assert sum(1 for r in requests if r["body"] == body) >= 2, "a request in flight at a kill was not retried"


def test_webhook_delivery_survives_a_failing_receiver_and_a_killed_deliverer(db, engine, conn, tmp_path, capsys):
    seed = 2202
    rng = random.Random(seed)
    secret = "whsec_" + base64.b64encode(rng.randbytes(24)).decode()
    subscriptions.create(conn, "hooks", from_start=True, to_statuses=None)
    receiver = Receiver(seed, slow=1.0)
    receiver.thread.start()
    env = subprocess_env(db, OUTBOX_WEBHOOK_SECRET=secret)
    command = [sys.executable, "-m", "processor.cli", "deliver", "hooks", "--webhook", receiver.url,
               "--timeout", "0.5", "--max-attempts", "1000", "--max-delay", "0.2"]  # fmt: skip
    deliverers: list[Process] = []
    kills = Counter()
    held: list[bytes] = []  # bodies of requests in flight when their deliverer was killed

    def spawn() -> Process:
        deliverers.append(Process(command, env, tmp_path / f"deliver-{len(deliverers)}.log"))
        return deliverers[-1]

    def active(process: Process) -> bool:
        assert process.process.poll() is None, f"the deliverer exited:\n{process.output()[-3000:]}"
        return consumer_active(conn, f"outbox-deliver:%:{process.pid}")

    def kill(process: Process) -> None:
        process.kill()
        session_gone(conn, f"outbox-deliver:%:{process.pid}")

    started = time.monotonic()
    worker = WorkerProcess(worker_env(db), tmp_path / "worker.log")
    # Transitions keep coming while the deliverers are killed (a few a second).
    writers = workload.PipelineWriters(db, engine, threads=2, seed=seed, pace=0.4).start()
    try:
        for kind in ("random", "random", "held", "standby", "random", "held", "random"):
            process = spawn()
            if kind == "standby":
                # Two deliverers: one delivers, the other stands by, and takes over when it is killed.
                pair = (process, spawn())
                first = wait_for(lambda: [p for p in pair if active(p)], what="a deliverer to be active")  # noqa: B023
                assert len(first) == 1, "two deliverers active at once"
                process, standby = (pair[0], pair[1]) if first[0] is pair[0] else (pair[1], pair[0])
                wait_for(lambda: backend_of(conn, f"outbox-deliver:%:{standby.pid}"), what="the standby's session")  # noqa: B023
                assert not active(standby), "two deliverers active at once"
                time.sleep(rng.uniform(0, 1.5))  # the random moment of the kill
                kill(process)
                wait_for(lambda: active(standby), what="the standby to take over")  # noqa: B023
                kill(standby)
                kills["active, then the standby that took over"] += 2
            elif kind == "held":
                # Killed with a request in flight that the receiver took (and answers 200 too late).
                receiver.release.clear()
                receiver.holding.clear()
                with receiver.lock:
                    receiver.hold = True
                wait_for(lambda: active(process) and receiver.holding.is_set(), what="a request to be held")  # noqa: B023
                kill(process)
                held.append(receiver.held_body)
                receiver.release.set()
                kills["with a request in flight"] += 1
            else:
                wait_for(lambda: active(process), what="the deliverer to be active")  # noqa: B023
                since = receiver.count()
                wait_for(lambda: receiver.count() >= since + 3, what="the deliverer to post")  # noqa: B023
                time.sleep(rng.uniform(0, 1.5))  # the random moment of the kill
                kill(process)
                kills["at a random moment"] += 1
        # The last deliverer, against the failing receiver a while longer, then the receiver recovers.
        final = spawn()
        wait_for(lambda: active(final), what="the last deliverer to be active")
        wait_for(lambda: active(final) and receiver.failed() >= 60, timeout=90,
                 what="60 requests to the failing receiver")  # fmt: skip
        writers.stop()
        wait_for(lambda: worker.process.poll() is None and pending_work(conn) == 0, timeout=60,
                 what="the worker to fold every write")  # fmt: skip
        with receiver.lock:
            receiver.failing = False  # the receiver recovers
        wait_for(lambda: final.process.poll() is None and subscription(conn, "hooks").lag == 0, timeout=60,
                 what="the deliverer to catch up")  # fmt: skip
        assert final.terminate() == 0, final.output()[-3000:]
        stop_cleanly(worker)
    finally:
        writers.stop_event.set()
        receiver.release.set()
        for process in deliverers:
            process.kill()
        worker.kill()
    elapsed = time.monotonic() - started

    transitions = transition_rows(conn)
    info = subscription(conn, "hooks")
    assert info.lag == 0 and info.position == max(transitions) and info.retrying == info.parked == 0
    assert subscriptions.failures(conn, "hooks") == []
    requests = list(receiver.requests)
    by_id = check_each_request_signed_and_one_body_per_webhook_id(requests, secret)
    check_every_transition_received_acknowledged_and_unchanged(requests, by_id, transitions)
    check_posted_in_order_never_around_a_transition(requests, transitions)
    check_requests_in_flight_at_a_kill_came_again(requests, held)
    outcomes = Counter(r["outcome"] for r in requests if r["failing"])

    # A bad secret: one line, exit 1, the secret not echoed, nothing posted.
    before = receiver.count()
    for how in ("environment", "option"):
        bad = "whsec_notbase64!!"
        args = [*command[:7]] + (["--secret", bad] if how == "option" else [])
        env = subprocess_env(db, OUTBOX_WEBHOOK_SECRET=bad) if how == "environment" else subprocess_env(db)
        result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        output = (result.stdout + result.stderr).strip()
        assert result.returncode == 1, (how, result.returncode, output)
        assert len(output.splitlines()) == 1 and output.startswith("error: "), (how, output)
        assert "notbase64" not in output and "!!" not in output, (how, output)
    assert receiver.count() == before
    receiver.shutdown()
    receiver.server_close()
    with capsys.disabled():
        print(
            f"\nwebhook test (seed {seed}): {len(transitions)} transitions delivered in {elapsed:.1f} s through "
            f"{len(requests)} requests ({dict(outcomes)} while the receiver failed); "
            f"{sum(kills.values())} SIGKILLs of the deliverer {dict(kills)}; every request verified by standardwebhooks"
        )


# --- 3. transitions against an audit, 2 partitions, workers killed ------------------------------


class WorkerSlot:
    """One worker's place in the fleet: `outbox run`, or a worker that SIGKILLs itself between
    writing a batch (job state and transitions) and committing it (tests/reliability/crashing_worker)."""

    def __init__(self, db: DatabaseUrl, tmp_path: Path, index: int) -> None:
        self.db, self.tmp_path, self.index = db, tmp_path, index
        self.process: Process | None = None
        self.crashing = False
        self.generation = 0

    def start(self, crashing: bool) -> None:
        self.generation += 1
        self.crashing = crashing
        module = "tests.reliability.crashing_worker" if crashing else "processor.cli"
        command = [sys.executable, "-m", module] + ([] if crashing else ["run", "--log-level", "DEBUG"])
        env = worker_env(db=self.db, OUTBOX_BATCH_SIZE="100", CRASH_PROBABILITY="0.03" if crashing else "0")
        self.process = Process(command, env, self.tmp_path / f"worker-{self.index}-{self.generation}.log")

    def exited(self) -> bool:
        """Whether it is gone: a crashing worker that killed itself (fine); anything else fails the test."""
        assert self.process is not None
        code = self.process.process.poll()
        if code is None:
            return False
        self.process.wait()
        assert self.crashing and code == -signal.SIGKILL, (
            f"a worker exited with {code}:\n{self.process.output()[-3000:]}"
        )
        return True


class TransitionFollower:
    """A reader that follows the transitions by id, as a subscription does: it must see every one
    (transitions commit in the order of their ids, whichever partition wrote them)."""

    def __init__(self, db: DatabaseUrl) -> None:
        self.db = db
        self.seen: list[int] = []
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._follow, name="follower", daemon=True)

    def _follow(self) -> None:
        try:
            with connect(self.db, application_name="test-follower") as reader:
                position = 0
                while True:
                    last_round = self.stop.is_set()
                    rows = reader.execute(
                        "SELECT transition_id FROM outbox_job_transitions WHERE transition_id > %s ORDER BY 1",
                        [position],
                    ).fetchall()
                    self.seen.extend(row[0] for row in rows)
                    position = rows[-1][0] if rows else position
                    if last_round:
                        return
                    if not rows:
                        self.stop.wait(0.01)
        except BaseException as exc:
            self.errors.append(exc)


class KilledWorkers:
    """Two worker slots on 2 partitions, one of them crashing at first; a worker that killed itself
    is started again (crashing or not, at random)."""

    def __init__(self, db: DatabaseUrl, conn: Conn, tmp_path: Path, seed: int) -> None:
        self.conn = conn
        self.slots = [WorkerSlot(db, tmp_path, i) for i in range(2)]
        self.kills: Counter[str] = Counter()
        self.crash_rng = random.Random(seed + 1)

    def start(self) -> None:
        for slot in self.slots:
            slot.start(crashing=slot.index == 1)

    def serving(self) -> bool:
        """Whether live workers hold both partitions (a worker that killed itself is started again)."""
        for slot in self.slots:
            if slot.exited():
                self.kills["killed itself before a commit"] += 1
                slot.start(crashing=self.crash_rng.random() < 0.5)
        # Both consume a partition each (a worker just started waits for its share).
        pids = {slot.process.pid for slot in self.slots if slot.process is not None}
        return shares(self.conn, pids, 2) == [1, 1]

    def kill_one_at_random(self, rng: random.Random) -> None:
        wait_for(self.serving, timeout=60, what="both workers to consume a partition each")
        time.sleep(rng.uniform(0.1, 1.5))  # the random moment of the next kill
        slot = rng.choice(self.slots)
        assert slot.process is not None
        if slot.exited():
            self.kills["killed itself before a commit"] += 1
        else:
            slot.process.kill()
            self.kills["killed by the test"] += 1
        slot.start(crashing=self.crash_rng.random() < 0.5)

    def fold_the_rest_without_crashing(self) -> None:
        """The writers stopped: workers that do not crash fold the rest, then stop cleanly."""
        for slot in self.slots:
            assert slot.process is not None
            if not slot.exited():
                slot.process.kill()
            slot.start(crashing=False)
        wait_for(lambda: self.serving() and pending_work(self.conn) == 0, timeout=120,
                 what="the workers to fold every write")  # fmt: skip
        for slot in self.slots:
            assert slot.process is not None
            assert slot.process.terminate() == 0, slot.process.output()[-3000:]

    def kill_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                slot.process.kill()


def check_a_follower_by_id_saw_every_transition(conn: Conn, seen: list[int]) -> list[int]:
    ids = [row[0] for row in conn.execute("SELECT transition_id FROM outbox_job_transitions ORDER BY 1")]
    assert len(ids) == len(set(ids)) > 0
    assert seen == ids, (
        f"a reader following by id missed {sorted(set(ids) - set(seen))[:10]} (committed after a higher id)"
    )
    return ids


def check_transitions_equal_the_audit_job_by_job(conn: Conn) -> dict[Any, list[tuple[Any, ...]]]:
    transitions = chains(conn, "outbox_job_transitions", "transition_id")
    audit = chains(conn, "job_state_audit", "audit_id")
    differ = [job for job in set(transitions) | set(audit) if transitions.get(job) != audit.get(job)]
    assert not differ, f"{len(differ)} jobs whose transitions differ from the audit, e.g. {differ[0]}: " + str(
        (transitions.get(differ[0]), audit.get(differ[0]))
    )
    return transitions


def check_each_jobs_chain_is_whole_and_ends_at_its_state(conn: Conn, transitions: dict[Any, Any]) -> None:
    states = {row[0]: (row[1], row[2]) for row in conn.execute("SELECT job_id, status, current_step FROM jobs")}
    assert set(transitions) <= set(states)
    for job_id, (status, step) in states.items():
        chain = transitions.get(job_id, [])
        at = ("queued", None)  # every job here was created queued, not started
        for change in chain:
            assert change[:2] == at, f"job {job_id}: the chain breaks at {change} (was at {at}): {chain}"
            assert change[2:] != change[:2], f"job {job_id}: a transition that changes nothing: {change}"
            at = change[2:]
        assert at == (status, step), f"job {job_id} is {(status, step)}, its transitions end at {at}"


def test_transitions_match_an_audit_of_job_writes_under_partitions_and_killed_workers(
    db, engine, conn, tmp_path, capsys
):
    seed = 2303
    rng = random.Random(seed)
    conn.execute(JOB_STATE_AUDIT)
    repartition_now(db, 2)
    jobs = make_jobs(engine, 80, rng)
    follower = TransitionFollower(db)
    follower.thread.start()
    workers = KilledWorkers(db, conn, tmp_path, seed)
    workers.start()
    started = time.monotonic()
    try:
        # Each writer pauses 10 ms between transactions: 8 of them leave the 2 cores' share the
        # workers need (load shaping, not synchronisation).
        with Writers(db, engine, jobs, threads=8, seed=seed, pause=0.01) as writers:
            while workers.kills["killed by the test"] < 6:
                workers.kill_one_at_random(rng)
            writers.stop()
            writers.check()
        (during,) = conn.execute("SELECT count(*) FROM outbox_job_transitions").fetchone()
        workers.fold_the_rest_without_crashing()
    finally:
        follower.stop.set()
        workers.kill_all()
    follower.thread.join(30)
    assert not follower.errors, repr(follower.errors[0])
    elapsed = time.monotonic() - started

    ids = check_a_follower_by_id_saw_every_transition(conn, follower.seen)
    transitions = check_transitions_equal_the_audit_job_by_job(conn)
    check_each_jobs_chain_is_whole_and_ends_at_its_state(conn, transitions)
    labels = conn.execute("SELECT job_id, partition, written_by FROM outbox_job_transitions").fetchall()
    assert all(p == partition_of(job, 2) and by == "processor" for job, p, by in labels)
    jobs_total, jobs_done = check_final_state(conn, 2)  # and job state equals the reference
    with capsys.disabled():
        print(
            f"\ntransitions audit test (seed {seed}): {len(ids)} transitions of {len(transitions)} jobs "
            f"({jobs_total} jobs, {jobs_done} done) on 2 partitions in {elapsed:.1f} s; {writers.summary()}; "
            f"workers {dict(workers.kills)}, {during} transitions written during the kills; equal to the audit "
            "job by job, chains whole, a follower by id saw every one"
        )


def test_a_frozen_subscriber_is_replaced_by_its_standby_and_delivers_nothing_twice(db, engine, conn, tmp_path):
    """SIGSTOP the active consumer: the server ends its idle session after the consumer's
    session_timeout, which releases its lock; the standby takes over. Resumed, the frozen one finds
    its session gone, reconnects and stands by."""
    conn.execute(EFFECTS)
    subscriptions.create(conn, "effects", from_start=True, to_statuses=None)
    calls_log = tmp_path / "calls.log"
    env = subprocess_env(
        db, SUBSCRIBER_CALLS_LOG=str(calls_log), SUBSCRIBER_GATE=str(GATE), SUBSCRIBER_SESSION_TIMEOUT="2"
    )
    command = [sys.executable, "-m", "tests.reliability.subscriber_process", "effects"]
    frozen = Process(command, env, tmp_path / "frozen.log")
    try:
        wait_for(lambda: consumer_active(conn, f"test-subscriber:{frozen.pid}"), what="the first consumer")
        frozen.process.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        standby = Process(command, env, tmp_path / "standby.log")
        try:
            wait_for(lambda: consumer_active(conn, f"test-subscriber:{standby.pid}"), what="the standby to take over")
            took_over = time.monotonic() - stopped_at
            with engine.begin() as c:
                jobs = [outbox.create_job(c, variants=1)[1][0] for _ in range(5)]
            conn.execute(
                "UPDATE jobs_variants SET status = 'running', current_step = 'detect' WHERE job_variants_id = ANY(%s)",
                [jobs],
            )
            WorkerProcess(subprocess_env(db), tmp_path / "worker.log", "--until-idle").wait()
            wait_for(lambda: conn.execute("SELECT count(*) FROM effects").fetchone()[0] == 5, what="the effects")
            frozen.process.send_signal(signal.SIGCONT)
            wait_for(lambda: backend_of(conn, f"test-subscriber:{frozen.pid}"), what="the resumed one to reconnect")
            assert consumer_active(conn, f"test-subscriber:{standby.pid}")
            assert not consumer_active(conn, f"test-subscriber:{frozen.pid}")
            assert standby.terminate() == 0
        finally:
            standby.kill()
        counts = conn.execute("SELECT transition_id, count(*) FROM effects GROUP BY 1").fetchall()
        assert len(counts) == 5 and all(n == 1 for _, n in counts)
        assert set(calls_by_process(calls_log)) == {standby.pid}
        print(f"\nfrozen consumer replaced {took_over:.1f} s after its SIGSTOP (session_timeout 2 s)")
    finally:
        frozen.process.send_signal(signal.SIGCONT)
        frozen.kill()
