"""The Lua scripts of job leases, and their arguments (see `stream.scripts` for the rest).

- RENEW moves a lease's deadline on, for its writer only, and the stream's expiry with it;
- LAPSED lists the leases that ran out;
- CLAIM takes over a job whose lease ran out: a new writer token replaces the old one, so the
  worker presumed dead can no longer write, in the same step as the check.

Leases are timed by Redis's clock, never a worker's. The worker's side is `worker.leases`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenrelay.stream import keys
from tokenrelay.stream.protocol import State, StatusEntry, encode
from tokenrelay.stream.scripts import Script, flat

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
# new attempt's number, the next seq, the tokens the attempts before streamed, and when the
# first began; false if the lease is live (or gone); a refusal if the stream ended or
# vanished (its lease is dropped). Sent again (its reply lost), it finds its own writer in
# place and returns the same claim.
_CLAIM = """
local function claimed()
  local c = redis.call('HMGET', KEYS[1], '$ATTEMPT', '$NEXT_SEQ', '$COMPLETION_TOKENS',
    '$STARTED_AT')
  return {tonumber(c[1]), tonumber(c[2]) or 0, tonumber(c[3]) or 0, c[4] or ''}
end
local st = redis.call('HMGET', KEYS[1], '$WRITER', '$END', '$NEXT_SEQ', '$ATTEMPT_FROM')
if st[1] == ARGV[3] and not st[2] then return claimed() end
local deadline = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
if not deadline or deadline >= now_ms() - tonumber(ARGV[2]) then return false end
if st[2] then redis.call('ZREM', KEYS[2], ARGV[1]) return closed() end
if not st[1] or redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return lost()
end
local next_seq = tonumber(st[3]) or 0
-- What the lost attempt streamed counts as its completion (its own report died with it).
redis.call('HINCRBY', KEYS[1], '$COMPLETION_TOKENS', next_seq - (tonumber(st[4]) or 0))
redis.call('HINCRBY', KEYS[1], '$ATTEMPT', 1)
redis.call('HSET', KEYS[1], '$WRITER', ARGV[3], '$ATTEMPT_FROM', next_seq)
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[4]), ARGV[1])
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 5))
return claimed()
"""


RENEW, LAPSED, CLAIM = Script.of(_RENEW), Script.of(_LAPSED), Script.of(_CLAIM)


def lease_keys(job_id: str) -> list[str]:
    """The keys of the renew and claim scripts: the job's state, the leases, its stream."""
    return [keys.stream_state(job_id), keys.LEASES, keys.token_stream(job_id)]


def renew_args(writer: str, job_id: str, *, lease_ms: int, ttl: int) -> list[str]:
    """RENEW's arguments."""
    return [writer, job_id, str(lease_ms), str(ttl)]


def claim_args(job_id: str, *, grace_ms: int, writer: str, lease_ms: int) -> list[str]:
    """CLAIM's arguments, with the `stalled` entry readers see when the job is taken over."""
    stalled = StatusEntry(State.STALLED, "the worker running the job stopped answering")
    return [job_id, str(grace_ms), writer, str(lease_ms), *flat(encode(stalled))]


@dataclass(frozen=True)
class Claim:
    """A job taken over from a worker presumed dead: what the new attempt goes on from."""

    writer: str
    attempt: int
    next_seq: int
    streamed: int  # tokens the attempts before streamed (their usage died with them)
    started_at: float | None  # when the job's first attempt began
