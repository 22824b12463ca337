"""The metrics aggregator: exact counts, plausible latencies, exactly once across crashes."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.error import URLError

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from structlog.testing import capture_logs
from support.scripts import ScriptedLLM
from support.streams import redis_major
from support.workers import Workers

from tokenrelay import EndEntry, ErrorEntry, Event, LifecycleEvent, Relay, Settings, StartEntry
from tokenrelay.consumer.exporter import (
    metrics_registry,
    read_aggregates,
    render_summary,
    serve_metrics,
    snapshot,
)
from tokenrelay.consumer.group import Delivery, GroupConsumer
from tokenrelay.consumer.metrics import MetricsAggregator
from tokenrelay.dev.processes import free_port
from tokenrelay.stream.events import emit
from tokenrelay.stream.keys import (
    EVENTS_STREAM,
    METRICS_GROUP,
    METRICS_STATE,
    consumer_stats,
    token_stream,
)
from tokenrelay.stream.protocol import parse_event
from tokenrelay.stream.writer import StreamWriter, close_stream

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# A consumer process that stops, forever, inside the handler of its Nth event: that event's
# increments are queued in the open transaction, the rest of its batch is delivered, unacked.
STALLING_CONSUMER = """
import sys, threading
from tokenrelay.connection import connect
from tokenrelay.consumer.group import GroupConsumer
from tokenrelay.consumer.metrics import MetricsAggregator

client = connect(sys.argv[1])
aggregate = MetricsAggregator(client)
handled = []

def handler(delivery, pipe):
    aggregate(delivery, pipe)
    handled.append(delivery.id)
    if len(handled) == int(sys.argv[2]):
        client.rpush("test:stalled", delivery.id)
        threading.Event().wait()

GroupConsumer(client, "metrics", "m1").run(handler, threading.Event())
"""


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None if the exposition lacks it."""
    return samples.get((name, frozenset(labels.items())))


def scrape(port: int) -> Samples:
    """GET /metrics over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return parse(reply.read().decode())


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Poll `condition` until it holds (another thread or process makes it true)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def caught_up(client: Redis) -> bool:
    """Whether the metrics group has handled every event of the lifecycle stream."""
    handled = client.hget(consumer_stats(METRICS_GROUP), "events_handled")
    return handled is not None and int(handled) == client.xlen(EVENTS_STREAM)


def fake_job(client: Redis, job_id: str, model: str, tokens: int = 3) -> None:
    """Emit a job's events and write its stream as a worker would, with fixed timings."""
    emit(client, LifecycleEvent(Event.SUBMITTED, job_id, 1000.0, "default", model))
    writer = StreamWriter(client, job_id, ttl=600)
    start = StartEntry(job_id, model, 1, 1000.0, 1001.5, "w", 50, 9, writer.writer_token)
    writer.start(start, queue="default")
    for i in range(tokens):
        writer.token(f" t{i}")
    end = EndEntry("stop", tokens, 3, tokens, 3 + tokens, 1500.0, 200.0, 2000.0)
    writer.close(end, queue="default", model=model)


def aggregate_all(client: Redis, consumer: str = "m1") -> int:
    """Run the metrics group over every event available now; how many it handled."""
    return GroupConsumer(client, METRICS_GROUP, consumer).run_until_idle(MetricsAggregator(client))


def start_serving(
    client: Redis, port: int, interval: float, out: io.StringIO
) -> tuple[threading.Thread, threading.Event]:
    """Run serve_metrics on a thread; the thread and the event that stops it."""
    stop = threading.Event()
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "consumer": "m1",
        "interval": interval,
        "stop": stop,
        "out": out,
    }
    thread = threading.Thread(target=serve_metrics, args=(client,), kwargs=options)
    thread.start()
    return thread, stop


class Terminal(io.StringIO):
    """An output that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_scripted_workload_is_counted_and_timed_on_the_metrics_endpoint(
    redis_client: Redis, relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """Three paced jobs, a failure and a cancellation: exact counts, latencies as scripted."""
    paced = llm.script([f" w{i}" for i in range(10)], token_delay=0.05)
    failing = llm.script(status=500)
    assert relay.submit("never mind").cancel()  # no model named, cancelled while queued
    for _ in range(3):
        relay.submit("count to ten", model=paced)
    relay.submit("fail", model=failing)
    workers.run_burst()
    port = free_port()
    server, stop = start_serving(redis_client, port, interval=60, out=io.StringIO())
    try:
        wait_until(lambda: caught_up(redis_client))
        samples = scrape(port)
    finally:
        stop.set()
        server.join(timeout=10)
    assert not server.is_alive()
    with pytest.raises(URLError):
        scrape(port)  # the endpoint stopped with the consumer

    def get(name: str, **labels: str) -> float | None:
        return value(samples, f"tokenrelay_{name}", **labels)

    assert [get("jobs_submitted_total", model=m) for m in (paced, failing, "default")] == [3, 1, 1]
    assert [get("jobs_started_total", model=m) for m in (paced, failing, "default")] == [3, 1, None]
    assert get("jobs_finished_total", model=paced) == 3
    assert get("jobs_failed_total", model=failing, error_type="OpenAIAPIError") == 1
    assert get("jobs_cancelled_total", model="default") == 1
    assert [get("tokens_out_total", model=m) for m in (paced, failing, "default")] == [30, 0, 0]
    assert get("tokens_in_total", model=paced) == 9  # "count to ten", three words, three times
    assert get("inter_token_latency_seconds_count", model=paced) == 27
    assert get("queue_wait_seconds_count", model=paced) == 3
    assert get("queue_wait_seconds_count", model=failing) == 1
    assert get("time_to_first_token_seconds_bucket", model=failing, le="+Inf") is None
    for name in ("time_to_first_token_seconds", "generation_duration_seconds", "tokens_per_second"):
        assert get(f"{name}_count", model=paced) == 3
        assert get(f"{name}_bucket", model=paced, le="+Inf") == 3

    def mean(name: str) -> float:
        total, count = get(f"{name}_sum", model=paced), get(f"{name}_count", model=paced)
        assert total is not None
        assert count
        return total / count

    # The server waits 0.05 s before each of the ten tokens.
    assert 0.04 <= mean("inter_token_latency_seconds") < 1
    assert 0.05 <= mean("time_to_first_token_seconds") < 5
    assert 0.5 <= mean("generation_duration_seconds") < 10
    assert 1 < mean("tokens_per_second") <= 20
    assert get("time_to_first_token_seconds_bucket", model=paced, le="0.025") == 0
    assert get("generation_duration_seconds_bucket", model=paced, le="0.25") == 0
    # Redis 6 cannot count lag, and the exporter leaves the sample out rather than guess.
    lag = 0 if redis_major(redis_client) >= 7 else None
    assert get("consumer_lag_events", group=METRICS_GROUP) == lag
    assert get("consumer_pending_events", group=METRICS_GROUP) == 0
    assert get("consumer_events_handled_total", group=METRICS_GROUP) == 14
    assert get("consumer_streams_missing_total", group=METRICS_GROUP) == 0


def test_a_consumer_killed_mid_batch_resumes_without_losing_or_doubling_counts(
    redis_client: Redis, relay: Relay, llm: ScriptedLLM, workers: Workers, settings: Settings
) -> None:
    """SIGKILL inside a handler, restart under the same name: the aggregates of one clean run."""
    model, failing = llm.script([" a", " b", " c"]), llm.script(status=500)
    relay.submit_many([{"prompt": "go", "model": model}] * 5 + [{"prompt": "no", "model": failing}])
    workers.run_burst()
    total = redis_client.xlen(EVENTS_STREAM)
    assert total == 18
    command = [sys.executable, "-c", STALLING_CONSUMER, settings.effective_redis_url, "8"]
    consumer = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        assert redis_client.blpop(["test:stalled"], timeout=30) is not None
    finally:
        consumer.send_signal(signal.SIGKILL)
        consumer.wait()
    stats = consumer_stats(METRICS_GROUP)
    assert redis_client.hget(stats, "events_handled") == b"7"  # the 8th was not committed
    assert aggregate_all(redis_client, "m1") == total - 7  # its pending events, first
    assert redis_client.hget(stats, "events_handled") == str(total).encode()
    recovered = redis_client.hgetall(METRICS_STATE)

    redis_client.delete(METRICS_STATE, stats)
    redis_client.xgroup_destroy(EVENTS_STREAM, METRICS_GROUP)
    assert aggregate_all(redis_client, "uninterrupted") == total
    assert redis_client.hgetall(METRICS_STATE) == recovered
    counts = read_aggregates(redis_client).counters
    assert counts["jobs_finished"] == {(model,): 5}
    assert counts["jobs_failed"] == {(failing, "OpenAIAPIError"): 1}
    assert counts["tokens_out"] == {(model,): 15, (failing,): 0}


def test_an_event_claimed_from_a_stalled_member_is_counted_once(redis_client: Redis) -> None:
    """A member presumed dead that wakes up and handles its claimed event adds nothing."""
    emit(redis_client, LifecycleEvent(Event.SUBMITTED, "j1", 1000.0, "default", "m"))
    GroupConsumer(redis_client, METRICS_GROUP, "slow").ensure_group()
    reply: Any = redis_client.xreadgroup(METRICS_GROUP, "slow", {EVENTS_STREAM: ">"})
    entry_id, fields = reply[0][1][0]
    claimer = GroupConsumer(redis_client, METRICS_GROUP, "quick", claim_after=0)
    assert claimer.run_until_idle(MetricsAggregator(redis_client)) == 1
    with redis_client.pipeline() as pipe:  # the slow member's late transaction
        MetricsAggregator(redis_client)(Delivery(entry_id.decode(), parse_event(fields)), pipe)
        pipe.xack(EVENTS_STREAM, METRICS_GROUP, entry_id)
        pipe.execute()
    assert read_aggregates(redis_client).counters["jobs_submitted"] == {("m",): 1}


def test_expired_and_trimmed_streams_are_counted_and_logged_not_skipped(
    redis_client: Redis,
) -> None:
    """The outcome still counts from the event; the stream's loss is logged and counted."""
    for job_id in ("whole", "expired", "trimmed"):
        fake_job(redis_client, job_id, "m")
    emit(redis_client, LifecycleEvent(Event.SUBMITTED, "broken", 1000.0, "default", "m"))
    close_stream(redis_client, "broken", ErrorEntry("Boom", "no", False), ttl=600, model="m")
    redis_client.delete(token_stream("expired"), token_stream("broken"))
    redis_client.xtrim(token_stream("trimmed"), maxlen=2, approximate=False)
    with capture_logs() as logs:
        assert aggregate_all(redis_client) == 11
    missing = [line for line in logs if line["event"] == "metrics.stream_missing"]
    assert sorted((line["job_id"], line["reason"].split(":")[0]) for line in missing) == [
        ("broken", "absent"),
        ("expired", "absent"),
        ("trimmed", "damaged"),
    ]
    assert all(line["log_level"] == "warning" for line in missing)
    samples = parse(generate_latest(metrics_registry(redis_client)).decode())
    assert value(samples, "tokenrelay_consumer_streams_missing_total", group=METRICS_GROUP) == 3
    assert value(samples, "tokenrelay_jobs_finished_total", model="m") == 3
    assert value(samples, "tokenrelay_jobs_failed_total", model="m", error_type="Boom") == 1
    assert value(samples, "tokenrelay_tokens_out_total", model="m") == 3  # the whole one's
    assert value(samples, "tokenrelay_generation_duration_seconds_count", model="m") == 1


def test_latencies_land_in_their_buckets(redis_client: Redis) -> None:
    """A job's timings from its start and end entries fall in the buckets that hold them."""
    fake_job(redis_client, "j1", "m", tokens=4)
    aggregate_all(redis_client)
    samples = parse(generate_latest(metrics_registry(redis_client)).decode())

    def bucket(name: str, le: str) -> float | None:
        return value(samples, f"tokenrelay_{name}_bucket", model="m", le=le)

    assert (bucket("queue_wait_seconds", "1.0"), bucket("queue_wait_seconds", "2.5")) == (0, 1)
    ttft = (
        bucket("time_to_first_token_seconds", "0.1"),
        bucket("time_to_first_token_seconds", "0.2"),
    )
    assert ttft == (0, 1)
    assert value(samples, "tokenrelay_time_to_first_token_seconds_sum", model="m") == 0.2
    assert bucket("generation_duration_seconds", "2.0") == 1
    assert (bucket("tokens_per_second", "1.0"), bucket("tokens_per_second", "2.0")) == (0, 1)
    assert value(samples, "tokenrelay_inter_token_latency_seconds_count", model="m") == 3


def test_the_summary_is_an_aligned_table_on_a_terminal(redis_client: Redis) -> None:
    """Each model has a row, plus one for all models; columns line up."""
    fake_job(redis_client, "a", "small")
    fake_job(redis_client, "b", "large-model-name", tokens=8)
    aggregate_all(redis_client)
    header, *rows, consumers = render_summary(snapshot(redis_client), tty=True).splitlines()
    assert [row.split()[0] for row in rows] == ["large-model-name", "small", "(all)"]
    assert len({len(line) for line in (header, *rows)}) == 1
    cells = [dict(zip(header.split(), row.split(), strict=True)) for row in rows]
    assert [c["finished"] for c in cells] == ["1", "1", "2"]
    assert [c["tok_out"] for c in cells] == ["8", "3", "11"]
    assert [c["tok/s"] for c in cells] == ["4.0", "1.5", "2.8"]
    lag = "0" if redis_major(redis_client) >= 7 else "?"  # Redis 6 cannot count lag
    assert consumers == f"consumers: metrics lag {lag} pending 0 missing 0"


def test_the_summary_is_one_json_object_otherwise(redis_client: Redis) -> None:
    """The non-terminal summary is one line of JSON holding the snapshot."""
    fake_job(redis_client, "a", "small")
    aggregate_all(redis_client)
    snap = snapshot(redis_client)
    line = render_summary(snap, tty=False)
    assert "\n" not in line
    assert json.loads(line) == snap
    assert snap["models"]["small"]["finished"] == 1
    assert snap["all"]["ttft_s_mean"] == 0.2
    assert snap["all"]["tokens_per_s_mean"] == 1.5
    assert snap["consumers"][METRICS_GROUP]["events_handled"] == 3


def test_serve_metrics_prints_the_table_to_a_terminal_every_interval(redis_client: Redis) -> None:
    """With a terminal for output, the periodic summary is the table."""
    fake_job(redis_client, "a", "small")
    out = Terminal()
    server, stop = start_serving(redis_client, free_port(), interval=0.05, out=out)
    try:
        wait_until(lambda: "small" in out.getvalue())
    finally:
        stop.set()
        server.join(timeout=10)
    assert not server.is_alive()
    assert out.getvalue().startswith("model")


def test_serve_metrics_logs_the_summary_when_not_on_a_terminal(redis_client: Redis) -> None:
    """Without a terminal, the periodic summary is one `metrics.summary` log line."""
    fake_job(redis_client, "a", "small")
    out = io.StringIO()
    with capture_logs() as logs:
        server, stop = start_serving(redis_client, free_port(), interval=0.05, out=out)
        try:
            wait_until(lambda: any(line["event"] == "metrics.summary" for line in logs))
        finally:
            stop.set()
            server.join(timeout=10)
    assert out.getvalue() == ""
    summary = next(line for line in logs if line["event"] == "metrics.summary")
    assert set(summary) >= {"models", "all", "consumers"}


def test_model_labels_are_a_bounded_set_and_the_rest_count_as_other(redis_client: Redis) -> None:
    """Submitters name models; past the bound, new names fold into `other`, nothing is lost."""
    for i in range(5):
        fake_job(redis_client, f"j{i}", f"model-{i}")
    aggregator = MetricsAggregator(redis_client, max_models=2)
    GroupConsumer(redis_client, METRICS_GROUP, "m1").run_until_idle(aggregator)
    finished = read_aggregates(redis_client).counters["jobs_finished"]
    assert finished == {("model-0",): 1, ("model-1",): 1, ("other",): 3}
    assert redis_client.scard("tokenrelay:metrics:models") == 2
