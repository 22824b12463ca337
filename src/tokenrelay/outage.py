"""Riding out Redis outages: retries with backoff and jitter, up to a limit, logged once.

Every long-running part of tokenrelay (the worker, the consumers, the readers) keeps one
`Outage` per process (or per reader) and sends its Redis calls through `retry` or `aretry`.
While Redis is away (restarting, failing over, loading its data), a call is tried again
with exponential backoff and jitter; the first failure logs `redis.unavailable` and the
first success after it logs `redis.recovered` with the outage's length, once each, however
many calls waited. Past `limit` seconds of outage the call raises RedisUnavailableError.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.errors import RedisUnavailableError

log = structlog.get_logger()

T = TypeVar("T")

#: What a Redis that is away (or a replica being promoted) raises; `BusyLoadingError`, for a
#: Redis still loading its data, is a ConnectionError.
REDIS_DOWN: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)

#: The same, or an outage past its limit.
UNAVAILABLE: tuple[type[Exception], ...] = (*REDIS_DOWN, RedisUnavailableError)

#: Error replies of a Redis that cannot serve for now (busy with a script, a replica without
#: its primary, a cluster slot moving), which redis-py raises as plain ResponseErrors.
_TRANSIENT_REPLIES = ("BUSY ", "MASTERDOWN ", "TRYAGAIN ", "CLUSTERDOWN ", "NOREPLICAS ")


def is_down(exc: BaseException) -> bool:
    """Whether `exc` (raised, or a pipeline's error reply) says Redis is away for now."""
    if isinstance(exc, REDIS_DOWN):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)


def down_reply(replies: list[object]) -> Exception | None:
    """A pipeline's first error reply that says Redis is away for now, as a ConnectionError
    (so that it is handled as an outage, and its commands sent again); None if there is none."""
    for reply in replies:
        if isinstance(reply, Exception) and is_down(reply):
            return RedisConnectionError(f"Redis cannot serve for now: {reply}")
    return None


#: The first wait between tries, and the longest, in seconds.
FIRST_DELAY = 0.1
MAX_DELAY = 2.0


class Outage:
    """One process's (or one reader's) view of whether Redis is away, and since when."""

    def __init__(self, limit: float, *, who: str = "tokenrelay") -> None:
        self.limit = limit
        self.who = who
        self.since: float | None = None  # monotonic time of the first failure
        self.recovered_at: float | None = None  # monotonic time Redis last came back
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        """Whether the last call failed."""
        return self.since is not None

    def down_for(self) -> float:
        """Seconds since the outage began (0 when Redis is up)."""
        return 0.0 if self.since is None else time.monotonic() - self.since

    def failed(self, exc: BaseException) -> None:
        """A call failed because Redis is away; raises RedisUnavailableError past the limit."""
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                log.warning("redis.unavailable", who=self.who, error=str(exc), limit_s=self.limit)
        if self.down_for() > self.limit:
            raise RedisUnavailableError(
                f"Redis has been unreachable for {self.down_for():.0f} s, longer than the "
                f"outage limit of {self.limit:g} s (TOKENRELAY_REDIS_OUTAGE_LIMIT): {exc}"
            ) from exc

    def ok(self) -> None:
        """A call succeeded: an outage in progress is over."""
        if self.since is None:
            return
        with self._lock:
            if self.since is None:
                return
            lasted = time.monotonic() - self.since
            self.since = None
            self.recovered_at = time.monotonic()
        log.info("redis.recovered", who=self.who, outage_s=round(lasted, 3))

    def recently_recovered(self, within: float) -> bool:
        """Whether Redis came back less than `within` seconds ago."""
        return self.recovered_at is not None and time.monotonic() - self.recovered_at < within


def backoff(tries: int) -> float:
    """The wait before try number `tries + 1`: doubling from FIRST_DELAY up to MAX_DELAY, each
    drawn from its upper half, so that many clients do not come back in step."""
    ceiling = min(MAX_DELAY, FIRST_DELAY * 2**tries)
    return random.uniform(ceiling / 2, ceiling)


def retry(outage: Outage, call: Callable[[], T], *, stop: threading.Event | None = None) -> T:
    """`call()`, tried again while Redis is away, up to the outage limit (or until `stop`)."""
    tries = 0
    while True:
        try:
            result = call()
        except Exception as exc:
            if not is_down(exc):
                raise
            outage.failed(exc)
            if stop is not None and stop.is_set():
                raise
            delay = backoff(tries)
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
            tries += 1
            continue
        outage.ok()
        return result


async def aretry(outage: Outage, call: Callable[[], Awaitable[T]]) -> T:
    """`await call()`, tried again while Redis is away, up to the outage limit."""
    tries = 0
    while True:
        try:
            result = await call()
        except Exception as exc:
            if not is_down(exc):
                raise
            outage.failed(exc)
            await asyncio.sleep(backoff(tries))
            tries += 1
            continue
        outage.ok()
        return result
