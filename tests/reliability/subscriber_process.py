"""An ``outbox.Subscriber`` as a process of its own, for tests that SIGKILL it.

Run as ``python -m tests.reliability.subscriber_process NAME`` with OUTBOX_DATABASE_URL set. The
handler inserts the transition into ``effects`` (transition_id, job_id, to_status) in the
transaction that acknowledges it. Two test hooks, both outside the behaviour under test:

* SUBSCRIBER_CALLS_LOG: a file to which every handler call appends ``<pid> <transition_id>``
  (before its INSERT, unbuffered, O_APPEND): which transitions a killed process was handling.
* SUBSCRIBER_GATE: an advisory lock key the handler takes shared after its INSERT. Free, it costs
  a statement; while the test holds it exclusively, the handler waits there with its transaction
  open, so that the test can SIGKILL the process between the effect and the commit.

SUBSCRIBER_SESSION_TIMEOUT (seconds, default 60) is the subscriber's session_timeout.

SIGTERM stops it after the transition in hand (exit 0).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import outbox
from processor.cli_common import stop_on_signals


def main() -> None:
    name = sys.argv[1]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    calls = os.open(os.environ["SUBSCRIBER_CALLS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    gate = int(os.environ["SUBSCRIBER_GATE"])
    pid = os.getpid()

    def handler(conn: Any, transition: outbox.Transition) -> None:
        os.write(calls, f"{pid} {transition.transition_id}\n".encode())
        conn.execute(
            "INSERT INTO effects (transition_id, job_id, to_status) VALUES (%s, %s, %s)",
            [transition.transition_id, transition.job_id, transition.to_status],
        )
        conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", [gate])

    subscriber = outbox.Subscriber(
        name,
        os.environ["OUTBOX_DATABASE_URL"],
        handler,
        poll_interval=0.05,
        standby_interval=0.05,
        application_name=f"test-subscriber:{pid}",
        session_timeout=float(os.environ.get("SUBSCRIBER_SESSION_TIMEOUT", "60")),
    )
    with stop_on_signals(subscriber):
        subscriber.run()


if __name__ == "__main__":
    main()
