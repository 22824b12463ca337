"""Connecting to Redis, with errors that name the URL instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis import Redis

from tokenrelay.errors import RedisUnavailableError
from tokenrelay.settings import redact_url


@contextmanager
def redis_errors(url: str) -> Iterator[None]:
    """Turn a connection failure into RedisUnavailableError that says which URL failed."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailableError(f"cannot reach Redis at {redact_url(url)}: {exc}") from exc


def connect(url: str, *, check: bool = True) -> Redis:
    """A client for `url`, returning bytes as RQ requires; `check` pings it first."""
    try:
        client = Redis.from_url(url, decode_responses=False, socket_connect_timeout=5)
    except ValueError as exc:
        raise RedisUnavailableError(f"invalid Redis URL {redact_url(url)}: {exc}") from None
    if check:
        with redis_errors(url):
            client.ping()
    return client
