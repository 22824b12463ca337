"""The metrics aggregator: per-model job counts, tokens and latencies kept in Redis, for Prometheus.

Every metric is labelled by `model`: the model the worker used (its `start` entry); where no
worker started (a `submitted` event, a job cancelled while queued, a missing stream) the model
the event names, and `default` when it names none (the worker's configured default applies).
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
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, TextIO

import structlog
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from redis import Redis
from redis.client import Pipeline

from tokenrelay import keys
from tokenrelay.consumers.group import Delivery, GroupConsumer, group_lags
from tokenrelay.errors import ProtocolError
from tokenrelay.protocol import (
    EndEntry,
    ErrorEntry,
    Event,
    LifecycleEvent,
    Record,
    StartEntry,
    TokenEntry,
    is_terminal,
    records,
)

log = structlog.get_logger()

#: The `model` label of a job whose model nobody named.
DEFAULT_MODEL = "default"

#: Counters: the name after `tokenrelay_` and before `_total`, its help, its labels.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "jobs_submitted": ("Jobs queued.", ("model",)),
    "jobs_started": ("Generations begun by a worker.", ("model",)),
    "jobs_finished": ("Jobs ended with an end entry.", ("model",)),
    "jobs_failed": ("Jobs ended with an error entry.", ("model", "error_type")),
    "jobs_cancelled": ("Jobs cancelled by their submitter.", ("model",)),
    "tokens_in": ("Prompt tokens, as the server reported them.", ("model",)),
    "tokens_out": ("Completion tokens (the server's count, else the token entries).", ("model",)),
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
    "events_handled",
    "events_malformed",
    "events_trimmed",
    "trim_gaps",
    "streams_missing",
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


def _label(model: str | None) -> str:
    return model or DEFAULT_MODEL


def _le(bound: float) -> str:
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
            self.ints[_field(name, model, _le(le))] += 1
        self.ints[_field(name, model, "count")] += 1
        self.floats[_field(name, model, "sum")] += value

    def args(self) -> list[str]:
        out: list[str] = []
        for op, values in (("i", self.ints), ("f", self.floats), ("s", self.stats)):
            for name, amount in values.items():
                out += (op, name, repr(amount))
        return out


def _damage(stream: list[Record]) -> str | None:
    """Why a job's stream cannot be measured (expired, trimmed), or None if it is whole."""
    if not stream:
        return "absent"
    first, last = stream[0].entry, stream[-1].entry
    if not is_terminal(last):
        return "no terminal entry"
    # Only a job ended before it started (cancelled while queued) has no `start` entry.
    if not isinstance(first, StartEntry) and not (
        len(stream) == 1 and isinstance(last, ErrorEntry)
    ):
        return "trimmed"
    tokens = sum(isinstance(r.entry, TokenEntry) for r in stream)
    if isinstance(last, EndEntry) and last.tokens != tokens:
        return "trimmed"
    return None


def _observe_stream(inc: _Increments, model: str, stream: list[Record]) -> None:
    """Tokens and latencies of a whole job stream."""
    start, end = stream[0].entry, stream[-1].entry
    token_ms = [_ms(r.id) for r in stream if isinstance(r.entry, TokenEntry)]
    usage = end if isinstance(end, EndEntry) else None
    out = (
        len(token_ms)
        if usage is None or usage.completion_tokens is None
        else usage.completion_tokens
    )
    inc.count("tokens_out", model, by=out)
    inc.count("tokens_in", model, by=(usage and usage.prompt_tokens) or 0)
    if isinstance(start, StartEntry) and start.submitted_at is not None:
        inc.observe("queue_wait_seconds", model, max(0.0, start.started_at - start.submitted_at))
    for before, after in pairwise(token_ms):
        inc.observe("inter_token_latency_seconds", model, (after - before) / 1000)
    if usage is not None and usage.ttft_ms is not None:
        inc.observe("time_to_first_token_seconds", model, usage.ttft_ms / 1000)
    if usage is not None and usage.duration_ms:
        inc.observe("generation_duration_seconds", model, usage.duration_ms / 1000)
        if out:
            inc.observe("tokens_per_second", model, out / (usage.duration_ms / 1000))


class MetricsAggregator:
    """The handler of the metrics group: adds each lifecycle event to the Redis aggregates."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self._apply = client.register_script(_APPLY)

    def __call__(self, delivery: Delivery, pipe: Pipeline) -> None:
        """Queue the event's increments, guarded by its acknowledgement, into `pipe`."""
        event, inc = delivery.event, _Increments()
        if event.event is Event.SUBMITTED or event.event is Event.STARTED:
            inc.count(f"jobs_{event.event.value}", _label(event.model))
        else:
            self._ended(event, inc)
        stream_keys = [
            keys.EVENTS_STREAM,
            keys.METRICS_STATE,
            keys.consumer_stats(keys.METRICS_GROUP),
        ]
        self._apply(stream_keys, [keys.METRICS_GROUP, delivery.id, *inc.args()], client=pipe)

    def _ended(self, event: LifecycleEvent, inc: _Increments) -> None:
        stream = self._stream(event.job_id)
        first = stream[0].entry if stream else None
        model = _label(first.model if isinstance(first, StartEntry) else event.model)
        if event.event is Event.FAILED:
            last = stream[-1].entry if stream else None
            found = last.error_type if isinstance(last, ErrorEntry) else None
            inc.count("jobs_failed", model, event.error_type or found or "unknown")
        else:
            inc.count(f"jobs_{event.event.value}", model)
        if stream is None:
            inc.stats["streams_missing"] += 1
        else:
            _observe_stream(inc, model, stream)

    def _stream(self, job_id: str) -> list[Record] | None:
        """The job's whole stream, or None (logged) if it expired or was trimmed first."""
        try:
            stream = records(self.client.xrange(keys.token_stream(job_id)))
        except ProtocolError as exc:
            reason: str | None = f"malformed: {exc}"
        else:
            reason = _damage(stream)
            if reason is None:
                return stream
        log.warning("metrics.stream_missing", job_id=job_id, reason=reason)
        return None


@dataclass
class _Histogram:
    """One model's histogram as stored: counts per bucket (not cumulative), sum and count."""

    buckets: Counter[str] = field(default_factory=Counter)
    sum: float = 0.0
    count: int = 0

    def add(self, other: _Histogram) -> None:
        self.buckets.update(other.buckets)
        self.sum += other.sum
        self.count += other.count

    def cumulative(self, bounds: Sequence[float]) -> list[tuple[str, float]]:
        out, seen = [], 0
        for bound in bounds:
            seen += self.buckets[_le(bound)]
            out.append((_le(bound), float(seen)))
        return [*out, ("+Inf", float(self.count))]

    def quantile(self, q: float, bounds: Sequence[float]) -> float | None:
        """Estimated as Prometheus's histogram_quantile does: linear within the bucket."""
        if not self.count:
            return None
        rank, seen, lower = q * self.count, 0, 0.0
        for bound in bounds:
            n = self.buckets[_le(bound)]
            if n and seen + n >= rank:
                return lower + (bound - lower) * (rank - seen) / n
            seen, lower = seen + n, bound
        return bounds[-1]


@dataclass
class Aggregates:
    """The parsed aggregates hash: counters by name and label values, histograms by model."""

    counters: defaultdict[str, Counter[tuple[str, ...]]]
    histograms: defaultdict[str, defaultdict[str, _Histogram]]

    def models(self) -> list[str]:
        named = {labels[0] for c in self.counters.values() for labels in c}
        return sorted(named.union(*(h.keys() for h in self.histograms.values())))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_aggregates(client: Redis) -> Aggregates:
    """The metrics hash, read in one command (a consistent view), parsed."""
    agg = Aggregates(defaultdict(Counter), defaultdict(lambda: defaultdict(_Histogram)))
    raw: dict[Any, Any] = client.hgetall(keys.METRICS_STATE)
    for name_, value_ in raw.items():
        name, *labels = json.loads(_text(name_))
        value = _text(value_)
        if name in COUNTERS:
            agg.counters[name][tuple(labels)] = int(value)
        elif name in HISTOGRAMS:
            model, part = labels
            histogram = agg.histograms[name][model]
            if part == "sum":
                histogram.sum = float(value)
            elif part == "count":
                histogram.count = int(value)
            else:
                histogram.buckets[part] = int(value)
    return agg


def _consumer_stats(client: Redis, group: str) -> dict[str, int]:
    raw: dict[Any, Any] = client.hgetall(keys.consumer_stats(group))
    stats = {_text(k): int(v) for k, v in raw.items()}
    return {name: stats.get(name, 0) for name in CONSUMER_COUNTERS}


class RedisCollector(Collector):
    """Reads the aggregates and the consumer groups' state from Redis at every scrape."""

    def __init__(self, client: Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        agg = read_aggregates(self.client)
        for name, (doc, labels) in COUNTERS.items():
            counter = CounterMetricFamily(f"tokenrelay_{name}_total", doc, labels=labels)
            for values, count in sorted(agg.counters[name].items()):
                counter.add_metric(values, count)
            yield counter
        for name, (doc, bounds) in HISTOGRAMS.items():
            histogram = HistogramMetricFamily(f"tokenrelay_{name}", doc, labels=["model"])
            for model, h in sorted(agg.histograms[name].items()):
                histogram.add_metric([model], h.cumulative(bounds), h.sum)
            yield histogram
        yield from self._consumers()

    def _consumers(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "tokenrelay_consumer_lag_events",
            "Events not yet delivered to the group.",
            labels=["group"],
        )
        pending = GaugeMetricFamily(
            "tokenrelay_consumer_pending_events",
            "Events delivered to the group, not yet acknowledged.",
            labels=["group"],
        )
        stats = {
            name: CounterMetricFamily(
                f"tokenrelay_consumer_{name}_total",
                f"The group's {name} counter.",
                labels=["group"],
            )
            for name in CONSUMER_COUNTERS
        }
        for group in group_lags(self.client):
            if group.lag is not None:
                lag.add_metric([group.group], group.lag)
            pending.add_metric([group.group], group.pending)
            for name, value in _consumer_stats(self.client, group.group).items():
                stats[name].add_metric([group.group], value)
        yield from (lag, pending, *stats.values())


def metrics_registry(client: Redis) -> CollectorRegistry:
    """A fresh registry (not the global one) holding the Redis-backed collector."""
    registry = CollectorRegistry()
    registry.register(RedisCollector(client))
    return registry


_SHORT = {
    "queue_wait_seconds": "queue_wait_s",
    "time_to_first_token_seconds": "ttft_s",
    "inter_token_latency_seconds": "itl_s",
    "generation_duration_seconds": "duration_s",
    "tokens_per_second": "tokens_per_s",
}


def _row(agg: Aggregates, models: set[str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        name.removeprefix("jobs_"): sum(
            n for labels, n in agg.counters[name].items() if labels[0] in models
        )
        for name in COUNTERS
    }
    for name, (_, bounds) in HISTOGRAMS.items():
        merged = _Histogram()
        for model in models & agg.histograms[name].keys():
            merged.add(agg.histograms[name][model])
        p50, p95 = merged.quantile(0.5, bounds), merged.quantile(0.95, bounds)
        mean = merged.sum / merged.count if merged.count else None
        for stat, value in (("mean", mean), ("p50", p50), ("p95", p95)):
            row[f"{_SHORT[name]}_{stat}"] = None if value is None else round(value, 4)
    return row


def snapshot(client: Redis) -> dict[str, Any]:
    """A plain summary: per model and overall counts and latency estimates, and consumer lags."""
    agg = read_aggregates(client)
    models = agg.models()
    return {
        "models": {model: _row(agg, {model}) for model in models},
        "all": _row(agg, set(models)),
        "consumers": {
            g.group: {"lag": g.lag, "pending": g.pending, **_consumer_stats(client, g.group)}
            for g in group_lags(client)
        },
    }


_COLUMNS = (
    ("model", None, ""),
    ("submitted", "submitted", "d"),
    ("started", "started", "d"),
    ("finished", "finished", "d"),
    ("failed", "failed", "d"),
    ("cancelled", "cancelled", "d"),
    ("tok_in", "tokens_in", "d"),
    ("tok_out", "tokens_out", "d"),
    ("queue_p95", "queue_wait_s_p95", ".3f"),
    ("ttft_p50", "ttft_s_p50", ".3f"),
    ("ttft_p95", "ttft_s_p95", ".3f"),
    ("itl_mean", "itl_s_mean", ".3f"),
    ("dur_p50", "duration_s_p50", ".2f"),
    ("tok/s", "tokens_per_s_mean", ".1f"),
)


def render_summary(snap: dict[str, Any], tty: bool) -> str:
    """An aligned table for a terminal; otherwise one JSON object, for a log line."""
    if not tty:
        return json.dumps(snap, sort_keys=True)
    rows = [[title for title, _, _ in _COLUMNS]]
    for model, row in [*snap["models"].items(), ("(all)", snap["all"])]:
        cells = [model]
        for _, key, fmt in _COLUMNS[1:]:
            cells.append("-" if row.get(key) is None else format(row[key], fmt))
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lags = ", ".join(
        f"{group} lag {c['lag'] if c['lag'] is not None else '?'} pending {c['pending']}"
        f" missing {c['streams_missing']}"
        for group, c in sorted(snap["consumers"].items())
    )
    return "\n".join([*lines, f"consumers: {lags or 'none'}"])


def _summarize(client: Redis, interval: float, done: threading.Event, out: TextIO) -> None:
    """Every `interval` seconds until `done`: a table on a terminal, else a log line."""
    while not done.wait(interval):
        try:
            snap = snapshot(client)
        except Exception:  # a summary that failed once may work next time; the consumer decides
            log.warning("metrics.summary_failed", exc_info=True)
            continue
        if out.isatty():
            out.write(render_summary(snap, tty=True) + "\n\n")
            out.flush()
        else:
            log.info("metrics.summary", **snap)


def serve_metrics(
    client: Redis,
    *,
    host: str,
    port: int,
    consumer: str | None,
    interval: float,
    stop: threading.Event,
    out: TextIO,
) -> None:
    """Serve /metrics on host:port, aggregate the lifecycle stream, summarize; until `stop`.

    `interval` <= 0 turns the periodic summary off.
    """
    server, thread = start_http_server(port, addr=host, registry=metrics_registry(client))
    log.info("metrics.serving", host=host, port=server.server_port)
    done = threading.Event()
    summary = threading.Thread(
        target=_summarize, args=(client, interval, done, out), name="metrics-summary", daemon=True
    )
    if interval > 0:
        summary.start()
    try:
        GroupConsumer(client, keys.METRICS_GROUP, consumer).run(MetricsAggregator(client), stop)
    finally:
        done.set()
        if summary.is_alive():
            summary.join()
        server.shutdown()
        server.server_close()
        thread.join()
