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
- RENEW moves a lease's deadline on, for its writer only; LAPSED lists the leases that ran
  out; CLAIM takes over a job whose lease ran out: a new writer token replaces the old one,
  so the worker presumed dead can no longer write, in the same step as the check.

A refused write is an error for that writer (`WriterFencedError`, `StreamClosedError`,
`ProtocolError`), never for the readers: nothing reaches the stream. The sync writer
(`stream.writer`), the worker's batched async one (`stream.batcher`) and its lease keeper
(`worker.leases`) run these. Leases are timed by Redis's clock, never a worker's.
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
    AttemptEntry,
    Event,
    LifecycleEvent,
    StartEntry,
    State,
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
# length cap (0: none), job id, N, the start entry's N field/value arguments, then the
# `started` event's field/value arguments.
_BEGIN = """
local st = redis.call('HMGET', KEYS[2], '$WRITER', '$START', '$END')
if st[1] then
  if st[1] == ARGV[1] and st[2] then return st[2] end
  return fenced(st[1])
end
if st[3] then return closed() end
if redis.call('EXISTS', KEYS[1]) == 1 then return fenced('unknown') end
local n = tonumber(ARGV[7])
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 8, 7 + n))
redis.call('HSET', KEYS[2], '$WRITER', ARGV[1], '$NEXT_SEQ', 0, '$START', id, '$ATTEMPT', 1,
  '$ATTEMPT_FROM', 0)
if ARGV[5] ~= '0' then redis.call('HSET', KEYS[2], '$MAXLEN', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[4], now_ms() + tonumber(ARGV[4]), ARGV[6])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 8 + n))
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

# KEYS: stream, state. ARGV: writer, attempt, policy, from seq, prompt tokens and completion
# tokens of the attempt that ended (added to the state's usage), then the attempt entry's
# field/value arguments. A restart counts the tokens from 0 again.
_ATTEMPT = """
local st = redis.call('HMGET', KEYS[2], '$WRITER', '$NEXT_SEQ', '$END')
if st[3] then return closed() end
if not st[1] then return lost() end
if st[1] ~= ARGV[1] then return fenced(st[1]) end
local from = tonumber(ARGV[4])
local expected = ARGV[3] == 'restart' and 0 or tonumber(st[2])
if from ~= expected then
  return redis.error_reply('TOKENRELAY_GAP the attempt must go on from ' .. expected)
end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', unpack(ARGV, 7))
if not id then return lost() end
redis.call('HSET', KEYS[2], '$NEXT_SEQ', from, '$ATTEMPT', ARGV[2], '$ATTEMPT_FROM', from)
redis.call('HINCRBY', KEYS[2], '$PROMPT_TOKENS', ARGV[5])
redis.call('HINCRBY', KEYS[2], '$COMPLETION_TOKENS', ARGV[6])
return id
"""

# KEYS: stream, state. ARGV: writer, then the status entry's field/value arguments.
_STATUS = """
local st = redis.call('HMGET', KEYS[2], '$WRITER', '$END')
if st[2] then return closed() end
if not st[1] then return lost() end
if st[1] ~= ARGV[1] then return fenced(st[1]) end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', unpack(ARGV, 2))
if not id then return lost() end
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

# KEYS: state, leases, stream. ARGV: writer, job id, lease (ms), ttl. Moves the job's lease
# deadline on, and the stream's expiry with it, while this writer still owns the stream.
_RENEW = """
local st = redis.call('HMGET', KEYS[1], '$WRITER', '$END')
if st[2] then redis.call('ZREM', KEYS[2], ARGV[2]) return closed() end
if not st[1] then redis.call('ZREM', KEYS[2], ARGV[2]) return lost() end
if st[1] ~= ARGV[1] then return fenced(st[1]) end
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 1
"""

# KEYS: leases. ARGV: grace (ms), count. The jobs whose lease ran out more than `grace` ago.
_LAPSED = """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now_ms() - tonumber(ARGV[1])),
  'LIMIT', 0, tonumber(ARGV[2]))
"""

# KEYS: state, leases, stream. ARGV: job id, grace (ms), new writer, lease (ms), then the
# `stalled` status entry's field/value arguments. Takes over a job whose lease ran out more
# than `grace` ago: the new writer fences the old one out in this same step. Returns the
# new attempt's number, the next seq, and the usage of the attempts before; false if the
# lease is live (or gone); a refusal if the stream ended or vanished (its lease is dropped).
_CLAIM = """
local deadline = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
if not deadline or deadline >= now_ms() - tonumber(ARGV[2]) then return false end
local st = redis.call('HMGET', KEYS[1], '$WRITER', '$END', '$NEXT_SEQ', '$ATTEMPT',
  '$ATTEMPT_FROM')
if st[2] then redis.call('ZREM', KEYS[2], ARGV[1]) return closed() end
if not st[1] or redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return lost()
end
local next_seq = tonumber(st[3]) or 0
-- What the lost attempt streamed counts as its completion (its own report died with it).
redis.call('HINCRBY', KEYS[1], '$COMPLETION_TOKENS', next_seq - (tonumber(st[5]) or 0))
local attempt = redis.call('HINCRBY', KEYS[1], '$ATTEMPT', 1)
redis.call('HSET', KEYS[1], '$WRITER', ARGV[3])
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[4]), ARGV[1])
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 5))
local usage = redis.call('HMGET', KEYS[1], '$PROMPT_TOKENS', '$COMPLETION_TOKENS')
return {attempt, next_seq, tonumber(usage[1]) or 0, tonumber(usage[2]) or 0}
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
RENEW, LAPSED, CLAIM = Script.of(_RENEW), Script.of(_LAPSED), Script.of(_CLAIM)


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
    """The keys of the append, attempt and status scripts: the job's stream and its state."""
    return [keys.token_stream(job_id), keys.stream_state(job_id)]


def with_events(job_id: str) -> list[str]:
    """The keys of the begin and close scripts: the stream, its state, the lifecycle stream
    and the leases."""
    return [*stream_keys(job_id), keys.EVENTS_STREAM, keys.LEASES]


def lease_keys(job_id: str) -> list[str]:
    """The keys of the renew and claim scripts: the job's state, the leases, its stream."""
    return [keys.stream_state(job_id), keys.LEASES, keys.token_stream(job_id)]


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
    return [*args, str(2 * len(fields)), *_flat(fields), *_flat(encode_event(event))]


def append_args(writer: str, entry: TokenEntry, *, ttl: int = 0, maxlen: int = 0) -> list[str]:
    """APPEND's arguments for one token entry; `ttl` 0 leaves the stream's expiry as it is."""
    args = [writer, str(ttl), str(entry.seq), str(entry.count), str(maxlen)]
    return [*args, *_flat(encode(entry))]


def attempt_args(
    writer: str, entry: AttemptEntry, *, prompt_tokens: int = 0, completion_tokens: int = 0
) -> list[str]:
    """ATTEMPT's arguments: the new attempt's entry, and the usage of the one that ended."""
    head = [writer, str(entry.attempt), entry.policy.value, str(entry.from_seq)]
    return [*head, str(prompt_tokens), str(completion_tokens), *_flat(encode(entry))]


def status_args(writer: str, entry: StatusEntry) -> list[str]:
    """STATUS's arguments."""
    return [writer, *_flat(encode(entry))]


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
    return [*args, *_flat(fields), *_flat(encode_event(event))]


def renew_args(writer: str, job_id: str, *, lease_ms: int, ttl: int) -> list[str]:
    """RENEW's arguments."""
    return [writer, job_id, str(lease_ms), str(ttl)]


def claim_args(job_id: str, *, grace_ms: int, writer: str, lease_ms: int) -> list[str]:
    """CLAIM's arguments, with the `stalled` entry readers see when the job is taken over."""
    stalled = StatusEntry(State.STALLED, "the worker running the job stopped answering")
    return [job_id, str(grace_ms), writer, str(lease_ms), *_flat(encode(stalled))]


@dataclass(frozen=True)
class Claim:
    """A job taken over from a worker presumed dead: what the new attempt goes on from."""

    writer: str
    attempt: int
    next_seq: int
    prompt_tokens: int
    completion_tokens: int
