"""An asyncio application that embeds the outbox worker (``processor.WorkerService``), as a process of
its own, for tests that SIGKILL it.

Run as ``python -m tests.reliability.app_process`` with the OUTBOX_* settings in its environment (the
service reads them, as an application's would). As an application does, it owns its logging and its
signals: it logs each change of the worker's health (``health: <state> partitions=<p,...> ok=<bool>``),
and on SIGTERM cancels the worker's task (the batch in hand commits or rolls back, the partitions are
released) and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import processor

log = logging.getLogger("app")


async def report_health(service: processor.WorkerService) -> None:
    """What an application's health endpoint would show, logged when it changes."""
    last = None
    while True:
        health = service.health()
        seen = (health.state, health.partitions, health.ok)
        if seen != last:
            partitions = ",".join(str(p) for p in health.partitions) or "-"
            log.info("health: %s partitions=%s ok=%s", health.state, partitions, health.ok)
            last = seen
        await asyncio.sleep(0.02)


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    service = processor.WorkerService()
    worker = asyncio.create_task(service.run_async())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.cancel)
    reporter = asyncio.create_task(report_health(service))
    try:
        await worker
    except asyncio.CancelledError:
        log.info("worker stopped: %s, %s events applied", service.health().state, service.health().events)
    finally:
        reporter.cancel()


if __name__ == "__main__":
    asyncio.run(main())
