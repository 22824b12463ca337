"""One Redis connection for a long read: every command within a deadline, outages ridden out.

A reader that follows a stream holds one connection of the client's pool for as long as it
reads. Every command it sends, and every making of its connection, has its own socket
deadline, so the caller's `timeout=` holds even against a Redis that stops answering (only
the wait for a free pooled connection, `connection.POOL_WAIT`, lies outside it). When Redis
goes away (a broken connection, or a reply that does not come in time for a reason other
than the caller's deadline) the channel reconnects with backoff and jitter and sends the
command again, logging the outage once (`tokenrelay.outage`); past the outage limit it
raises RedisUnavailableError, or StreamTimeoutError if the caller's deadline comes first.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from redis import Redis
from redis.connection import Connection
from redis.exceptions import AuthenticationError, MaxConnectionsError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.errors import StreamTimeoutError
from tokenrelay.outage import Outage, backoff, is_down

#: How much longer than the server's block a reply may take before Redis counts as silent.
REPLY_GRACE = 5.0

#: Failures that look like an outage but are not: a full pool, a refused password.
_NOT_AN_OUTAGE = (MaxConnectionsError, AuthenticationError)


class Channel:
    """Sends one command at a time on a pooled connection, within a deadline, across outages.

    Use it as a context manager: leaving it gives the connection back to the pool.
    """

    def __init__(self, client: Redis, *, deadline: float | None, outage: Outage, late: str) -> None:
        self.pool = client.connection_pool
        self.deadline = deadline  # time.monotonic() by which the caller wants an answer
        self.outage = outage
        self.late = late  # the StreamTimeoutError's message
        self._connection: Connection | None = None
        self._broken = False  # the connection failed: reconnect before the next command
        self._timeouts: tuple[Any, Any] | None = None  # its own, while cut to the deadline

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Give the connection back to the pool (dropped first if its timeouts were cut)."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._timeouts is not None:
            connection.disconnect()  # type: ignore[no-untyped-call]  # unannotated
            connection.socket_timeout, connection.socket_connect_timeout = self._timeouts
            self._timeouts = None
        self.pool.release(connection)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline); StreamTimeoutError if none."""
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise StreamTimeoutError(self.late)
        return remaining

    def call(self, *args: Any, block: float = 0.0) -> Any:
        """Send one command and return its raw reply, sent again once Redis is back.

        `block` is how long the server itself may hold the reply (XREAD BLOCK), in seconds.
        """
        tries = 0
        while True:
            try:
                reply = self._send(args, block)
            except _NOT_AN_OUTAGE:
                raise
            except Exception as exc:
                if not is_down(exc):
                    raise
                self._drop()
                self.remaining()  # a failure at the deadline is the deadline's
                self.outage.failed(exc)  # RedisUnavailableError past the outage limit
                self._pause(backoff(tries))
                tries += 1
                continue
            self.outage.ok()
            return reply

    def _send(self, args: tuple[Any, ...], block: float) -> Any:
        connection = self._connect()
        remaining = self.remaining()
        wait = block + REPLY_GRACE if remaining is None else min(block + REPLY_GRACE, remaining)
        try:
            connection.send_command(*args)  # type: ignore[no-untyped-call]  # unannotated
            return connection.read_response(timeout=wait)
        except RedisTimeoutError:
            if remaining is not None and wait >= remaining:  # the deadline cut the wait short
                raise StreamTimeoutError(self.late) from None
            raise

    def _connect(self) -> Connection:
        """The channel's connection, taken from the pool or made again, within the deadline."""
        if self._connection is None:
            self._connection = self._acquire()
            self._broken = False
        elif self._broken:
            self._reconnect(self._connection)
            self._broken = False
        return self._connection

    def _acquire(self) -> Connection:
        """A connection of the pool; made within the deadline, where the pool can do that."""
        within = getattr(self.pool, "get_connection_within", None)
        remaining = self.remaining()
        if within is None or remaining is None:
            connection: Connection = self.pool.get_connection()
            return connection
        connection = within(remaining)
        return connection

    def _reconnect(self, connection: Connection) -> None:
        """Connect again, once (the backoff is the channel's), within the deadline."""
        remaining = self.remaining()
        if remaining is not None:
            if self._timeouts is None:
                self._timeouts = (connection.socket_timeout, connection.socket_connect_timeout)
            own_reply, own_connect = self._timeouts
            connection.socket_timeout = min(remaining, own_reply or remaining)
            connection.socket_connect_timeout = min(remaining, own_connect or remaining)
        connection.connect_check_health(check_health=False, retry_socket_connect=False)

    def _drop(self) -> None:
        """Close a failed connection; the next command makes it again."""
        if self._connection is not None:
            self._connection.disconnect()  # type: ignore[no-untyped-call]  # unannotated
            self._broken = True

    def _pause(self, delay: float) -> None:
        """Wait before the next try: no later than the deadline, nor than the outage limit."""
        remaining = self.remaining()
        until_limit = self.outage.limit - self.outage.down_for()
        wait = min(delay, max(until_limit, 0.0) + 0.01)
        time.sleep(wait if remaining is None else min(wait, remaining))
