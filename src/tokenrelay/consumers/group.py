"""Reading the lifecycle stream as a member of a consumer group: resumable, shared, exactly once.

Each kind of consumer (the recorder, the metrics aggregator) is a Redis consumer
group on `tokenrelay:events`, so several processes of one kind share the work and
each event goes to one of them. An event is acknowledged in the same transaction
(MULTI/EXEC) as the Redis writes its handler makes, so a consumer killed at any
moment neither loses nor doubles them: what was not acknowledged is delivered
again, to the same member when it restarts under its name, or to another member
once it has been idle for `claim_after` seconds.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ResponseError

from tokenrelay import keys
from tokenrelay.errors import ProtocolError
from tokenrelay.keys import Stat
from tokenrelay.protocol import LifecycleEvent, parse_event

log = structlog.get_logger()

_BATCH = 100

# KEYS: the lifecycle stream, the group's stats hash. ARGV: the group, the counter to add to.
# If the group's last delivered id is older than the stream's first entry, the entries
# trimmed beyond what the group has read were never delivered to it: count them, and count
# them as read (ENTRIESREAD), so that they are reported once and the group's lag stays right.
# Atomic, so two members checking at once cannot both report the same loss.
_TRIMMED = """
local function field(t, name)
  for i = 1, #t, 2 do if t[i] == name then return t[i + 1] end end
end
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local added, first = field(info, 'entries-added'), field(info, 'first-entry')
if not added or not first then return 0 end
local group
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(g, 'name') == ARGV[1] then group = g end
end
if not group then return 0 end
local last, read = field(group, 'last-delivered-id'), field(group, 'entries-read')
if not older(last, first[1]) then return 0 end
if not read then
  if last ~= '0-0' then return 0 end
  read = 0
end
local lost = added - field(info, 'length') - read
if lost <= 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[2], lost)
redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', read + lost)
return lost
"""


@dataclass(frozen=True)
class Delivery:
    """One lifecycle event handed to this consumer, with its entry id."""

    id: str
    event: LifecycleEvent


#: Handles one event; its Redis writes go into the pipeline, which commits them with the ack.
Handler = Callable[[Delivery, Pipeline], None]


@dataclass(frozen=True)
class GroupLag:
    """How far a consumer group is behind the head of the lifecycle stream."""

    group: str
    pending: int  # delivered to a member, not yet acknowledged
    lag: int | None  # not yet delivered; None where Redis cannot tell (before 7.0, or trimmed)
    last_delivered: str
    entries_read: int | None = None


def group_lags(client: Redis) -> list[GroupLag]:
    """Every consumer group on the lifecycle stream, with its lag."""
    try:
        groups: Any = client.xinfo_groups(keys.EVENTS_STREAM)
    except ResponseError:  # no lifecycle stream yet
        return []
    return [
        GroupLag(
            group=_text(g["name"]),
            pending=int(g["pending"]),
            lag=None if g.get("lag") is None else int(g["lag"]),
            last_delivered=_text(g["last-delivered-id"]),
            entries_read=None if g.get("entries-read") is None else int(g["entries-read"]),
        )
        for g in groups
    ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def default_consumer_name() -> str:
    """A name unique to this process; give a stable one to resume your own pending events."""
    return f"{socket.gethostname()}-{os.getpid()}"


class GroupConsumer:
    """Delivers lifecycle events to `handler`, one member of consumer group `group`."""

    def __init__(
        self,
        client: Redis,
        group: str,
        consumer: str | None = None,
        *,
        claim_after: float = 60.0,
        block: float = 1.0,
    ) -> None:
        self.client = client
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.stats_key = keys.consumer_stats(group)
        self._claim_after_ms = int(claim_after * 1000)
        self._block_ms = int(block * 1000)

    def ensure_group(self) -> None:
        """Create the group, reading from the very first event, unless it exists."""
        try:
            self.client.xgroup_create(keys.EVENTS_STREAM, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self, handler: Handler, stop: threading.Event) -> None:
        """Handle events until `stop` is set: first this member's pending ones, then new ones."""
        self.ensure_group()
        log.info("consumer.started", group=self.group, consumer=self.consumer)
        while not stop.is_set():
            batch = self._pending() or self._claimed() or self._new()
            for delivery_id, fields in batch:
                self._handle(handler, delivery_id, fields)
        log.info("consumer.stopped", group=self.group, consumer=self.consumer)

    def run_until_idle(self, handler: Handler) -> int:
        """Handle every event available now, then return how many were handled."""
        self.ensure_group()
        handled = 0
        while batch := self._pending() or self._claimed() or self._new(block=False):
            for delivery_id, fields in batch:
                self._handle(handler, delivery_id, fields)
                handled += 1
        return handled

    def check_trimmed(self) -> int:
        """Report events trimmed from the lifecycle stream before this group read them.

        Returns how many (always 0 before Redis 7, which does not count what it trims).
        Run before each read: once a read has jumped the gap, it can no longer be seen.
        """
        lost = int(
            self.client.eval(
                _TRIMMED, 2, keys.EVENTS_STREAM, self.stats_key, self.group, Stat.EVENTS_TRIMMED
            )
        )
        if lost:
            log.warning("consumer.events_trimmed_unread", group=self.group, events=lost)
        return lost

    def _pending(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """This member's delivered but unacknowledged events (after a crash and a restart)."""
        return self._read("0", block=None)

    def _new(self, block: bool = True) -> list[tuple[bytes, dict[bytes, bytes]]]:
        self.check_trimmed()
        return self._read(">", block=self._block_ms if block else None)

    def _read(self, start: str, block: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply: Any = self.client.xreadgroup(
            self.group, self.consumer, {keys.EVENTS_STREAM: start}, count=_BATCH, block=block
        )
        entries = reply[0][1] if reply else []
        # Pending entries trimmed from the stream come back with no fields.
        for entry_id, fields in entries:
            if not fields:
                self._lost(entry_id)
        return [(entry_id, fields) for entry_id, fields in entries if fields]

    def _claimed(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Events another member took and has not acknowledged for `claim_after`: it died."""
        reply: Any = self.client.xautoclaim(
            keys.EVENTS_STREAM,
            self.group,
            self.consumer,
            self._claim_after_ms,
            count=_BATCH,
        )
        for entry_id in reply[2] if len(reply) > 2 else []:
            self._lost(entry_id)
        claimed = [(entry_id, fields) for entry_id, fields in reply[1] if fields]
        if claimed:
            log.info("consumer.claimed", group=self.group, events=len(claimed))
        return claimed

    def _lost(self, entry_id: bytes) -> None:
        """A pending event was trimmed from the lifecycle stream before it was handled."""
        log.warning("consumer.event_trimmed", group=self.group, event_id=entry_id.decode())
        with self.client.pipeline() as pipe:
            pipe.hincrby(self.stats_key, Stat.EVENTS_TRIMMED, 1)
            pipe.xack(keys.EVENTS_STREAM, self.group, entry_id)
            pipe.execute()

    def _handle(self, handler: Handler, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        delivery_id = entry_id.decode()
        with self.client.pipeline(transaction=True) as pipe:
            try:
                event = parse_event(fields)
            except ProtocolError as exc:
                log.warning(
                    "consumer.bad_event", group=self.group, event_id=delivery_id, error=str(exc)
                )
                pipe.hincrby(self.stats_key, Stat.EVENTS_MALFORMED, 1)
            else:
                handler(Delivery(delivery_id, event), pipe)
            pipe.hincrby(self.stats_key, Stat.EVENTS_HANDLED, 1)
            pipe.xack(keys.EVENTS_STREAM, self.group, entry_id)
            pipe.execute()
