"""A worker's side of job leases: renewing its own, and taking over dead workers' jobs.

Every third of TOKENRELAY_LEASE_TTL the worker renews the lease of each job whose stream it
holds, in one pipeline; a job whose lease is refused has another writer (it was taken over
while this worker was presumed dead), has ended, or has vanished, and is stopped without a
word to its stream. Every second it looks for leases that lapsed more than
TOKENRELAY_TAKEOVER_AFTER ago, as many as it has free slots and a few more (so that a busy
worker takes them over too), claims each and runs its next attempt.

Not right after Redis came back (to this worker, or restarted): every lease lapsed while
Redis was away, until the live workers renew theirs.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import structlog
from rq.job import JobStatus

from tokenrelay.errors import StreamLostError, WriterFencedError
from tokenrelay.outage import UNAVAILABLE
from tokenrelay.stream.lease_scripts import Claim
from tokenrelay.stream.protocol import CANCELLED, ErrorEntry
from tokenrelay.worker.leases import SCAN_INTERVAL, Held

if TYPE_CHECKING:
    from tokenrelay.worker.loop import WorkerLoop

log = structlog.get_logger()

#: Jobs of dead workers a worker takes over beyond its free slots, per look.
TAKEOVER_EXTRA = 5


async def renew_leases(loop: WorkerLoop) -> None:
    """Renew the lease of every job whose stream this worker holds, until cancelled."""
    while True:
        await asyncio.sleep(loop.leases.renew_every)
        held = [
            Held(job_id, r.run.stream.writer_token, r.run.stream.ttl)
            for job_id, r in loop.running.items()
            if r.run.stream is not None
            and r.run.stream.begun
            and not r.run.stream.closed
            and not r.task.done()
        ]
        try:
            refused = await loop.leases.renew(held)
        except UNAVAILABLE as exc:
            loop.redis_down(exc)
            continue
        except Exception:  # never the end of renewals: the next round tries again
            log.exception("worker.renewal_failed")
            continue
        for job_id, error in refused.items():
            log.warning("job.lease_refused", job_id=job_id, reason=str(error))
            loop.stop(job_id, _why_refused(error), None)


def _why_refused(error: Exception) -> str:
    if isinstance(error, WriterFencedError):
        return "fenced"
    return "gone" if isinstance(error, StreamLostError) else "closed"


async def take_over_lapsed(loop: WorkerLoop) -> None:
    """Every second, take over the jobs whose lease lapsed, until cancelled."""
    quiet = loop.leases.ttl + loop.leases.takeover_after
    while True:
        if not (
            loop.stopping.is_set() or loop.outage.down or loop.outage.recently_recovered(quiet)
        ):
            await _look(loop)
        await asyncio.sleep(SCAN_INTERVAL)


async def _look(loop: WorkerLoop) -> None:
    room = max(loop.concurrency - loop.busy, 0) + TAKEOVER_EXTRA
    try:
        lapsed = await loop.leases.lapsed(room)
    except UNAVAILABLE as exc:
        loop.redis_down(exc)
        return
    except Exception:  # never the end of takeovers: the next look tries again
        log.exception("worker.takeover_scan_failed")
        return
    if lapsed and await _redis_just_started(loop):
        return
    for job_id in lapsed:
        if job_id in loop.running:
            continue  # its own job, whose renewal is late: the next renewal mends it
        loop.reserve()
        loop.track(asyncio.create_task(_take_over(loop, job_id), name=f"takeover-{job_id}"))


async def _redis_just_started(loop: WorkerLoop) -> bool:
    """Whether Redis restarted too recently for its leases to tell dead workers from live
    ones: every lease lapsed while it was down, until their workers renew them."""
    try:
        uptime = (await loop.redis.info("server"))["uptime_in_seconds"]
    except Exception:
        return True  # cannot tell: look again at the next scan
    return bool(uptime < loop.leases.ttl + loop.leases.takeover_after)


async def _take_over(loop: WorkerLoop, job_id: str) -> None:
    """Claim a lapsed job and run its next attempt here."""
    try:
        claim = await loop.leases.claim(job_id)
        adopted = None if claim is None else await loop.bookkeep(loop.worker.adopt, job_id)
    except Exception:
        log.exception("worker.takeover_failed", job_id=job_id)
        loop.release()
        return
    if claim is None or adopted is None:
        loop.release()
    elif isinstance(adopted, str):
        await _end_unadoptable(loop, job_id, claim, adopted)
        loop.release()
    else:
        loop.start(*adopted, claim=claim)


async def _end_unadoptable(loop: WorkerLoop, job_id: str, claim: Claim, why: str) -> None:
    """End the stream of a claimed job that RQ says ended while its worker was dead (a
    cancel, a stop), or no longer has, or that is not ours to run."""
    settings = loop.settings
    stream = loop.batcher.stream(
        job_id, ttl=settings.stream_ttl, events_cap=settings.events_max_len, claim=claim
    )
    if why == JobStatus.CANCELED:
        entry = ErrorEntry(CANCELLED, "cancelled on request", False, claim.attempt)
    elif why == JobStatus.STOPPED:
        entry = ErrorEntry("JobStopped", "the job was stopped on request", False, claim.attempt)
    else:
        message = f"the job's worker died, and RQ's record of the job is {why}"
        entry = ErrorEntry("JobLost", message, False, claim.attempt)
    try:
        await stream.close(entry, queue=None, model=None, nonce=uuid.uuid4().hex)
    except Exception:
        log.exception("worker.takeover_failed", job_id=job_id)
