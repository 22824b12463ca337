"""Job leases: how a worker says it is alive for each job, and takes over a dead one's jobs.

Each running job holds a lease in Redis (`keys.LEASES`, deadlines by Redis's clock), given
by its `start` entry and renewed by its worker every third of TOKENRELAY_LEASE_TTL, in one
pipeline for all its jobs. A renewal is refused once the stream has another writer (the
job was taken over: this worker was presumed dead) or has ended; the worker then stops
that job.

Every worker looks for leases that ran out more than TOKENRELAY_TAKEOVER_AFTER ago and
claims them (`lease_scripts.CLAIM`): the claim replaces the writer token, so the old worker, if it
comes back, can no longer write, and writes a `stalled` entry for the readers. The claimer
then runs the job's next attempt, going on from the stream's text. From a worker's death to
its job's next token: at most the lease TTL, plus the takeover delay, plus one scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from redis import asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from tokenrelay.outage import REDIS_DOWN, Outage, aretry, down_reply
from tokenrelay.stream import keys, lease_scripts, scripts
from tokenrelay.stream.writer import new_writer_token

log = structlog.get_logger()

#: Seconds between two looks for lapsed leases.
SCAN_INTERVAL = 1.0


@dataclass(frozen=True)
class Held:
    """A lease this worker holds: the job, its writer token, and its stream's TTL."""

    job_id: str
    writer: str
    ttl: int


class Leases:
    """The worker's side of job leases, on the loop's Redis client."""

    def __init__(
        self, client: aioredis.Redis, outage: Outage, *, ttl: float, takeover_after: float
    ) -> None:
        self.client = client
        self.outage = outage
        self.ttl = ttl
        self.takeover_after = takeover_after
        self.lease_ms = int(ttl * 1000)

    @property
    def renew_every(self) -> float:
        """Seconds between two renewals: a third of the lease, so one lost renewal is fine."""
        return self.ttl / 3

    async def renew(self, held: Sequence[Held]) -> dict[str, Exception]:
        """Renew every lease in one pipeline; the refusals by job id (another writer owns the
        stream, it ended, or it vanished). Raises what Redis raises while it is away."""
        if not held:
            return {}
        replies = await self._pipeline(
            lease_scripts.RENEW,
            wait=True,
            calls=[
                (
                    lease_scripts.lease_keys(h.job_id),
                    lease_scripts.renew_args(h.writer, h.job_id, lease_ms=self.lease_ms, ttl=h.ttl),
                )
                for h in held
            ],
        )
        return {
            h.job_id: scripts.refusal(str(reply))
            for h, reply in zip(held, replies, strict=True)
            if isinstance(reply, ResponseError)
        }

    async def lapsed(self, count: int) -> list[str]:
        """Up to `count` jobs whose lease ran out more than `takeover_after` seconds ago."""
        grace = str(int(self.takeover_after * 1000))
        calls = [([keys.LEASES], [grace, str(count)])]
        [found] = await self._pipeline(lease_scripts.LAPSED, calls, wait=False)
        if isinstance(found, Exception):
            raise found
        assert isinstance(found, list)
        return [j.decode() if isinstance(j, bytes) else str(j) for j in found]

    async def claim(self, job_id: str) -> lease_scripts.Claim | None:
        """Take the job over if its lease is still lapsed; None if another worker was faster,
        or the job ended or vanished meanwhile."""
        writer = new_writer_token()
        args = lease_scripts.claim_args(
            job_id,
            grace_ms=int(self.takeover_after * 1000),
            writer=writer,
            lease_ms=self.lease_ms,
        )
        calls = [(lease_scripts.lease_keys(job_id), args)]
        [reply] = await self._pipeline(lease_scripts.CLAIM, calls, wait=False)
        if isinstance(reply, ResponseError):
            log.info("job.takeover_skipped", job_id=job_id, reason=str(scripts.refusal(str(reply))))
            return None
        if not reply:
            return None
        assert isinstance(reply, list)
        attempt, next_seq, streamed = (int(v) for v in reply[:3])
        started_at = float(reply[3]) if reply[3] else None
        log.warning("job.taken_over", job_id=job_id, attempt=attempt, next_seq=next_seq)
        return lease_scripts.Claim(writer, attempt, next_seq, streamed, started_at)

    async def _pipeline(
        self, script: scripts.Script, calls: Sequence[tuple[list[str], list[str]]], *, wait: bool
    ) -> list[object]:
        """Run the script once per call in one pipeline (error replies returned, not raised),
        loading it first if Redis lost it. With `wait`, an outage is waited out (up to its
        limit); without, Redis being away raises at once (after the outage notes it)."""

        async def send() -> list[object]:
            pipe = self.client.pipeline(transaction=False)
            for call_keys, args in calls:
                pipe.evalsha(script.sha, len(call_keys), *call_keys, *args)
            replies: list[object] = await pipe.execute(raise_on_error=False)
            down = down_reply(replies)  # a read-only replica, a busy Redis: an outage
            if down is not None:
                raise down
            if any(isinstance(r, NoScriptError) for r in replies):
                await self.client.script_load(script.source)  # Redis restarted: none of them ran
                return await send()
            return replies

        if wait:
            return await aretry(self.outage, send)
        try:
            replies = await send()
        except REDIS_DOWN as exc:
            self.outage.failed(exc)
            raise
        self.outage.ok()
        return replies
