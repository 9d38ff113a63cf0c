"""A worker that kills itself with SIGKILL at random between applying a batch and committing it.

Run as ``python -m tests.reliability.crashing_worker`` with the usual OUTBOX_* settings and
CRASH_PROBABILITY (per batch). Used by the kill -9 soak test.
"""

from __future__ import annotations

import os
import random
import signal

from processor.settings import load_settings
from processor.worker import Worker


def main() -> None:
    probability = float(os.environ.get("CRASH_PROBABILITY", "0"))
    rng = random.Random(os.getpid())

    def maybe_crash() -> None:
        if rng.random() < probability:
            os.kill(os.getpid(), signal.SIGKILL)  # the batch is applied, not committed

    settings = load_settings()
    # The soak's random kill window starts here, not at spawn: on a busy host the interpreter's
    # start-up alone can outlast the window, and a worker killed before it reads never crashes itself.
    print("started", flush=True)
    Worker(settings, settings.database(), before_commit=maybe_crash).run()


if __name__ == "__main__":
    main()
