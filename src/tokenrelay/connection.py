"""Connecting to Redis: bounded pools, deadlines on every reply, errors that say what failed."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import redis
from redis import Redis
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import BlockingConnectionPool
from redis.exceptions import AuthenticationError, MaxConnectionsError, ResponseError
from redis.retry import Retry

from tokenrelay.errors import ConfigurationError, RedisUnavailableError
from tokenrelay.settings import Settings, redact_url

#: Seconds to wait for a TCP connection, and for any reply (a blocking read asks for longer).
CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 10.0

#: Seconds a caller waits for a free connection when every one of the pool's is in use.
POOL_WAIT = 5.0

#: How often a command is sent again after its connection broke.
RETRIES = 3

#: Connections per client unless configured (TOKENRELAY_REDIS_MAX_CONNECTIONS).
DEFAULT_MAX_CONNECTIONS = 1000

_NEEDS_AUTH = ("NOAUTH", "HELLO must be called with the client already authenticated")


class _BoundedPool(BlockingConnectionPool):
    """A pool that makes callers wait for a free connection, then says it ran out.

    A reader with a deadline asks for a connection `within` some seconds: one that has to be
    made is then made (TCP and redis-py's handshake) within them, and is dropped when it comes
    back, so its shortened timeouts never reach another caller.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # unannotated
        self._within = threading.local()
        self._hurried: weakref.WeakSet[Any] = weakref.WeakSet()

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            # redis-py leaves this method unannotated.
            return super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except redis.ConnectionError as exc:
            if "No connection available" not in str(exc):
                raise
            raise MaxConnectionsError(
                f"all {self.max_connections} connections of this client are in use "
                f"(waited {POOL_WAIT:g} s for one; raise TOKENRELAY_REDIS_MAX_CONNECTIONS)"
            ) from None

    def get_connection_within(self, seconds: float) -> Any:
        """A connection, connected within `seconds` if it has to be made now."""
        self._within.seconds = seconds
        try:
            return self.get_connection()
        finally:
            self._within.seconds = None

    def make_connection(self) -> Any:
        connection = super().make_connection()  # type: ignore[no-untyped-call]  # unannotated
        seconds = getattr(self._within, "seconds", None)
        if seconds is not None:
            connection.socket_timeout = connection.socket_connect_timeout = seconds
            self._hurried.add(connection)
        return connection

    def release(self, connection: Any) -> None:
        if connection in self._hurried:
            self._hurried.discard(connection)
            connection.disconnect()
            connection.socket_timeout = self.connection_kwargs["socket_timeout"]
            connection.socket_connect_timeout = self.connection_kwargs["socket_connect_timeout"]
        super().release(connection)  # type: ignore[no-untyped-call]  # unannotated in redis-py


@contextmanager
def redis_errors(url: str) -> Iterator[None]:
    """Turn a Redis failure into an error that says which URL and what went wrong.

    A missing or wrong password is a ConfigurationError (the URL must change); anything
    else is RedisUnavailableError.
    """
    where = redact_url(url)
    try:
        yield
    except MaxConnectionsError as exc:
        raise RedisUnavailableError(f"Redis at {where}: {exc}") from exc
    except (AuthenticationError, ResponseError) as exc:
        if not isinstance(exc, AuthenticationError) and not str(exc).startswith(_NEEDS_AUTH):
            raise
        if urlsplit(url).password:
            raise ConfigurationError(f"Redis at {where} refused the password") from None
        raise ConfigurationError(
            f"Redis at {where} needs a password: put it in the URL (redis://:PASSWORD@host:port/0)"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailableError(f"cannot reach Redis at {where}: {exc}") from exc


def connect(
    url: str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS, check: bool = True
) -> Redis:
    """A client for `url` (bytes replies, as RQ requires); `check` pings it first.

    Its pool holds at most `max_connections`; a caller that finds them all in use waits
    `POOL_WAIT` seconds, then gets an error that says so. Every reply has a deadline.
    """
    try:
        pool = _BoundedPool.from_url(
            url,
            max_connections=max_connections,
            timeout=POOL_WAIT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=REPLY_TIMEOUT,
            decode_responses=False,
            protocol=2,  # the reply shapes RQ and our scripts are written against, on any Redis
            # A command whose connection broke is sent again on a new one (every tokenrelay
            # write is idempotent under a retry); a command that timed out is not, so that
            # deadlines hold.
            retry=Retry(
                ExponentialWithJitterBackoff(base=0.05, cap=0.5),
                RETRIES,
                supported_errors=(redis.ConnectionError,),
            ),
        )
    except ValueError as exc:
        raise RedisUnavailableError(f"invalid Redis URL {redact_url(url)}: {exc}") from None
    client = Redis.from_pool(pool)  # the client owns its pool: closing it closes the sockets
    if check:
        try:
            with redis_errors(url):
                client.ping()
        except BaseException:
            client.close()
            raise
    return client


def client_for(settings: Settings) -> Redis:
    """A checked client for the configured Redis, with the configured connection bound."""
    return connect(settings.effective_redis_url, max_connections=settings.redis_max_connections)


def async_client_for(settings: Settings) -> aioredis.Redis:
    """An asyncio client for the configured Redis, set up as `connect` sets up sync ones."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.effective_redis_url,
        max_connections=settings.redis_max_connections,
        timeout=POOL_WAIT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=REPLY_TIMEOUT,
        decode_responses=False,
        protocol=2,
        retry=AsyncRetry(
            ExponentialWithJitterBackoff(base=0.05, cap=0.5),
            RETRIES,
            supported_errors=(redis.ConnectionError,),
        ),
    )
    return aioredis.Redis(connection_pool=pool)
