"""Writing a job's token stream: one writer per stream, fenced and atomic in Redis.

Three Lua scripts do every write, each in one atomic step with the job's state hash
(`keys.stream_state`), which records who may write and what must come next:

- BEGIN writes the `start` entry and makes the caller's writer token the stream's only
  writer; a second `start`, from anyone else, is refused (`WriterFencedError`).
- APPEND writes a `token` entry only for that writer, and only with exactly the next `seq`.
  A writer's own retried append (redis-py re-sends a command whose reply was lost) is
  recognised by its `seq` and not written twice. It refreshes the stream's expiry, so a
  long generation never outlives its stream, and it never recreates a stream (or a state)
  that vanished under it (evicted, deleted): that ends the writer (`StreamClosedError`).
- CLOSE writes the terminal entry unless there is one already, with its lifecycle event
  in the same step, so each job gets exactly one. The generation closes with its writer
  token (fenced); a cancel or a clean-up hook closes without one.

A refused write is an error for that writer (`WriterFencedError`, `StreamClosedError`,
`ProtocolError`), never for the readers: nothing reaches the stream.
"""

from __future__ import annotations

import hashlib
import string
import time
import uuid
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import NoScriptError, ResponseError

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
    ended_as,
)

log = structlog.get_logger()

# The refusals, as error replies the client maps to exceptions (see `_refused`).
_REFUSALS = """
local function closed() return redis.error_reply('TOKENRELAY_CLOSED') end
local function fenced(w) return redis.error_reply('TOKENRELAY_FENCED ' .. tostring(w)) end
local function lost() return redis.error_reply('TOKENRELAY_LOST') end
"""

# KEYS: stream, state, lifecycle stream. ARGV: writer, ttl, events cap, N, the start entry's N
# field/value arguments, then the `started` event's field/value arguments.
_BEGIN = (
    _REFUSALS
    + """
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
)

# KEYS: stream, state. ARGV: writer, ttl, then the token entry's field/value arguments:
# `kind`, `token`, `seq`, S, ... (the seq is ARGV[6]).
_APPEND = (
    _REFUSALS
    + """
local st = redis.call('HMGET', KEYS[2], '$WRITER', '$NEXT_SEQ', '$END')
if st[3] then return closed() end
if not st[1] then return lost() end
if st[1] ~= ARGV[1] then return fenced(st[1]) end
local expected, seq = tonumber(st[2]), tonumber(ARGV[6])
if seq < expected then return 'retried' end
if seq > expected then
  return redis.error_reply('TOKENRELAY_GAP token ' .. expected .. ' comes next, not ' .. seq)
end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', unpack(ARGV, 3))
if not id then return lost() end
redis.call('HSET', KEYS[2], '$NEXT_SEQ', seq + 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return id
"""
)

# KEYS: stream, state, lifecycle stream. ARGV: writer ('' closes whoever writes), nonce (the
# same for a retry of this call), ttl, events cap, N, the terminal entry's N field/value
# arguments, then the lifecycle event's. Returns the entry id, or false if already closed.
_CLOSE = (
    _REFUSALS
    + """
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
)


def _fields_named(source: str) -> str:
    """The script with `$FIELD` placeholders replaced by the state hash's field names."""
    return string.Template(source).substitute({f.name: f.value for f in StateField})


_BEGIN, _APPEND, _CLOSE = (_fields_named(s) for s in (_BEGIN, _APPEND, _CLOSE))


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


_SHAS = {source: _sha(source) for source in (_BEGIN, _APPEND, _CLOSE)}


def _run(client: Redis, source: str, script_keys: list[str], args: list[str]) -> Any:
    """Run a script by its hash, loading it on the first call after a Redis (re)start."""
    try:
        try:
            return client.evalsha(_SHAS[source], len(script_keys), *script_keys, *args)
        except NoScriptError:
            return client.eval(source, len(script_keys), *script_keys, *args)
    except ResponseError as exc:
        raise _refused(str(exc)) from None


def _refused(reply: str) -> Exception:
    """The exception for a script's error reply."""
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


def new_writer_token() -> str:
    """A fresh writer token: one per attempt at a generation."""
    return uuid.uuid4().hex


def close_stream(
    client: Redis,
    job_id: str,
    entry: Terminal,
    *,
    ttl: int,
    queue: str | None = None,
    model: str | None = None,
    writer: str = "",
    nonce: str | None = None,
    events_cap: int = keys.EVENTS_HARD_CAP,
) -> bool:
    """Write the stream's terminal entry unless it has one; True if this call wrote it.

    The lifecycle event is written in the same atomic step, so each job gets exactly one.
    With `writer`, only that writer may close it (WriterFencedError otherwise). A retry with
    the same `nonce` after a lost reply returns True again without writing twice.
    """
    event = LifecycleEvent(
        ended_as(entry), job_id, time.time(), queue, model, getattr(entry, "error_type", None)
    )
    fields, event_fields = encode(entry), encode_event(event)
    args = [writer, nonce or uuid.uuid4().hex, str(ttl), str(events_cap)]
    args += [str(2 * len(fields)), *_flat(fields), *_flat(event_fields)]
    script_keys = [keys.token_stream(job_id), keys.stream_state(job_id), keys.EVENTS_STREAM]
    return _run(client, _CLOSE, script_keys, args) is not None


def _well_formed(text: str) -> str:
    """Join surrogate pairs split by the server's JSON encoding; replace lone ones with U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


class StreamWriter:
    """The one writer of a job's stream for one attempt: `start`, tokens from 0, the end.

    Every write carries this writer's token; once another writer owns the stream, or it was
    closed (a cancel, a clean-up), each write raises instead of reaching the stream.
    """

    def __init__(
        self, client: Redis, job_id: str, *, ttl: int, events_cap: int = keys.EVENTS_HARD_CAP
    ) -> None:
        self.job_id = job_id
        self.key = keys.token_stream(job_id)
        self.writer_token = new_writer_token()
        self.events_cap = events_cap
        self.tokens = 0
        self.first_token_at: float | None = None
        self._client = client
        self._ttl = ttl
        self._state = keys.stream_state(job_id)
        self._held = ""  # a high surrogate whose low half may come with the next token

    def start(self, entry: StartEntry, queue: str | None = None) -> None:
        """Write the `start` entry and the `started` event, and become the stream's writer.

        Raises WriterFencedError if the stream has another writer (the job runs twice), and
        StreamClosedError if it was ended before it started (cancelled while queued).
        """
        if entry.writer != self.writer_token:
            raise ValueError("the start entry must carry this writer's token")
        event = LifecycleEvent(Event.STARTED, self.job_id, entry.started_at, queue, entry.model)
        fields, event_fields = encode(entry), encode_event(event)
        args = [self.writer_token, str(self._ttl), str(self.events_cap), str(2 * len(fields))]
        args += [*_flat(fields), *_flat(event_fields)]
        _run(self._client, _BEGIN, [self.key, self._state, keys.EVENTS_STREAM], args)

    def token(self, text: str) -> None:
        """Append one token; raises once the stream was closed or fenced elsewhere."""
        if self._held:
            text, self._held = self._held + text, ""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            if "\ud800" <= text[-1] <= "\udbff":
                text, self._held = text[:-1], text[-1]
            text = self._repaired(text)
        if text:  # an empty delta carries nothing to show
            self._publish(text)

    def flush(self) -> None:
        """Publish what is held back at the end of the model's stream."""
        if self._held:
            held, self._held = self._held, ""
            self._publish(self._repaired(held))

    def close(self, entry: Terminal, *, queue: str | None = None, model: str | None = None) -> bool:
        """Write this attempt's terminal entry; False if the stream was closed elsewhere first."""
        return close_stream(
            self._client,
            self.job_id,
            entry,
            ttl=self._ttl,
            queue=queue,
            model=model,
            writer=self.writer_token,
            events_cap=self.events_cap,
        )

    def _repaired(self, text: str) -> str:
        fixed = _well_formed(text)
        if "\ufffd" in fixed:
            log.warning("token.unencodable", seq=self.tokens, replaced=fixed.count("\ufffd"))
        return fixed

    def _publish(self, text: str) -> None:
        args = [self.writer_token, str(self._ttl), *_flat(encode(TokenEntry(self.tokens, text)))]
        _run(self._client, _APPEND, [self.key, self._state], args)
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self.tokens += 1
