"""The metrics aggregator: per-model job counts, tokens and latencies, kept in Redis.

`tokenrelay.consumer.exporter` reads them back for Prometheus and the periodic summary.

Every metric is labelled by `model`: the model the worker used (its `start` entry); where no
worker started (a `submitted` event, a job cancelled while queued, a missing stream) the model
the event names, and `default` when it names none (the worker's configured default applies).
Submitters choose model names, so the labels are a bounded set (`MAX_MODELS`, kept in Redis):
once it is full, new names are counted under `other`.
Per-model series only: the overall value is `sum without (model) (...)` in PromQL, since a
`model="*"` series would be counted twice by every `sum`. `snapshot()` adds an `all` row.

Latencies come from each job's stream: queue wait from its `start` entry (any started job),
time to first token and duration from its `end` entry (finished jobs), and inter-token latency
from the millisecond timestamps of consecutive `token` entry ids (any job). Tokens out are the
server's `completion_tokens`, else the `token` entries (so also those of failed jobs).

Exactly once: an event's increments go into the handler's transaction as one script that
acknowledges the event itself and applies them only if that acknowledgement took the event off
the pending list. A consumer killed before the commit changes nothing and gets the event again;
a member presumed dead (`claim_after`) whose copy was claimed and counted elsewhere adds nothing.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import structlog
from redis import Redis
from redis.client import Pipeline

from tokenrelay.consumer.group import Delivery
from tokenrelay.errors import ProtocolError
from tokenrelay.stream import keys
from tokenrelay.stream.keys import Stat
from tokenrelay.stream.protocol import (
    AttemptEntry,
    EndEntry,
    Entry,
    ErrorEntry,
    Event,
    GapEntry,
    LifecycleEvent,
    StartEntry,
    TokenEntry,
)
from tokenrelay.stream.reader import scan_stream

log = structlog.get_logger()

#: The `model` label of a job whose model nobody named.
DEFAULT_MODEL = "default"

#: The `model` label of every model past the first `MAX_MODELS` seen.
OTHER_MODEL = "other"

#: How many distinct `model` labels the metrics keep.
MAX_MODELS = 100

# KEYS: the set of admitted labels. ARGV: the label, the most labels. The label itself if it
# is (or now becomes) one of the set, else `other`; atomic, so the set never overflows.
_ADMIT = (
    """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return ARGV[1] end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[1], ARGV[1])
  return ARGV[1]
end
return '"""
    + OTHER_MODEL
    + """'
"""
)

#: Counters: the name after `tokenrelay_` and before `_total`, its help, its labels.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "jobs_submitted": ("Jobs queued.", ("model",)),
    "jobs_started": ("Generations begun by a worker.", ("model",)),
    "jobs_finished": ("Jobs ended with an end entry.", ("model",)),
    "jobs_failed": ("Jobs ended with an error entry.", ("model", "error_type")),
    "jobs_cancelled": ("Jobs cancelled by their submitter.", ("model",)),
    "tokens_in": ("Prompt tokens, as the server reported them.", ("model",)),
    "tokens_out": ("Completion tokens (the server's count, else the token entries).", ("model",)),
    "attempts": (
        "Attempts begun after one that failed, by the reason it ended.",
        ("model", "reason"),
    ),
}

#: Histograms (seconds, or tokens per second): help and bucket upper bounds.
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "queue_wait_seconds": (
        "From submission to the start of generation.",
        (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    ),
    "time_to_first_token_seconds": (
        "From the start of generation to the first token (finished jobs).",
        (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60),
    ),
    "inter_token_latency_seconds": (
        "Between consecutive tokens, from their stream entry ids (millisecond resolution).",
        (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5),
    ),
    "generation_duration_seconds": (
        "From the start of generation to its end entry (finished jobs).",
        (0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600),
    ),
    "tokens_per_second": (
        "Completion tokens over generation duration, per finished job.",
        (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000),
    ),
}

#: The counters of `keys.consumer_stats(group)` exposed for every group.
CONSUMER_COUNTERS = (
    Stat.EVENTS_HANDLED,
    Stat.EVENTS_MALFORMED,
    Stat.EVENTS_TRIMMED,
    Stat.EVENTS_DEAD,
    Stat.STREAMS_MISSING,
    Stat.STREAMS_MALFORMED,
    Stat.STREAMS_GAPPED,
)

# KEYS: the lifecycle stream, the aggregates hash, the consumer-stats hash.
# ARGV: group, event id, then (op, field, amount) triples: `i` HINCRBY and `f` HINCRBYFLOAT on
# the aggregates, `s` HINCRBY on the stats. Applied only if this XACK removed a pending entry.
_APPLY = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
for i = 3, #ARGV, 3 do
  local op = ARGV[i]
  if op == 'f' then redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i + 1], ARGV[i + 2])
  elseif op == 'i' then redis.call('HINCRBY', KEYS[2], ARGV[i + 1], ARGV[i + 2])
  else redis.call('HINCRBY', KEYS[3], ARGV[i + 1], ARGV[i + 2]) end
end
return 1
"""


def _field(*parts: str) -> str:
    """A field of the aggregates hash: a JSON array of the metric name and its label values."""
    return json.dumps(parts, separators=(",", ":"))


def bucket_label(bound: float) -> str:
    """A bucket's `le` label as Prometheus writes it ("1.0", "0.05")."""
    return repr(float(bound))


def _ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


@dataclass
class _Increments:
    """What one event adds to the aggregates and to the consumer's stats."""

    ints: Counter[str] = field(default_factory=Counter)
    floats: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    stats: Counter[str] = field(default_factory=Counter)

    def count(self, name: str, *labels: str, by: int = 1) -> None:
        self.ints[_field(name, *labels)] += by

    def observe(self, name: str, model: str, value: float) -> None:
        bounds = HISTOGRAMS[name][1]
        le = next((b for b in bounds if value <= b), None)
        if le is not None:
            self.ints[_field(name, model, bucket_label(le))] += 1
        self.ints[_field(name, model, "count")] += 1
        self.floats[_field(name, model, "sum")] += value

    def merge(self, other: _Increments) -> None:
        self.ints.update(other.ints)
        for name, amount in other.floats.items():
            self.floats[name] += amount
        self.stats.update(other.stats)

    def args(self) -> list[str]:
        out: list[str] = []
        for op, values in (("i", self.ints), ("f", self.floats), ("s", self.stats)):
            for name, amount in values.items():
                out += (op, name, repr(amount))
        return out


@dataclass
class _Observed:
    """What one pass over a job's stream measured (its inter-token gaps go straight to `inc`)."""

    model: str
    inc: _Increments = field(default_factory=_Increments)
    start: StartEntry | None = None
    end: EndEntry | ErrorEntry | None = None
    tokens: int = 0
    previous: int | None = None  # the millisecond time of this attempt's last token

    def take(self, entry_id: str, entry: Entry) -> None:
        """Measure one entry of the stream."""
        if isinstance(entry, TokenEntry):
            at = _ms(entry_id)
            if self.previous is not None:
                latency = (at - self.previous) / 1000
                self.inc.observe("inter_token_latency_seconds", self.model, latency)
            self.tokens, self.previous = self.tokens + entry.count, at
        elif isinstance(entry, AttemptEntry):
            self.inc.count("attempts", self.model, entry.reason)
            self.previous = None
        elif isinstance(entry, GapEntry):
            self.inc.stats[Stat.STREAMS_GAPPED] = 1
            self.previous = None
        elif isinstance(entry, StartEntry):
            self.start = entry
        elif isinstance(entry, EndEntry | ErrorEntry):
            self.end = entry


def _count_stream(inc: _Increments, seen: _Observed) -> None:
    """Tokens and latencies of a whole job stream, from its `start` and terminal entries."""
    model, usage = seen.model, seen.end if isinstance(seen.end, EndEntry) else None
    out = (
        seen.tokens if usage is None or usage.completion_tokens is None else usage.completion_tokens
    )
    inc.count("tokens_out", model, by=out)
    inc.count("tokens_in", model, by=(usage and usage.prompt_tokens) or 0)
    start = seen.start
    if start is not None and start.submitted_at is not None:
        wait = round(start.started_at - start.submitted_at, 3)  # both are to the millisecond
        inc.observe("queue_wait_seconds", model, max(0.0, wait))
    if usage is not None and usage.ttft_ms is not None:
        inc.observe("time_to_first_token_seconds", model, usage.ttft_ms / 1000)
    if usage is not None and usage.duration_ms:
        inc.observe("generation_duration_seconds", model, usage.duration_ms / 1000)
        if out:
            inc.observe("tokens_per_second", model, out / (usage.duration_ms / 1000))


class MetricsAggregator:
    """The handler of the metrics group: adds each lifecycle event to the Redis aggregates."""

    def __init__(self, client: Redis, *, max_models: int = MAX_MODELS) -> None:
        self.client = client
        self.max_models = max_models
        self._apply = client.register_script(_APPLY)
        self._admit = client.register_script(_ADMIT)

    def __call__(self, delivery: Delivery, pipe: Pipeline) -> None:
        """Queue the event's increments, guarded by its acknowledgement, into `pipe`."""
        event, inc = delivery.event, _Increments()
        if event.event is Event.SUBMITTED or event.event is Event.STARTED:
            inc.count(f"jobs_{event.event.value}", self._label(event.model))
        else:
            self._ended(event, inc)
        script_keys = [
            keys.EVENTS_STREAM,
            keys.METRICS_STATE,
            keys.consumer_stats(keys.METRICS_GROUP),
        ]
        self._apply(script_keys, [keys.METRICS_GROUP, delivery.id, *inc.args()], client=pipe)

    def _label(self, model: str | None) -> str:
        """The `model` label: the model's name while the bounded set has room, else `other`."""
        if not model:
            return DEFAULT_MODEL
        admitted = self._admit([keys.METRICS_MODELS], [model, self.max_models])
        return str(admitted.decode() if isinstance(admitted, bytes) else admitted)

    def _ended(self, event: LifecycleEvent, inc: _Increments) -> None:
        seen = self._observe(event)
        model = seen.model if seen else self._label(event.model)
        if event.event is Event.FAILED:
            found = seen.end.error_type if seen and isinstance(seen.end, ErrorEntry) else None
            inc.count("jobs_failed", model, event.error_type or found or "unknown")
        else:
            inc.count(f"jobs_{event.event.value}", model)
        if seen is None:
            inc.stats[Stat.STREAMS_MISSING] += 1
        else:
            inc.merge(seen.inc)
            _count_stream(inc, seen)

    def _observe(self, event: LifecycleEvent) -> _Observed | None:
        """Measure the job's whole stream, read page by page; None (logged) if it is damaged.

        A stream that expired, was trimmed or broke the protocol adds nothing but a count.
        """
        seen: _Observed | None = None
        try:
            for record in scan_stream(self.client, event.job_id):
                entry = record.entry
                if seen is None:  # the first entry: a `start`, or what its trimming left
                    named = entry.model if isinstance(entry, StartEntry) else event.model
                    seen = _Observed(self._label(named))
                seen.take(record.id, entry)
        except ProtocolError as exc:
            log.warning("metrics.stream_missing", job_id=event.job_id, reason=f"damaged: {exc}")
            return None
        if seen is None or seen.end is None:
            reason = "absent" if seen is None else "no terminal entry"
            log.warning("metrics.stream_missing", job_id=event.job_id, reason=reason)
            return None
        return seen
