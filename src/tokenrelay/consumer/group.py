"""Reading the lifecycle stream as a member of a consumer group: resumable, shared, exactly once.

Each kind of consumer (the recorder, the metrics aggregator) is a Redis consumer
group on `tokenrelay:events`, so several processes of one kind share the work and
each event goes to one of them. An event is acknowledged in the same transaction
(MULTI/EXEC) as the Redis writes its handler makes, so a consumer killed at any
moment neither loses nor doubles them: what was not acknowledged is delivered
again, to the same member when it restarts under its name, or to another member
once it has been idle for `claim_after` seconds.

A handler that raises leaves its event pending: it is tried again after a growing delay
(`retry_delay`, doubled each time), while the member goes on with other events. An event
delivered `max_deliveries` times without being acknowledged (the handler kept failing, or
the consumer kept crashing on it) is moved to the dead-letter stream, so one poison event
never stops a group.

A member rides out a Redis outage (`tokenrelay.outage`): it backs off, logs the outage once,
and goes on with the events it held, for up to `outage_limit` seconds. An outage is never a
handler failure, so it counts towards no event's deliveries. If Redis came back without its
data (no persistence), the group is gone with the lifecycle stream: the member makes it again
and handles the events written since.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError

from tokenrelay.consumer.dead_letter import dead_letter
from tokenrelay.errors import ProtocolError
from tokenrelay.outage import Outage, backoff, is_down
from tokenrelay.settings import Settings
from tokenrelay.stream import keys
from tokenrelay.stream.events import count_trimmed_unread, trim_events
from tokenrelay.stream.keys import Stat
from tokenrelay.stream.protocol import LifecycleEvent, parse_event

log = structlog.get_logger()


_BATCH = 100

#: Seconds between a member's trims of the lifecycle stream.
TRIM_INTERVAL = 60.0

#: The longest delay before a failed event is tried again.
MAX_RETRY_DELAY = 60.0

Entries = list[tuple[bytes, dict[bytes, bytes]]]

_UNACKNOWLEDGED = "delivered again and again, never acknowledged (did a consumer crash on it?)"


@dataclass(frozen=True)
class Delivery:
    """One lifecycle event handed to this consumer, with its entry id."""

    id: str
    event: LifecycleEvent


#: Handles one event; its Redis writes go into the pipeline, which commits them with the ack.
Handler = Callable[[Delivery, Pipeline], None]


def _id_order(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id as numbers, which sort as the stream does."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


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
        max_deliveries: int = 5,
        retry_delay: float = 1.0,
        outage_limit: float = Settings.redis_outage_limit,
    ) -> None:
        self.client = client
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.outage = Outage(outage_limit, who=f"consumer {group}/{self.consumer}")
        self.stats_key = keys.consumer_stats(group)
        self.fence = keys.commit_fence(group)
        self.max_deliveries = max_deliveries
        self.retry_delay = retry_delay
        self._claim_after_ms = int(claim_after * 1000)
        self._block_ms = int(block * 1000)
        self._retries: dict[bytes, float] = {}  # failed event id -> when to try it again
        self._errors: dict[bytes, tuple[int, str]] = {}  # failed event id -> (failures, error)
        self._trimmed_at = 0.0
        self._held: deque[tuple[bytes, dict[bytes, bytes]]] = deque()  # delivered, not handled

    def ensure_group(self) -> None:
        """Create the group, reading from the very first event, unless it exists."""
        try:
            self.client.xgroup_create(keys.EVENTS_STREAM, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self, handler: Handler, stop: threading.Event) -> None:
        """Handle events until `stop` is set: first this member's pending ones, then new ones.

        Raises RedisUnavailableError if Redis stays away longer than the outage limit.
        """
        started, tries = False, 0
        while not stop.is_set():
            try:
                if not started:
                    self.ensure_group()
                    self._held.extend(self._pending())
                    log.info("consumer.started", group=self.group, consumer=self.consumer)
                    started = True
                self._step(handler)
            except Exception as exc:
                if is_down(exc):
                    self.outage.failed(exc)
                    stop.wait(backoff(tries))
                    tries += 1
                    continue
                if not (isinstance(exc, ResponseError) and "NOGROUP" in str(exc)):
                    raise
                self._regroup()
            self.outage.ok()
            tries = 0
        log.info("consumer.stopped", group=self.group, consumer=self.consumer)

    def _step(self, handler: Handler) -> None:
        """Handle the events this member holds, else the next ones it is given."""
        if not self._held:
            self._held.extend(self._due() or self._claimed() or self._new())
        while self._held:
            entry_id, fields = self._held[0]
            self._handle(handler, entry_id, fields)
            self._held.popleft()  # handled (or set aside): an outage before this retries it
        self._trim()

    def _regroup(self) -> None:
        """The group vanished (Redis came back without its data): make it again, from the
        start of the lifecycle stream as it now is, and forget what the old one held."""
        log.warning(
            "consumer.group_recreated",
            group=self.group,
            consumer=self.consumer,
            events_dropped=len(self._held),
        )
        self._held.clear()
        self._retries.clear()
        self._errors.clear()
        self.ensure_group()

    def run_until_idle(self, handler: Handler) -> int:
        """Handle every event available now (failed ones once), then return how many."""
        self.ensure_group()
        handled = self._handle_all(handler, self._pending())
        while batch := self._claimed() or self._new(block=False):
            handled += self._handle_all(handler, batch)
        self._trim(force=True)
        return handled

    def check_trimmed(self) -> int:
        """Report events trimmed from the lifecycle stream before this group read them.

        Returns how many (always 0 before Redis 7, which does not count what it trims).
        Run before each read: once a read has jumped the gap, it can no longer be seen.
        """
        lost = count_trimmed_unread(self.client, self.group)
        if lost:
            log.warning("consumer.events_trimmed_unread", group=self.group, events=lost)
        return lost

    def _trim(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._trimmed_at >= TRIM_INTERVAL:
            self._trimmed_at = now
            trim_events(self.client)

    def _pending(self) -> Entries:
        """This member's delivered but unacknowledged events (after a crash and a restart)."""
        return self._redelivered(self._read("0", block=None))

    def _new(self, block: bool = True) -> Entries:
        self.check_trimmed()
        wait = self._block_ms
        if self._retries:  # wake up in time for the next retry
            next_retry = min(self._retries.values()) - time.monotonic()
            wait = max(1, min(wait, int(next_retry * 1000)))
        return self._read(">", block=wait if block else None)

    def _read(self, start: str, block: int | None) -> Entries:
        reply: Any = self.client.xreadgroup(
            self.group, self.consumer, {keys.EVENTS_STREAM: start}, count=_BATCH, block=block
        )
        entries = reply[0][1] if reply else []
        # Pending entries trimmed from the stream come back with no fields.
        for entry_id, fields in entries:
            if not fields:
                self._lost(entry_id)
        return [(entry_id, fields) for entry_id, fields in entries if fields]

    def _due(self) -> Entries:
        """This member's failed events whose retry time has come, delivered to it again.

        An event another member has claimed meanwhile (it waited past `claim_after`) is
        that member's now, and is left to it.
        """
        now = time.monotonic()
        due = sorted((i for i, at in self._retries.items() if at <= now), key=_id_order)
        if not due:
            return []
        for entry_id in due:
            del self._retries[entry_id]
        held = self._deliveries(due)
        mine = [i for i in due if i in held]
        if not mine:
            return []
        ids: list[Any] = mine
        claimed: Any = self.client.xclaim(keys.EVENTS_STREAM, self.group, self.consumer, 0, ids)
        return self._redelivered([(entry_id, fields) for entry_id, fields in claimed if fields])

    def _claimed(self) -> Entries:
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
        return self._redelivered(claimed)

    def _deliveries(self, ids: list[bytes]) -> dict[bytes, int]:
        """How often each of these events (sorted by id) was delivered, if this member holds it."""
        counts: Any = self.client.xpending_range(
            keys.EVENTS_STREAM,
            self.group,
            min=ids[0],
            max=ids[-1],
            count=len(ids) + len(self._retries) + _BATCH,
            consumername=self.consumer,
        )
        return {item["message_id"]: int(item["times_delivered"]) for item in counts}

    def _redelivered(self, entries: Entries) -> Entries:
        """The entries that may be handled again; those delivered too often are dead-lettered."""
        if not entries:
            return entries
        delivered = self._deliveries(sorted((i for i, _ in entries), key=_id_order))
        keep = []
        for entry_id, fields in entries:
            times = delivered.get(entry_id, 1)
            if times > self.max_deliveries:
                _, error = self._errors.pop(entry_id, (0, _UNACKNOWLEDGED))
                dead_letter(
                    self.client, self.group, entry_id, fields, deliveries=times - 1, error=error
                )
            else:
                keep.append((entry_id, fields))
        return keep

    def _lost(self, entry_id: bytes) -> None:
        """A pending event was trimmed from the lifecycle stream before it was handled."""
        log.warning("consumer.event_trimmed", group=self.group, event_id=entry_id.decode())
        with self.client.pipeline() as pipe:
            pipe.hincrby(self.stats_key, Stat.EVENTS_TRIMMED, 1)
            pipe.xack(keys.EVENTS_STREAM, self.group, entry_id)
            pipe.execute()

    def _handle_all(self, handler: Handler, entries: Entries) -> int:
        for entry_id, fields in entries:
            self._handle(handler, entry_id, fields)
        return len(entries)

    def _handle(self, handler: Handler, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        delivery_id = entry_id.decode()
        try:
            event = parse_event(fields)
        except ProtocolError as exc:
            log.warning(
                "consumer.bad_event", group=self.group, event_id=delivery_id, error=str(exc)
            )
            self.client.hincrby(self.stats_key, Stat.EVENTS_MALFORMED, 1)
            dead_letter(self.client, self.group, entry_id, fields, deliveries=1, error=str(exc))
            return
        with self.client.pipeline(transaction=True) as pipe:
            # Watched, a transaction whose connection breaks raises WatchError instead of being
            # sent again by redis-py: its writes may have been applied, and must not be twice.
            pipe.watch(self.fence)  # type: ignore[no-untyped-call]  # unannotated in redis-py
            pipe.multi()
            try:
                handler(Delivery(delivery_id, event), pipe)
            except Exception as exc:
                if is_down(exc):  # an outage, not the event's fault: it is handled again after
                    raise
                self._failed(entry_id, exc)  # a failed event waits for its retry; the rest go on
                return
            pipe.hincrby(self.stats_key, Stat.EVENTS_HANDLED, 1)
            pipe.xack(keys.EVENTS_STREAM, self.group, entry_id)
            try:
                pipe.execute()
            except WatchError:
                if self._still_pending(entry_id):  # it did not commit: handle it again
                    raise RedisConnectionError(f"the commit of event {delivery_id} broke") from None
        self._errors.pop(entry_id, None)

    def _still_pending(self, entry_id: bytes) -> bool:
        """Whether this member still holds the event unacknowledged."""
        pending = self.client.xpending_range(
            keys.EVENTS_STREAM, self.group, min=entry_id, max=entry_id, count=1
        )
        return bool(pending)

    def _failed(self, entry_id: bytes, exc: Exception) -> None:
        """Remember a handler failure; the event is tried again after a growing delay."""
        error = f"{type(exc).__name__}: {exc}"
        failures = 1 + self._errors.get(entry_id, (0, ""))[0]
        delay = min(MAX_RETRY_DELAY, self.retry_delay * 2 ** (failures - 1))
        self._errors[entry_id] = (failures, error)
        self._retries[entry_id] = time.monotonic() + delay
        log.warning(
            "consumer.handler_failed",
            group=self.group,
            event_id=entry_id.decode(),
            error=error,
            retry_in_s=round(delay, 3),
            exc_info=True,
        )
