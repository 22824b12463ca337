"""A worker's upkeep: RQ's heartbeats with the worker's gauges, and RQ's maintenance.

Heartbeats (every TOKENRELAY_HEARTBEAT_INTERVAL) also notice the jobs whose RQ status
changed elsewhere while they ran (a `job.cancel()`, a clean-up): those are stopped.
Maintenance (every TOKENRELAY_MAINTENANCE_INTERVAL) ends abandoned jobs, tidies RQ's
registries and trims the lifecycle stream.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog
from rq.job import JobStatus

from tokenrelay.outage import is_down
from tokenrelay.stream.keys import WorkerStat
from tokenrelay.stream.protocol import CANCELLED, ErrorEntry

if TYPE_CHECKING:
    from tokenrelay.worker.loop import WorkerLoop

log = structlog.get_logger()


async def heartbeats(loop: WorkerLoop) -> None:
    """RQ's heartbeats for the worker and every job it runs, until cancelled."""
    while True:
        await asyncio.sleep(loop.settings.heartbeat_interval)
        executions = {r.execution.id: job_id for job_id, r in loop.running.items() if r.execution}
        known = [r.execution for r in loop.running.values() if r.execution is not None]
        try:
            gone = await loop.bookkeep(loop.worker.tick, known, stats(loop))
        except Exception as exc:
            if is_down(exc):
                loop.redis_down(exc)
            else:
                log.exception("worker.heartbeat_failed")
            continue
        for execution_id, status in gone.items():
            job_id = executions.get(execution_id)
            if job_id is not None and job_id in loop.running:
                _lost(loop, job_id, status)


def stats(loop: WorkerLoop) -> dict[str, float]:
    """The worker's gauges, for its stats hash (and the metrics exporter)."""
    taking = not (loop.lag.overloaded or loop.stopping.is_set())
    return {
        WorkerStat.LOOP_LAG: round(loop.lag.take_worst(), 4),
        WorkerStat.IN_FLIGHT: loop.busy,
        WorkerStat.TAKING_JOBS: int(taking),
        WorkerStat.STREAM_WRITES: loop.batcher.flushes,
        WorkerStat.TOKEN_ENTRIES: loop.batcher.entries,
    }


def _lost(loop: WorkerLoop, job_id: str, status: str | None) -> None:
    """A running job's RQ status changed elsewhere: a `job.cancel()`, or a clean-up."""
    attempt = loop.running[job_id].run.attempt
    if status == JobStatus.CANCELED:
        stop = ErrorEntry(CANCELLED, "cancelled on request", False, attempt)
    else:
        stop = ErrorEntry("JobLost", "the job was ended elsewhere while it ran", True, attempt)
    loop.stop(job_id, "lost", stop)


async def maintenance(loop: WorkerLoop) -> None:
    """End abandoned jobs, tidy RQ, trim lifecycle events, until cancelled."""
    while True:
        try:
            await loop.bookkeep(loop.worker.clean_up)
        except Exception as exc:
            if is_down(exc):
                loop.redis_down(exc)
            else:
                log.exception("worker.maintenance_failed")
        await asyncio.sleep(loop.settings.maintenance_interval)
