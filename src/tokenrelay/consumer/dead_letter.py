"""The dead-letter stream: where a consumer group puts an event its handler keeps failing on.

An event that failed `max_deliveries` times (a handler error, or a consumer that crashed on
it) is appended to `tokenrelay:dead-letter` with the group, its id, how often it was
delivered and the last error, and acknowledged, in one transaction; the group goes on with
the next event. `redis-cli XRANGE tokenrelay:dead-letter - +` shows what was set aside.
"""

from __future__ import annotations

from typing import Any

import structlog
from redis import Redis

from tokenrelay.stream import keys
from tokenrelay.stream.keys import Stat

log = structlog.get_logger()

#: The most characters of an error kept with a dead-lettered event.
_MAX_ERROR = 1000


def dead_letter(
    client: Redis,
    group: str,
    entry_id: bytes,
    fields: dict[bytes, bytes],
    *,
    deliveries: int,
    error: str,
) -> None:
    """Move one lifecycle event aside for `group`: dead-letter it, acknowledge it, count it."""
    record: dict[Any, Any] = {
        b"group": group,
        b"event_id": entry_id,
        b"deliveries": str(deliveries),
        b"error": error[:_MAX_ERROR],
    }
    # Kept as bytes: the event may be set aside precisely because it is not UTF-8.
    record.update({b"event." + k: v for k, v in fields.items()})
    with client.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.DEAD_LETTER_STREAM, record, maxlen=keys.DEAD_LETTER_MAXLEN, approximate=True)
        pipe.xack(keys.EVENTS_STREAM, group, entry_id)
        pipe.hincrby(keys.consumer_stats(group), Stat.EVENTS_DEAD, 1)
        pipe.execute()
    log.error(
        "consumer.dead_letter",
        group=group,
        event_id=entry_id.decode(errors="replace"),
        deliveries=deliveries,
        error=error[:_MAX_ERROR],
    )
