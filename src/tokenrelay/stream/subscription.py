"""A follower's place at the shared reader (`StreamHub`): a small, bounded queue of live records.

The hub pushes each batch it reads to every subscription of the stream; the follower takes
what has queued up, all at once. A subscription never grows past its limit (but for one
read: an empty queue takes any one batch, at most a page of XREAD): one that would
is emptied and marked `overflowed`, and its follower goes back to Redis for what it missed
(the entries are all there), so a slow follower costs memory for its limit, not its lag.
"""

from __future__ import annotations

import asyncio

from tokenrelay.stream.protocol import Record


class Subscription:
    """Live records of one stream for one follower, at most `limit` of them queued."""

    __slots__ = ("_records", "_waiter", "failure", "key", "limit", "overflowed")

    def __init__(self, key: str, limit: int) -> None:
        self.key = key
        self.limit = limit
        self.overflowed = False
        self.failure: BaseException | None = None
        self._records: list[Record] = []
        self._waiter: asyncio.Future[None] | None = None

    def push(self, batch: list[Record]) -> None:
        """Queue records the hub read (the hub's task calls this); past the limit, overflow.

        An empty queue takes any one batch (at most one XREAD page): a burst that a follower
        keeping up takes at once (after an outage, say) is not lag."""
        if self.overflowed or self.failure is not None:
            return
        if self._records and len(self._records) + len(batch) > self.limit:
            self._records.clear()
            self.overflowed = True
        else:
            self._records.extend(batch)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """End the subscription: the follower's next `take` raises `exc`."""
        self.failure = exc
        self._wake()

    def reset(self) -> None:
        """Forget what is queued and the overflow: the follower reads Redis again from here."""
        self._records.clear()
        self.overflowed = False

    async def take(self, timeout: float) -> list[Record]:
        """The records queued since the last call, waiting up to `timeout` seconds for some.

        Returns [] if none came in time, or if the subscription overflowed (see `overflowed`);
        raises the failure the hub ended it with.
        """
        if not self._records and not self.overflowed and self.failure is None:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait([waiter], timeout=timeout)
            finally:
                self._waiter = None
        if self.failure is not None:
            raise self.failure
        batch, self._records = self._records, []
        return batch

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
