"""The Lua scripts that do every write to a job stream, and their arguments.

Each runs in one atomic step with the job's state hash (`keys.stream_state`), which records
who may write and what must come next:

- BEGIN writes the `start` entry and makes the caller's writer token the stream's only
  writer; a second `start`, from anyone else, is refused (`WriterFencedError`). It gives
  the job a lease (`keys.LEASES`).
- APPEND writes a `token` entry (of `n` tokens) only for that writer, and only with exactly
  the next `seq`. A writer's own retried append (a command re-sent after its reply was lost)
  is recognised by its `seq` and not written twice. With a TTL it refreshes the stream's
  expiry, so a long generation never outlives its stream, and it never recreates a stream
  (or a state) that vanished under it (evicted, deleted): that ends the writer. With a
  length cap it trims the stream's oldest entries (`XADD MAXLEN ~`).
- ATTEMPT and STATUS write an `attempt` entry (a new attempt begins: the seq it goes on from)
  and a `status` entry (the job stalled, or will retry), for the writer only.
- CLOSE writes the terminal entry unless there is one already, with its lifecycle event in
  the same step, so each job gets exactly one, and drops the lease. The generation closes
  with its writer token (fenced); a cancel or a clean-up closes without one. A retry with
  the same nonce returns the entry it wrote.
- The lease scripts (RENEW, LAPSED, CLAIM) are in `stream.lease_scripts`.

Every script is safe to send again after its reply was lost (redis-py resends a command whose
connection broke): each recognises its own earlier write (by `seq`, by attempt number, by a
nonce) and does not write twice. A refused write is an error for that writer
(`WriterFencedError`, `StreamClosedError`, `ProtocolError`), never for the readers: nothing
reaches the stream. The sync writer (`stream.writer`) and the worker's batched async one
(`stream.batcher`) run these.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass

from redis.exceptions import ResponseError

from tokenrelay.errors import ProtocolError, StreamClosedError, StreamLostError, WriterFencedError
from tokenrelay.stream import keys
from tokenrelay.stream.keys import StateField
from tokenrelay.stream.protocol import (
    AttemptEntry,
    Event,
    LifecycleEvent,
    StartEntry,
    StatusEntry,
    Terminal,
    TokenEntry,
    encode,
    encode_event,
)

# The refusals, as error replies the client maps to exceptions (see `refusal`), and Redis's
# clock in milliseconds (leases are timed by it, so that workers' clocks never matter).
_COMMON = """
local function closed() return redis.error_reply('TOKENRELAY_CLOSED') end
local function fenced(w) return redis.error_reply('TOKENRELAY_FENCED ' .. tostring(w)) end
local function lost() return redis.error_reply('TOKENRELAY_LOST') end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: stream, state, lifecycle stream, leases. ARGV: writer, ttl, events cap, lease (ms),
# length cap (0: none), job id, started at, N, the start entry's N field/value arguments, then
# the `started` event's field/value arguments.
_BEGIN = """
local st = redis.call('HMGET', KEYS[2], '$WRITER', '$START', '$END')
if st[1] then
  if st[1] == ARGV[1] and st[2] then return st[2] end
  return fenced(st[1])
end
if st[3] then return closed() end
if redis.call('EXISTS', KEYS[1]) == 1 then return fenced('unknown') end
local n = tonumber(ARGV[8])
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 9, 8 + n))
redis.call('HSET', KEYS[2], '$WRITER', ARGV[1], '$NEXT_SEQ', 0, '$START', id, '$ATTEMPT', 1,
  '$ATTEMPT_FROM', 0, '$ATTEMPT_ENTRY', 1, '$STARTED_AT', ARGV[7])
if ARGV[5] ~= '0' then redis.call('HSET', KEYS[2], '$MAXLEN', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[4], now_ms() + tonumber(ARGV[4]), ARGV[6])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 9 + n))
return id
"""

# KEYS: stream, state. ARGV: writer, ttl ('0': leave the expiry), seq, n, length cap ('0':
# none), then the token entry's field/value arguments.
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
local id
if ARGV[5] ~= '0' then
  id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 6))
else
  id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', unpack(ARGV, 6))
end
if not id then return lost() end
redis.call('HSET', KEYS[2], '$NEXT_SEQ', seq + tonumber(ARGV[4]))
if ARGV[2] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return id
"""

# KEYS: stream, state. ARGV: writer, attempt, policy, from seq, the tokens streamed by the
# attempt that ended (added to the state's count), then the attempt entry's field/value
# arguments. A restart counts the tokens from 0 again. Sent again (its reply lost), it
# recognises its own entry by the attempt's number and writes nothing.
_ATTEMPT = """
local st = redis.call('HMGET', KEYS[2], '$WRITER', '$NEXT_SEQ', '$END', '$ATTEMPT_ENTRY')
if st[3] then return closed() end
if not st[1] then return lost() end
if st[1] ~= ARGV[1] then return fenced(st[1]) end
if st[4] == ARGV[2] then return 'retried' end
local from = tonumber(ARGV[4])
local expected = ARGV[3] == 'restart' and 0 or tonumber(st[2])
if from ~= expected then
  return redis.error_reply('TOKENRELAY_GAP the attempt must go on from ' .. expected)
end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', unpack(ARGV, 6))
if not id then return lost() end
redis.call('HSET', KEYS[2], '$NEXT_SEQ', from, '$ATTEMPT', ARGV[2], '$ATTEMPT_FROM', from,
  '$ATTEMPT_ENTRY', ARGV[2])
redis.call('HINCRBY', KEYS[2], '$COMPLETION_TOKENS', ARGV[5])
return id
"""

# KEYS: stream, state. ARGV: writer, nonce (the same for a call sent again), then the status
# entry's field/value arguments.
_STATUS = """
local st = redis.call('HMGET', KEYS[2], '$WRITER', '$END', '$STATUS_NONCE')
if st[2] then return closed() end
if not st[1] then return lost() end
if st[1] ~= ARGV[1] then return fenced(st[1]) end
if st[3] == ARGV[2] then return 'retried' end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', unpack(ARGV, 3))
if not id then return lost() end
redis.call('HSET', KEYS[2], '$STATUS_NONCE', ARGV[2])
return id
"""

# KEYS: stream, state, lifecycle stream, leases. ARGV: writer ('' closes whoever writes),
# nonce (the same for a retry of this call), ttl, events cap, job id, N, the terminal entry's
# N field/value arguments, then the lifecycle event's. Returns the entry id, or false if
# already closed. The job's lease goes with it.
_CLOSE = """
local st = redis.call('HMGET', KEYS[2], '$WRITER', '$END', '$CLOSED_BY')
if st[2] then
  if st[3] == ARGV[2] then return st[2] end
  return false
end
if ARGV[1] ~= '' and st[1] and st[1] ~= ARGV[1] then return fenced(st[1]) end
local n = tonumber(ARGV[6])
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 7, 6 + n))
redis.call('HSET', KEYS[2], '$END', id, '$CLOSED_BY', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[5])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 7 + n))
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
        source = _COMMON + string.Template(body).substitute(fields)
        return cls(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


BEGIN, APPEND, CLOSE = Script.of(_BEGIN), Script.of(_APPEND), Script.of(_CLOSE)
ATTEMPT, STATUS = Script.of(_ATTEMPT), Script.of(_STATUS)


def refusal(reply: str) -> Exception:
    """The exception for a script's error reply (a ResponseError for anything else)."""
    if reply.startswith("TOKENRELAY_CLOSED"):
        return StreamClosedError("the stream already has its terminal entry")
    if reply.startswith("TOKENRELAY_FENCED"):
        return WriterFencedError("another writer owns this stream")
    if reply.startswith("TOKENRELAY_LOST"):
        return StreamLostError("the stream or its state is gone (expired, evicted or deleted)")
    if reply.startswith("TOKENRELAY_GAP"):
        return ProtocolError(reply.removeprefix("TOKENRELAY_GAP "))
    return ResponseError(reply)


def flat(fields: dict[str, str]) -> list[str]:
    """An entry's fields as the flat list of arguments XADD takes."""
    return [part for pair in fields.items() for part in pair]


def stream_keys(job_id: str) -> list[str]:
    """The keys of the append, attempt and status scripts: the job's stream and its state."""
    return [keys.token_stream(job_id), keys.stream_state(job_id)]


def with_events(job_id: str) -> list[str]:
    """The keys of the begin and close scripts: the stream, its state, the lifecycle stream
    and the leases."""
    return [*stream_keys(job_id), keys.EVENTS_STREAM, keys.LEASES]


def begin_args(
    start: StartEntry,
    *,
    ttl: int,
    queue: str | None,
    events_cap: int,
    lease_ms: int,
    maxlen: int = 0,
) -> list[str]:
    """BEGIN's arguments: the start entry (carrying the writer token) and its `started` event."""
    event = LifecycleEvent(Event.STARTED, start.job_id, start.started_at, queue, start.model)
    fields = encode(start)
    args = [start.writer, str(ttl), str(events_cap), str(lease_ms), str(maxlen), start.job_id]
    args.append(repr(start.started_at))
    return [*args, str(2 * len(fields)), *flat(fields), *flat(encode_event(event))]


def append_args(writer: str, entry: TokenEntry, *, ttl: int = 0, maxlen: int = 0) -> list[str]:
    """APPEND's arguments for one token entry; `ttl` 0 leaves the stream's expiry as it is."""
    args = [writer, str(ttl), str(entry.seq), str(entry.count), str(maxlen)]
    return [*args, *flat(encode(entry))]


def attempt_args(writer: str, entry: AttemptEntry, *, streamed: int = 0) -> list[str]:
    """ATTEMPT's arguments: the new attempt's entry, and the tokens the one that ended streamed."""
    head = [writer, str(entry.attempt), entry.policy.value, str(entry.from_seq)]
    return [*head, str(streamed), *flat(encode(entry))]


def status_args(writer: str, entry: StatusEntry, *, nonce: str) -> list[str]:
    """STATUS's arguments; `nonce` is the same when the same call is sent again."""
    return [writer, nonce, *flat(encode(entry))]


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
    args = [writer, nonce, str(ttl), str(events_cap), event.job_id, str(2 * len(fields))]
    return [*args, *flat(fields), *flat(encode_event(event))]
