"""The lifecycle stream `tokenrelay:events`: appending to it, its consumer groups, trimming it.

It is trimmed to what its slowest consumer group still needs (its oldest unacknowledged
event, or the first it has not read), and never below the last `EVENTS_KEEP_SECONDS` of
events, which `tokenrelay status` reads. A hard cap (`EVENTS_HARD_CAP`, applied as each
event is appended) bounds it when a group stalls for good; the events it drops before a
group read them are counted and logged by that group (`Stat.EVENTS_TRIMMED`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import ResponseError

from tokenrelay.stream import keys
from tokenrelay.stream.protocol import LifecycleEvent, encode_event, text

log = structlog.get_logger()

# A Lua helper: whether stream entry id `a` comes before `b`.
_OLDER = """
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
"""

#: The newest events kept whatever the groups have read: an hour's worth.
EVENTS_KEEP_SECONDS = 3600

# KEYS: the lifecycle stream. ARGV: the oldest entry id to keep on account of time.
# Lowers that bound to the oldest entry any group still needs, then trims (XTRIM MINID ~,
# which drops only whole internal nodes, so it may keep a little more). Returns how many
# entries it removed.
_TRIM = (
    _OLDER
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local keep = ARGV[1]
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local needed = last
  local pending = redis.call('XPENDING', KEYS[1], name)
  if pending[1] > 0 and older(pending[2], needed) then needed = pending[2] end
  if older(needed, keep) then keep = needed end
end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', keep)
"""
)


# KEYS: the lifecycle stream, the group's stats hash. ARGV: the group, the counter to add to.
# If the group's last delivered id is older than the stream's first entry, the entries
# trimmed beyond what the group has read were never delivered to it: count them, and count
# them as read (ENTRIESREAD), so that they are reported once and the group's lag stays right.
# Atomic, so two members checking at once cannot both report the same loss.
_TRIMMED = (
    _OLDER
    + """
local function field(t, name)
  for i = 1, #t, 2 do if t[i] == name then return t[i + 1] end end
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
)


def count_trimmed_unread(client: Redis, group: str) -> int:
    """Count (in the group's stats) events trimmed before `group` read them; how many.

    Always 0 before Redis 7, which does not count what it trims. Run it before each read:
    once a read has jumped the gap, the loss can no longer be seen.
    """
    stats = keys.consumer_stats(group)
    return int(client.eval(_TRIMMED, 2, keys.EVENTS_STREAM, stats, group, keys.Stat.EVENTS_TRIMMED))


def emit(client: Redis, event: LifecycleEvent, *, cap: int = keys.EVENTS_HARD_CAP) -> None:
    """Append one job state change to the lifecycle stream (under its hard cap)."""
    fields: dict[Any, Any] = encode_event(event)
    client.xadd(keys.EVENTS_STREAM, fields, maxlen=cap, approximate=True)


def trim_events(client: Redis, *, keep_seconds: float = EVENTS_KEEP_SECONDS) -> int:
    """Trim the lifecycle stream to what its slowest group still needs; how many were removed.

    Safe to call from any process at any time (it is one atomic script).
    """
    oldest = f"{int((time.time() - keep_seconds) * 1000)}-0"
    removed = int(client.eval(_TRIM, 1, keys.EVENTS_STREAM, oldest))
    if removed:
        log.debug("events.trimmed", removed=removed)
    return removed


@dataclass(frozen=True)
class GroupLag:
    """How far a consumer group is behind the head of the lifecycle stream."""

    group: str
    pending: int  # delivered to a member, not yet acknowledged
    lag: int | None  # not yet delivered; None where Redis cannot tell (before 7.0, or trimmed)
    last_delivered: str


def group_lags(client: Redis) -> list[GroupLag]:
    """Every consumer group on the lifecycle stream, with its lag."""
    try:
        groups: Any = client.xinfo_groups(keys.EVENTS_STREAM)
    except ResponseError:  # no lifecycle stream yet
        return []
    return [
        GroupLag(
            group=text(g["name"]),
            pending=int(g["pending"]),
            lag=None if g.get("lag") is None else int(g["lag"]),
            last_delivered=text(g["last-delivered-id"]),
        )
        for g in groups
    ]
