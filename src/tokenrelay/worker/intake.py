"""Taking job ids off RQ's queues for the worker loop: as many as it has room for, at once.

With one queue, ids move to RQ's intermediate list (`LMOVE`), as RQ's own worker moves them,
so that RQ's clean-up finds any a dying worker held; with several, they are popped. What is
there is taken in one round trip; with nothing there, a blocking move waits up to
`DEQUEUE_WAIT`, so an idle worker starts a new job the moment it is queued.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis import asyncio as aioredis
from rq import Queue

from tokenrelay.stream.protocol import text

#: Seconds one wait for a job on the queue lasts before the loop looks around again.
DEQUEUE_WAIT = 1


class Intake:
    """Takes job ids off `queues`; in `burst` mode, never waits."""

    def __init__(self, redis: aioredis.Redis, queues: list[Queue], *, burst: bool) -> None:
        self.redis = redis
        self.queues = queues
        self.burst = burst

    async def take(self, want: int, stopping: asyncio.Event) -> list[tuple[str, str]]:
        """Up to `want` job ids off the queues, with the queue each was on.

        Takes what is there at once; with nothing there, waits (a second at most) for one,
        so an idle worker starts a new job the moment it is queued. In burst mode, never waits.
        """
        queues = self.queues
        if len(queues) == 1:  # RQ's own way: through the intermediate list, which RQ reaps
            queue = queues[0]
            moved = await self._move(queue.key, queue.intermediate_queue_key, want)
            taken = [(job_id, queue.key, queue.intermediate_queue_key) for job_id in moved]
        else:
            taken = [(job_id, key, None) for key, job_id in await self._pop(queues, want)]
        if stopping.is_set():  # they came during the wait, after the warm shutdown began
            for job_id, queue_key, intermediate in taken:
                await self._give_back(job_id, queue_key, intermediate=intermediate)
            return []
        if not taken and self.burst:
            await asyncio.sleep(0.05)
        return [(text(job_id), queue_key) for job_id, queue_key, _ in taken]

    async def _move(self, source: str, target: str, want: int) -> list[Any]:
        """LMOVE up to `want` ids in one round trip; if there were none, BLMOVE one."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for _ in range(want):
                pipe.lmove(source, target, "LEFT", "RIGHT")
            moved = [job_id for job_id in await pipe.execute() if job_id is not None]
        if moved or self.burst:
            return moved
        job_id = await self.redis.blmove(source, target, DEQUEUE_WAIT, "LEFT", "RIGHT")
        return [] if job_id is None else [job_id]

    async def _pop(self, queues: list[Queue], want: int) -> list[tuple[str, Any]]:
        """LPOP up to `want` ids off the queues, in order; if none, BLPOP one."""
        taken: list[tuple[str, Any]] = []
        for queue in queues:
            popped: Any = await self.redis.lpop(queue.key, want - len(taken))
            taken += [(queue.key, job_id) for job_id in popped or []]
            if len(taken) >= want:
                return taken
        if taken or self.burst:
            return taken
        popped = await self.redis.blpop([q.key for q in queues], DEQUEUE_WAIT)
        return [] if popped is None else [(text(popped[0]), popped[1])]

    async def _give_back(self, job_id: Any, queue_key: Any, *, intermediate: str | None) -> None:
        """Put a job taken off its queue back at the front, for another worker to take."""
        async with self.redis.pipeline(transaction=True) as pipe:
            if intermediate is not None:
                pipe.lrem(intermediate, 1, job_id)
            pipe.lpush(queue_key, job_id)
            await pipe.execute()
