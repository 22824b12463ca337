"""Running a worker: `tokenrelay worker`, up to `--concurrency` generations at once per process."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from tokenrelay.connection import client_for
from tokenrelay.outage import Outage
from tokenrelay.settings import Settings
from tokenrelay.worker.loop import WorkerLoop
from tokenrelay.worker.rq_worker import RelayWorker

log = structlog.get_logger()


def run_worker(
    settings: Settings,
    *,
    queues: Sequence[str] = (),
    burst: bool = False,
    name: str | None = None,
    concurrency: int | None = None,
) -> None:
    """Work on the queues until stopped (or, with `burst`, until they are empty)."""
    worker = RelayWorker(
        queues or [settings.queue],
        connection=client_for(settings),
        settings=settings,
        outage=Outage(settings.redis_outage_limit, who="worker"),
        name=name,
    )
    slots = concurrency or settings.worker_concurrency
    log.info("worker.starting", worker=worker.name, queues=worker.queue_names(), concurrency=slots)
    worker.bootstrap(settings.log_level.upper())  # registers it with RQ, listens for commands
    try:
        asyncio.run(WorkerLoop(worker, settings, concurrency=slots, burst=burst).run())
    finally:
        worker.teardown()  # type: ignore[no-untyped-call]  # unannotated in rq
    log.info("worker.stopped", worker=worker.name)
