"""Writing a job's token stream: every append is atomic and refused after the terminal entry.

One Lua script does every append. It refuses any entry once the stream holds its
`end` or `error` entry (so a stream gets exactly one, whoever races to write it),
and it makes a repeated token append (a client retry after a lost reply) a no-op.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import NoScriptError

from tokenrelay import keys
from tokenrelay.errors import StreamClosedError
from tokenrelay.protocol import (
    EndEntry,
    ErrorEntry,
    Event,
    LifecycleEvent,
    StartEntry,
    TokenEntry,
    encode,
    encode_event,
)

log = structlog.get_logger()

# KEYS: the job stream, and optionally the lifecycle stream.
# ARGV: ttl (0 keeps the current one), the lifecycle stream's MAXLEN, the number of entry
# arguments N, then the entry's N field/value arguments (`kind` first; a token's `seq`
# second), then the lifecycle event's field/value arguments, if KEYS[2] is given.
# A client retry after a lost reply (redis-py retries on connection errors) must not write
# twice: a start, token or end entry identical to the last one (they carry a time or a `seq`,
# so only a retry repeats one), or a token at or below the last `seq`, returns the existing
# entry's id instead. Error entries can repeat by chance (two cancels), so they never match.
_APPEND = """
local n = tonumber(ARGV[3])
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  local f = last[2]
  local same = #f == n
  for i = 1, n do same = same and f[i] == ARGV[3 + i] end
  if same and f[2] ~= 'error' then return last[1] end
  if f[2] == 'end' or f[2] == 'error' then return false end
  if ARGV[5] == 'token' and f[2] == 'token' and tonumber(f[4]) >= tonumber(ARGV[7]) then
    return last[1]
  end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4, 3 + n))
if ARGV[1] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
if KEYS[2] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4 + n))
end
return id
"""
_APPEND_SHA = hashlib.sha1(_APPEND.encode(), usedforsecurity=False).hexdigest()


def emit(client: Redis, event: LifecycleEvent) -> None:
    """Append one job state change to the lifecycle stream."""
    fields: dict[Any, Any] = encode_event(event)
    client.xadd(keys.EVENTS_STREAM, fields, maxlen=keys.EVENTS_MAXLEN, approximate=True)


def _append(
    client: Redis,
    key: str,
    fields: dict[str, str],
    ttl: int,
    event: LifecycleEvent | None = None,
) -> str | None:
    """Run the append script; the new entry's id, or None if the stream is closed.

    With `event`, the lifecycle entry is appended in the same atomic step.
    """
    keys_ = [key] if event is None else [key, keys.EVENTS_STREAM]
    argv = [str(ttl), str(keys.EVENTS_MAXLEN), str(2 * len(fields))]
    for pairs in (fields, encode_event(event) if event else {}):
        for name, value in pairs.items():
            argv += (name, value)
    try:
        entry_id = client.evalsha(_APPEND_SHA, len(keys_), *keys_, *argv)
    except NoScriptError:  # the first call after a Redis restart, or ever
        entry_id = client.eval(_APPEND, len(keys_), *keys_, *argv)
    return None if entry_id is None else str(entry_id.decode())


#: The `error_type` of a job cancelled by its submitter.
CANCELLED = "cancelled"


def close_stream(
    client: Redis,
    job_id: str,
    entry: EndEntry | ErrorEntry,
    *,
    ttl: int,
    queue: str | None = None,
    model: str | None = None,
) -> bool:
    """Write the stream's terminal entry unless it has one; True if this call wrote it.

    The lifecycle event is written in the same atomic step, so each job gets exactly one.
    """
    if isinstance(entry, EndEntry):
        kind, error_type = Event.FINISHED, None
    else:
        kind = Event.CANCELLED if entry.error_type == CANCELLED else Event.FAILED
        error_type = entry.error_type
    event = LifecycleEvent(kind, job_id, time.time(), queue, model, error_type)
    return _append(client, keys.token_stream(job_id), encode(entry), ttl, event) is not None


def _well_formed(text: str) -> str:
    """Join surrogate pairs split by the server's JSON encoding; replace lone ones with U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


class StreamWriter:
    """Appends one job's entries in order: `start`, then its tokens, numbered from 0.

    The terminal entry is written with `close_stream`, which any process may call.
    """

    def __init__(self, client: Redis, job_id: str, *, ttl: int) -> None:
        self.job_id = job_id
        self.key = keys.token_stream(job_id)
        self.tokens = 0
        self.first_token_at: float | None = None
        self._client = client
        self._ttl = ttl
        self._held = ""  # a high surrogate whose low half may come with the next token

    def _write(self, fields: dict[str, str], ttl: int, event: LifecycleEvent | None = None) -> None:
        if _append(self._client, self.key, fields, ttl, event) is None:
            raise StreamClosedError(f"the stream of job {self.job_id} is already closed")

    def start(self, entry: StartEntry, queue: str | None = None) -> None:
        """Write the `start` entry and the `started` event; StreamClosedError if already ended."""
        event = LifecycleEvent(Event.STARTED, self.job_id, entry.started_at, queue, entry.model)
        self._write(encode(entry), self._ttl, event)

    def token(self, text: str) -> None:
        """Append one token; raises StreamClosedError once the job has been ended elsewhere."""
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

    def _repaired(self, text: str) -> str:
        fixed = _well_formed(text)
        if "\ufffd" in fixed:
            log.warning("token.unencodable", seq=self.tokens, replaced=fixed.count("\ufffd"))
        return fixed

    def _publish(self, text: str) -> None:
        self._write(encode(TokenEntry(self.tokens, text)), 0)
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self.tokens += 1
