"""The shared reader's own connection: one blocked XREAD at a time, cut short on demand.

The hub reads every watched stream with one `XREAD BLOCK` on a connection of its own. When a
stream joins the watched set, `changed()` cuts the read in flight short with `CLIENT UNBLOCK`
from another connection of the pool (the blocked one cannot be used meanwhile), so that the
next read includes the new stream at once instead of after the block runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.outage import REDIS_DOWN
from tokenrelay.stream.channel import REPLY_GRACE
from tokenrelay.stream.reader import PAGE

#: Seconds one XREAD blocks on the server.
BLOCK = 5.0

#: How long to keep trying to cut a read short, 5 ms apart (the XREAD may not have reached
#: Redis yet when the change comes).
_UNBLOCK_TRIES = 200


class BlockedRead:
    """Sends XREAD BLOCK on a pooled connection it keeps, named `name` in CLIENT LIST."""

    def __init__(self, client: aioredis.Redis, name: str) -> None:
        self.client = client
        self.name = name
        self.reads = 0  # XREAD calls sent, for tests and benchmarks
        self._generation = 0  # bumped by every change of what to read
        self._reading: int | None = None  # the generation of the XREAD in flight
        self._connection: Any = None
        self._client_id: int | None = None
        self._waker: asyncio.Task[None] | None = None

    async def xread(self, keys: list[str], ids: list[str]) -> Any:
        """One XREAD of `keys` after `ids`, blocking up to BLOCK seconds; its raw reply."""
        connection = await self._connect()
        self._reading = self._generation
        self.reads += 1
        try:
            await connection.send_command(
                "XREAD", "COUNT", PAGE, "BLOCK", int(BLOCK * 1000), "STREAMS", *keys, *ids
            )
            sent = time.monotonic()
            reply = await connection.read_response(timeout=BLOCK + REPLY_GRACE)
            if reply is None and time.monotonic() - sent >= BLOCK + REPLY_GRACE:
                # redis-py answers a read that timed out with None: Redis went silent.
                raise RedisTimeoutError(f"no reply from Redis within {BLOCK + REPLY_GRACE:g} s")
            return reply
        except BaseException:
            # A blocked read cut off midway leaves its reply behind: never reuse the socket.
            await asyncio.shield(self.disconnect())
            raise
        finally:
            self._reading = None

    def changed(self) -> None:
        """What to read has changed: cut the read in flight short."""
        self._generation += 1
        if self._reading is not None and self._waker is None:
            self._waker = asyncio.create_task(self._unblock(), name=f"{self.name}-unblock")

    async def interrupt(self) -> None:
        """End the read in flight now (its reply is empty)."""
        if self._reading is not None and self._client_id is not None:
            with contextlib.suppress(*REDIS_DOWN):
                await self.client.client_unblock(self._client_id)

    async def disconnect(self) -> None:
        """Close the connection at once (waiting for the close can take its connect timeout);
        the next read connects again."""
        self._client_id = None
        if self._connection is not None:
            await self._connection.disconnect(nowait=True)

    async def close(self) -> None:
        """Stop cutting reads short and give the connection back to the pool."""
        waker, self._waker = self._waker, None
        if waker is not None:
            waker.cancel()
            await asyncio.gather(waker, return_exceptions=True)
        if self._connection is not None:
            await self.disconnect()
            await self.client.connection_pool.release(self._connection)
            self._connection = None

    async def _unblock(self) -> None:
        try:
            for _ in range(_UNBLOCK_TRIES):
                reading = self._reading
                if reading is None or reading >= self._generation:
                    return
                if self._client_id is not None:
                    with contextlib.suppress(*REDIS_DOWN):
                        if await self.client.client_unblock(self._client_id):
                            return
                await asyncio.sleep(0.005)  # the XREAD has not reached Redis yet
        finally:
            self._waker = None

    async def _connect(self) -> Any:
        """The connection, named and with its client id known (after a reconnect too)."""
        if self._connection is None:
            pool = self.client.connection_pool
            self._connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # unannotated
        if self._client_id is None:
            connection = self._connection
            await connection.send_command("CLIENT", "SETNAME", self.name)
            await connection.read_response()
            await connection.send_command("CLIENT", "ID")
            self._client_id = int(await connection.read_response())
        return self._connection
