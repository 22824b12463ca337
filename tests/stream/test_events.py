"""The lifecycle stream is trimmed to what its slowest group needs, never past unread events."""

from __future__ import annotations

import time
from typing import Any

from redis import Redis

from tokenrelay import Event, Relay
from tokenrelay.consumer.group import GroupConsumer
from tokenrelay.stream.events import emit, trim_events
from tokenrelay.stream.keys import EVENTS_STREAM, METRICS_GROUP, RECORDER_GROUP
from tokenrelay.stream.protocol import LifecycleEvent, encode_event


def old_events(client: Redis, count: int, *, hours_ago: float = 2) -> None:
    """Append `count` events with entry ids from hours ago (as if they were added then)."""
    base = int((time.time() - hours_ago * 3600) * 1000)
    for i in range(count):
        fields: Any = encode_event(LifecycleEvent(Event.SUBMITTED, f"old-{i}", base / 1000))
        client.xadd(EVENTS_STREAM, fields, id=f"{base}-{i}")


def test_events_a_lagging_group_has_not_read_are_kept(redis_client: Redis) -> None:
    """One group read everything, another lags: trimming keeps what the laggard has not read."""
    old_events(redis_client, 500)
    fast = GroupConsumer(redis_client, METRICS_GROUP, "fast")
    slow = GroupConsumer(redis_client, RECORDER_GROUP, "slow")
    fast.ensure_group()
    slow.ensure_group()
    unread = [i for i, _ in redis_client.xrange(EVENTS_STREAM)][100:]
    redis_client.xreadgroup(RECORDER_GROUP, "slow", {EVENTS_STREAM: ">"}, count=100)
    read = [i for i, _ in redis_client.xrange(EVENTS_STREAM, count=100)]
    redis_client.xack(EVENTS_STREAM, RECORDER_GROUP, *read)  # the laggard handled 100 only
    assert fast.run_until_idle(lambda delivery, pipe: None) == 500  # and then trims
    trim_events(redis_client)
    remaining = [i for i, _ in redis_client.xrange(EVENTS_STREAM)]
    assert len(remaining) < 500  # old events that both groups have read are gone
    assert set(unread) <= set(remaining)
    assert slow.run_until_idle(lambda delivery, pipe: None) == 400  # none it had not read


def test_events_every_group_has_read_are_trimmed_but_the_last_hour_kept(
    relay: Relay, redis_client: Redis
) -> None:
    """Old events read by every group go; events of the last hour stay for `status`."""
    old_events(redis_client, 300)
    handles = relay.submit_many(["new"] * 3)
    group = GroupConsumer(redis_client, RECORDER_GROUP, "r")
    assert group.run_until_idle(lambda delivery, pipe: None) == 303  # and then trims
    remaining = redis_client.xrange(EVENTS_STREAM)
    assert len(remaining) < 303
    assert [f[b"job_id"].decode() for _, f in remaining[-3:]] == [h.job_id for h in handles]


def test_a_pending_event_is_never_trimmed(redis_client: Redis) -> None:
    """An event delivered but not acknowledged (a consumer mid-crash) survives trimming."""
    old_events(redis_client, 300)
    group = GroupConsumer(redis_client, RECORDER_GROUP, "r")
    group.ensure_group()
    redis_client.xreadgroup(RECORDER_GROUP, "r", {EVENTS_STREAM: ">"})  # all 300, none acked
    trim_events(redis_client)
    assert redis_client.xlen(EVENTS_STREAM) == 300


def test_without_consumer_groups_the_last_hour_is_kept(redis_client: Redis) -> None:
    """With nobody reading, the stream keeps about an hour of events."""
    old_events(redis_client, 300)
    emit(redis_client, LifecycleEvent(Event.SUBMITTED, "now", time.time()))
    trim_events(redis_client)
    ids = [f[b"job_id"] for _, f in redis_client.xrange(EVENTS_STREAM)]
    assert b"now" in ids
    assert len(ids) < 301
