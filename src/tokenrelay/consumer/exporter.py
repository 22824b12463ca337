"""The metrics exporter: the aggregates read back from Redis for Prometheus and a summary.

Every scrape reads the aggregates hash in one HGETALL (a consistent view) and the consumer
groups' lag, so any number of exporters can serve the same numbers; the aggregation itself
is `tokenrelay.consumer.metrics`. While Redis is away the exporter goes on serving: a scrape
then answers `tokenrelay_redis_up 0` and nothing else, and the outage is logged once.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
from rq import Worker
from rq.serializers import JSONSerializer

from tokenrelay.consumer.group import GroupConsumer
from tokenrelay.consumer.metrics import (
    CONSUMER_COUNTERS,
    COUNTERS,
    HISTOGRAMS,
    MetricsAggregator,
    bucket_label,
)
from tokenrelay.outage import Outage, is_down
from tokenrelay.settings import Settings
from tokenrelay.stream import keys
from tokenrelay.stream.events import group_lags
from tokenrelay.stream.keys import WorkerStat
from tokenrelay.stream.protocol import text
from tokenrelay.terminal import printable

log = structlog.get_logger()


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
            seen += self.buckets[bucket_label(bound)]
            out.append((bucket_label(bound), float(seen)))
        return [*out, ("+Inf", float(self.count))]

    def quantile(self, q: float, bounds: Sequence[float]) -> float | None:
        """Estimated as Prometheus's histogram_quantile does: linear within the bucket."""
        if not self.count:
            return None
        rank, seen, lower = q * self.count, 0, 0.0
        for bound in bounds:
            n = self.buckets[bucket_label(bound)]
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


def read_aggregates(client: Redis) -> Aggregates:
    """The metrics hash, read in one command (a consistent view), parsed."""
    agg = Aggregates(defaultdict(Counter), defaultdict(lambda: defaultdict(_Histogram)))
    raw: dict[Any, Any] = client.hgetall(keys.METRICS_STATE)
    for name_, value_ in raw.items():
        name, *labels = json.loads(text(name_))
        value = text(value_)
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
    stats = {text(k): int(v) for k, v in raw.items()}
    return {name.value: stats.get(name.value, 0) for name in CONSUMER_COUNTERS}


def exporter_outage() -> Outage:
    """The exporter's view of Redis being away: logged once, never a reason to stop serving."""
    return Outage(math.inf, who="metrics exporter")


class RedisCollector(Collector):
    """Reads the aggregates and the consumer groups' state from Redis at every scrape."""

    def __init__(self, client: Redis, outage: Outage | None = None) -> None:
        self.client = client
        self.outage = outage or exporter_outage()

    def collect(self) -> Iterator[Metric]:
        """Every family, read before any is given, and whether Redis could be read."""
        families: list[Metric] = []
        try:
            families = list(self._families())
        except Exception as exc:
            if not is_down(exc):
                raise
            self.outage.failed(exc)
        else:
            self.outage.ok()
        up = GaugeMetricFamily(
            "tokenrelay_redis_up", "1 if this scrape could read Redis, else 0 (and nothing else)."
        )
        up.add_metric([], 1.0 if families else 0.0)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
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
        yield from self._workers()

    def _workers(self) -> Iterator[Metric]:
        """Each live worker's gauges, from the stats it writes at every heartbeat."""
        gauges = {
            WorkerStat.LOOP_LAG: (
                "worker_loop_lag_seconds",
                "Worst event-loop lag since the last heartbeat.",
            ),
            WorkerStat.IN_FLIGHT: ("worker_jobs_in_flight", "Jobs the worker holds."),
            WorkerStat.TAKING_JOBS: ("worker_taking_jobs", "1 while the worker takes new jobs."),
        }
        counters = {
            WorkerStat.STREAM_WRITES: ("worker_stream_writes", "Pipelines of token entries sent."),
            WorkerStat.TOKEN_ENTRIES: ("worker_token_entries", "Token entries written."),
        }
        families: dict[WorkerStat, GaugeMetricFamily | CounterMetricFamily] = {
            stat: GaugeMetricFamily(f"tokenrelay_{name}", doc, labels=["worker"])
            for stat, (name, doc) in gauges.items()
        }
        families.update(
            {
                stat: CounterMetricFamily(f"tokenrelay_{name}_total", doc, labels=["worker"])
                for stat, (name, doc) in counters.items()
            }
        )
        for worker in Worker.all(connection=self.client, serializer=JSONSerializer):
            raw: dict[Any, Any] = self.client.hgetall(keys.worker_stats(worker.name))
            stats = {text(k): float(v) for k, v in raw.items()}
            for stat, family in families.items():
                if stat.value in stats:
                    family.add_metric([worker.name], stats[stat.value])
        yield from families.values()

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
        stats: dict[str, CounterMetricFamily] = {
            name.value: CounterMetricFamily(
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


def metrics_registry(client: Redis, outage: Outage | None = None) -> CollectorRegistry:
    """A fresh registry (not the global one) holding the Redis-backed collector."""
    registry = CollectorRegistry()
    registry.register(RedisCollector(client, outage))
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
        cells = [printable(model)]  # a model name comes from whoever submitted the job
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


def _summarize(
    client: Redis, interval: float, done: threading.Event, out: TextIO, outage: Outage
) -> None:
    """Every `interval` seconds until `done`: a table on a terminal, else a log line."""
    while not done.wait(interval):
        try:
            snap = snapshot(client)
        except Exception as exc:
            if is_down(exc):  # logged once for the whole outage
                outage.failed(exc)
            else:  # a summary that failed once may work next time; the consumer decides
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
    claim_after: float = 60.0,
    max_deliveries: int = 5,
    retry_delay: float = 1.0,
    outage_limit: float = Settings.redis_outage_limit,
) -> None:
    """Serve /metrics on host:port, aggregate the lifecycle stream, summarize; until `stop`.

    `interval` <= 0 turns the periodic summary off. Scrapes are answered while Redis is
    away; the aggregation rides out `outage_limit` seconds of it, then raises
    RedisUnavailableError (and the server stops).
    """
    outage = exporter_outage()
    registry = metrics_registry(client, outage)
    server, thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics.serving", host=host, port=server.server_port)
    done = threading.Event()
    summary = threading.Thread(
        target=_summarize,
        args=(client, interval, done, out, outage),
        name="metrics-summary",
        daemon=True,
    )
    if interval > 0:
        summary.start()
    try:
        group = GroupConsumer(
            client,
            keys.METRICS_GROUP,
            consumer,
            claim_after=claim_after,
            max_deliveries=max_deliveries,
            retry_delay=retry_delay,
            outage_limit=outage_limit,
        )
        group.run(MetricsAggregator(client), stop)
    finally:
        done.set()
        if summary.is_alive():
            summary.join()
        server.shutdown()
        server.server_close()
        thread.join()
