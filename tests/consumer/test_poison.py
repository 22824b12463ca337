"""A poison event is set aside in the dead-letter stream; its consumer group goes on."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from redis import Redis
from structlog.testing import capture_logs
from support.scripts import ScriptedLLM
from support.workers import Workers

from tokenrelay import Relay
from tokenrelay.consumer.group import GroupConsumer
from tokenrelay.stream.keys import (
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    METRICS_GROUP,
    RECORDER_GROUP,
    consumer_stats,
)


def eventually(condition: Any, timeout: float = 30) -> None:
    """Wait until `condition()` is true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def dead_letters(client: Redis) -> list[dict[str, str]]:
    """The dead-letter stream's entries, decoded."""
    return [
        {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
        for _, fields in client.xrange(DEAD_LETTER_STREAM)
    ]


def test_a_truncated_transcript_is_set_aside_and_the_recorder_goes_on(
    env: dict[str, str],
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    tmp_path: Path,
) -> None:
    """A job whose metadata file is corrupt fails N times and is dead-lettered; others go on."""
    poisoned = relay.submit("a", model=llm.script(["first"]))
    fine = relay.submit("b", model=llm.script(["second"]))
    workers.run_burst()
    directory = tmp_path / "t"
    directory.mkdir()
    (directory / f"{poisoned.job_id}.json").write_text('{"job_id": "trunc')
    log_path = tmp_path / "recorder.log"
    with log_path.open("wb") as log:
        recorder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokenrelay",
                "record",
                "--dir",
                str(directory),
                "--max-deliveries",
                "3",
                "--retry-delay",
                "0.05",
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        eventually(lambda: len(dead_letters(redis_client)) == 1)
        eventually(lambda: (directory / f"{fine.job_id}.json").exists())
        assert recorder.poll() is None  # still running
    finally:
        recorder.send_signal(signal.SIGTERM)
        recorder.wait(timeout=30)
    assert recorder.returncode == 0
    [dead] = dead_letters(redis_client)
    assert (dead["group"], dead["event.job_id"], dead["event.event"]) == (
        RECORDER_GROUP,
        poisoned.job_id,
        "finished",
    )
    assert dead["deliveries"] == "3"
    assert "is not a transcript's metadata" in dead["error"]
    assert redis_client.hget(consumer_stats(RECORDER_GROUP), "events_dead") == b"1"
    assert redis_client.xpending(EVENTS_STREAM, RECORDER_GROUP)["pending"] == 0
    text = log_path.read_text()
    assert text.count('"consumer.handler_failed"') == 3
    assert '"consumer.dead_letter"' in text


def test_an_event_its_consumers_keep_crashing_on_is_set_aside_unhandled(
    relay: Relay, redis_client: Redis, tmp_path: Path
) -> None:
    """Delivered too often without an acknowledgement (a crash each time): dead-lettered."""
    relay.submit("a")
    consumer = GroupConsumer(redis_client, RECORDER_GROUP, "crashy", max_deliveries=3)
    consumer.ensure_group()
    reply: Any = redis_client.xreadgroup(RECORDER_GROUP, "crashy", {EVENTS_STREAM: ">"})
    [(entry_id, _)] = reply[0][1]
    for _ in range(3):  # three more deliveries, each lost to a crash before the ack
        redis_client.xclaim(EVENTS_STREAM, RECORDER_GROUP, "crashy", 0, [entry_id])
    calls: list[object] = []
    with capture_logs() as logs:
        handled = consumer.run_until_idle(lambda delivery, pipe: calls.append(delivery))
    assert (handled, calls) == (0, [])
    [dead] = dead_letters(redis_client)
    assert "never acknowledged" in dead["error"]
    assert [line["event"] for line in logs if line["log_level"] == "error"] == [
        "consumer.dead_letter"
    ]


def test_dead_letters_are_counted_in_the_metrics(redis_client: Redis) -> None:
    """The exporter shows each group's dead-lettered events."""
    from prometheus_client import generate_latest

    from tokenrelay.consumer.exporter import metrics_registry

    redis_client.xgroup_create(EVENTS_STREAM, METRICS_GROUP, id="0", mkstream=True)
    redis_client.hincrby(consumer_stats(METRICS_GROUP), "events_dead", 2)
    text = generate_latest(metrics_registry(redis_client)).decode()
    assert 'tokenrelay_consumer_events_dead_total{group="metrics"} 2.0' in text


def test_several_failing_events_are_each_set_aside_after_their_tries(
    relay: Relay, redis_client: Redis
) -> None:
    """Events that fail together are retried in any order and each dead-lettered on time."""
    handles = relay.submit_many(["a", "b", "c", "d"])
    poisoned = {handles[1].job_id, handles[3].job_id}
    consumer = GroupConsumer(redis_client, RECORDER_GROUP, "r", max_deliveries=2, retry_delay=0.01)
    calls: dict[str, int] = {}

    def handler(delivery: Any, pipe: Any) -> None:
        job_id = delivery.event.job_id
        calls[job_id] = calls.get(job_id, 0) + 1
        if job_id in poisoned:
            raise OSError(f"no space left for {job_id}")

    stop = threading.Event()
    runner = threading.Thread(target=consumer.run, args=(handler, stop))
    runner.start()
    try:
        eventually(lambda: len(dead_letters(redis_client)) == 2, timeout=15)
    finally:
        stop.set()
        runner.join(timeout=10)
    assert {d["event.job_id"] for d in dead_letters(redis_client)} == poisoned
    assert {calls[job_id] for job_id in poisoned} == {2}
    assert all(calls[h.job_id] == 1 for h in handles if h.job_id not in poisoned)


def test_a_lifecycle_entry_that_is_not_utf8_is_set_aside_not_fatal(
    relay: Relay, redis_client: Redis
) -> None:
    """Bytes that do not decode are a malformed event: dead-lettered as they are, then on."""
    redis_client.xadd(EVENTS_STREAM, {b"event": b"fin\xffished", b"job\xfe": b"x"})
    fine = relay.submit("after it")
    seen: list[str] = []
    consumer = GroupConsumer(redis_client, RECORDER_GROUP, "r")
    consumer.run_until_idle(lambda delivery, pipe: seen.append(delivery.event.job_id))
    assert seen == [fine.job_id]
    [(_, dead)] = redis_client.xrange(DEAD_LETTER_STREAM)
    assert dead[b"event.event"] == b"fin\xffished"
    assert dead[b"event.job\xfe"] == b"x"
    assert b"not UTF-8" in dead[b"error"]
