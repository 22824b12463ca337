"""The three Lua scripts that do every write to a job stream, and their arguments.

Each runs in one atomic step with the job's state hash (`keys.stream_state`), which records
who may write and what must come next:

- BEGIN writes the `start` entry and makes the caller's writer token the stream's only
  writer; a second `start`, from anyone else, is refused (`WriterFencedError`).
- APPEND writes a `token` entry (of `n` tokens) only for that writer, and only with exactly
  the next `seq`. A writer's own retried append (a command re-sent after its reply was lost)
  is recognised by its `seq` and not written twice. With a TTL it refreshes the stream's
  expiry, so a long generation never outlives its stream, and it never recreates a stream
  (or a state) that vanished under it (evicted, deleted): that ends the writer.
- CLOSE writes the terminal entry unless there is one already, with its lifecycle event in
  the same step, so each job gets exactly one. The generation closes with its writer token
  (fenced); a cancel or a clean-up closes without one. A retry with the same nonce returns
  the entry it wrote.

A refused write is an error for that writer (`WriterFencedError`, `StreamClosedError`,
`ProtocolError`), never for the readers: nothing reaches the stream. The sync writer
(`stream.writer`) and the worker's batched async one (`stream.batcher`) both run these.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass

from redis.exceptions import ResponseError

from tokenrelay.errors import ProtocolError, StreamClosedError, WriterFencedError
from tokenrelay.stream import keys
from tokenrelay.stream.keys import StateField
from tokenrelay.stream.protocol import (
    Event,
    LifecycleEvent,
    StartEntry,
    Terminal,
    TokenEntry,
    encode,
    encode_event,
)

# The refusals, as error replies the client maps to exceptions (see `refusal`).
_REFUSALS = """
local function closed() return redis.error_reply('TOKENRELAY_CLOSED') end
local function fenced(w) return redis.error_reply('TOKENRELAY_FENCED ' .. tostring(w)) end
local function lost() return redis.error_reply('TOKENRELAY_LOST') end
"""

# KEYS: stream, state, lifecycle stream. ARGV: writer, ttl, events cap, N, the start entry's N
# field/value arguments, then the `started` event's field/value arguments.
_BEGIN = """
local st = redis.call('HMGET', KEYS[2], '$WRITER', '$START', '$END')
if st[1] then
  if st[1] == ARGV[1] and st[2] then return st[2] end
  return fenced(st[1])
end
if st[3] then return closed() end
if redis.call('EXISTS', KEYS[1]) == 1 then return fenced('unknown') end
local n = tonumber(ARGV[4])
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5, 4 + n))
redis.call('HSET', KEYS[2], '$WRITER', ARGV[1], '$NEXT_SEQ', 0, '$START', id)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 5 + n))
return id
"""

# KEYS: stream, state. ARGV: writer, ttl ('0': leave the expiry), seq, n, then the token
# entry's field/value arguments.
_APPEND = """
local st = redis.call('HMGET', KEYS[2], '$WRITER', '$NEXT_SEQ', '$END')
if st[3] then return closed() end
if not st[1] then return lost() end
if st[1] ~= ARGV[1] then return fenced(st[1]) end
local expected, seq = tonumber(st[2]), tonumber(ARGV[3])
if seq < expected then return 'retried' end
if seq > expected then
  return redis.error_reply('TOKENRELAY_GAP token ' .. expected .. ' comes next, not ' .. seq)
end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', unpack(ARGV, 5))
if not id then return lost() end
redis.call('HSET', KEYS[2], '$NEXT_SEQ', seq + tonumber(ARGV[4]))
if ARGV[2] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return id
"""

# KEYS: stream, state, lifecycle stream. ARGV: writer ('' closes whoever writes), nonce (the
# same for a retry of this call), ttl, events cap, N, the terminal entry's N field/value
# arguments, then the lifecycle event's. Returns the entry id, or false if already closed.
_CLOSE = """
local st = redis.call('HMGET', KEYS[2], '$WRITER', '$END', '$CLOSED_BY')
if st[2] then
  if st[3] == ARGV[2] then return st[2] end
  return false
end
if ARGV[1] ~= '' and st[1] and st[1] ~= ARGV[1] then return fenced(st[1]) end
local n = tonumber(ARGV[5])
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 6, 5 + n))
redis.call('HSET', KEYS[2], '$END', id, '$CLOSED_BY', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 6 + n))
return id
"""


@dataclass(frozen=True)
class Script:
    """A Lua script, with the state hash's field names filled in, and its SHA1."""

    source: str
    sha: str

    @classmethod
    def of(cls, body: str) -> Script:
        fields = {f.name: f.value for f in StateField}
        source = _REFUSALS + string.Template(body).substitute(fields)
        return cls(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


BEGIN, APPEND, CLOSE = Script.of(_BEGIN), Script.of(_APPEND), Script.of(_CLOSE)


def refusal(reply: str) -> Exception:
    """The exception for a script's error reply (a ResponseError for anything else)."""
    if reply.startswith("TOKENRELAY_CLOSED"):
        return StreamClosedError("the stream already has its terminal entry")
    if reply.startswith("TOKENRELAY_FENCED"):
        return WriterFencedError("another writer owns this stream")
    if reply.startswith("TOKENRELAY_LOST"):
        return StreamClosedError("the stream or its state is gone (expired, evicted or deleted)")
    if reply.startswith("TOKENRELAY_GAP"):
        return ProtocolError(reply.removeprefix("TOKENRELAY_GAP "))
    return ResponseError(reply)


def _flat(fields: dict[str, str]) -> list[str]:
    return [part for pair in fields.items() for part in pair]


def stream_keys(job_id: str) -> list[str]:
    """The keys of the append script: the job's stream and its state."""
    return [keys.token_stream(job_id), keys.stream_state(job_id)]


def with_events(job_id: str) -> list[str]:
    """The keys of the begin and close scripts: the stream, its state, the lifecycle stream."""
    return [*stream_keys(job_id), keys.EVENTS_STREAM]


def begin_args(start: StartEntry, *, ttl: int, queue: str | None, events_cap: int) -> list[str]:
    """BEGIN's arguments: the start entry (carrying the writer token) and its `started` event."""
    event = LifecycleEvent(Event.STARTED, start.job_id, start.started_at, queue, start.model)
    fields = encode(start)
    args = [start.writer, str(ttl), str(events_cap), str(2 * len(fields))]
    return [*args, *_flat(fields), *_flat(encode_event(event))]


def append_args(writer: str, entry: TokenEntry, *, ttl: int = 0) -> list[str]:
    """APPEND's arguments for one token entry; `ttl` 0 leaves the stream's expiry as it is."""
    return [writer, str(ttl), str(entry.seq), str(entry.count), *_flat(encode(entry))]


def close_args(
    entry: Terminal,
    event: LifecycleEvent,
    *,
    writer: str,
    nonce: str,
    ttl: int,
    events_cap: int,
) -> list[str]:
    """CLOSE's arguments: the terminal entry and its lifecycle event."""
    fields = encode(entry)
    args = [writer, nonce, str(ttl), str(events_cap), str(2 * len(fields))]
    return [*args, *_flat(fields), *_flat(encode_event(event))]
