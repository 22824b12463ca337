"""One worker process runs many generations at once, and RQ's books show each of them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from redis import Redis
from rq import Worker
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from structlog.testing import capture_logs
from support.scripts import ScriptedLLM
from support.streams import terminal_entries, tokens_in, wait_for_tokens
from support.workers import Workers

from tokenrelay import EndEntry, Relay, Settings, StartEntry, TokenEntry
from tokenrelay.connection import connect
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.worker.lag import LoopLag

JSON = "rq.serializers.JSONSerializer"


def most_at_once(relay: Relay, job_ids: list[str]) -> int:
    """The most of these jobs that were generating at one moment (from their start and end)."""
    moments = []
    for job_id in job_ids:
        entries = [r.entry for r in relay.job(job_id).records(timeout=5)]
        start, end = entries[0], entries[-1]
        assert isinstance(start, StartEntry)
        assert isinstance(end, EndEntry)
        assert end.duration_ms is not None
        moments += [(start.started_at, 1), (start.started_at + end.duration_ms / 1000, -1)]
    running = most = 0
    for _, change in sorted(moments):
        running += change
        most = max(most, running)
    return most


def test_fifty_jobs_stream_at_once_in_one_worker_process_each_exactly(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """Fifty paced generations in one process: all in flight together, every stream exact."""
    texts = {i: [f" j{i}t{t}" for t in range(30)] for i in range(50)}
    handles = {
        i: relay.submit(f"job {i}", model=llm.script(texts[i], token_delay=0.02)) for i in texts
    }
    worker = workers.start()
    for i, handle in handles.items():
        assert handle.text(timeout=120) == "".join(texts[i])
        assert [type(e) for e in terminal_entries(redis_client, handle.job_id)] == [EndEntry]
    assert most_at_once(relay, [h.job_id for h in handles.values()]) >= 40
    assert worker.process.poll() is None  # one process did it all, and still runs


def test_rq_sees_every_job_in_flight_in_its_registries_and_rq_info(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis, redis_url: str
) -> None:
    """While five jobs run in one worker, RQ's started registry, executions and `rq info` agree."""
    llm_script = llm.script([" a", " b", " c"], stall_after=1)
    handles = [relay.submit(f"job {i}", model=llm_script) for i in range(5)]
    workers.start("--name", "many")
    for handle in handles:
        wait_for_tokens(handle, 1)
    ids = sorted(h.job_id for h in handles)
    started = StartedJobRegistry("tokenrelay", connection=redis_client, serializer=JSONSerializer)
    assert sorted(started.get_job_ids()) == ids
    [worker] = [w for w in Worker.all(connection=redis_client, serializer=JSONSerializer)]
    assert worker.name == "many"
    assert worker.get_state() == "busy"
    assert sorted(e.job_id for e in worker.get_current_executions()) == ids
    info = subprocess.run(
        [str(Path(sys.executable).with_name("rq")), "info", "--url", redis_url, "-S", JSON],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "tokenrelay   | 0, 5 executing, 0 finished, 0 failed" in info
    assert "many (" in info
    assert "busy tokenrelay" in info
    llm.server.release()
    for handle in handles:
        assert handle.text(timeout=30) == " a b c"
    finished = FinishedJobRegistry("tokenrelay", connection=redis_client, serializer=JSONSerializer)
    deadline = time.monotonic() + 30
    while sorted(finished.get_job_ids()) != ids:  # RQ's books close just after the stream
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert started.get_job_ids() == []


def test_a_fast_burst_is_written_in_few_entries_and_a_trickle_token_by_token(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """Tokens that come while a write is in flight share the next entry; slow ones go alone."""
    burst = relay.submit("fast", model=llm.script([f" b{i}" for i in range(3000)]), max_tokens=4000)
    trickle = relay.submit(
        "slow", model=llm.script([f" s{i}" for i in range(20)], token_delay=0.05)
    )
    workers.run_burst()
    burst_entries = [r.entry for r in burst.records(timeout=10)]
    assert tokens_in(burst_entries) == 3000
    assert len(burst_entries) < 3000 / 2  # far fewer writes than tokens: most hold several
    trickle_entries = [r.entry for r in trickle.records(timeout=10)]
    assert tokens_in(trickle_entries) == 20
    assert len(trickle_entries) == 20 + 2  # every token written as it came (plus start and end)


def test_a_frozen_redis_delays_the_streams_but_loses_nothing(
    env: dict[str, str], llm: ScriptedLLM, workers: Workers, own_redis: RedisServer
) -> None:
    """Redis stopped (SIGSTOP) for a second while ten jobs stream: each text arrives whole."""
    client = connect(own_redis.url)
    relay = Relay(client, Settings.from_env({**env, "TOKENRELAY_REDIS_URL": own_redis.url}))
    words = [f" w{i}" for i in range(60)]
    handles = [
        relay.submit(f"job {i}", model=llm.script(words, token_delay=0.02)) for i in range(10)
    ]
    workers.start(env={"TOKENRELAY_REDIS_URL": own_redis.url})
    for handle in handles:
        wait_for_tokens(handle, 5)
    assert own_redis.pid is not None
    os.kill(own_redis.pid, signal.SIGSTOP)
    time.sleep(1)  # the fault itself: Redis frozen for this long
    os.kill(own_redis.pid, signal.SIGCONT)
    for handle in handles:
        assert handle.text(timeout=60) == "".join(words)
        assert [type(e) for e in terminal_entries(client, handle.job_id)] == [EndEntry]
    client.close()


def test_a_late_loop_stops_taking_jobs_until_it_keeps_time_again() -> None:
    """The lag watch flags a blocked loop at once, logs it once, and clears when it recovers."""

    async def scenario() -> tuple[bool, bool]:
        lag = LoopLag(limit=0.1, interval=0.02)
        watch = asyncio.create_task(lag.watch())
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # something blocks the loop
        for _ in range(3):  # the watch's overdue timer, then its step, run before we look
            await asyncio.sleep(0)
        during = lag.overloaded
        await asyncio.wait_for(lag.calm(), 5)
        watch.cancel()
        return during, lag.overloaded

    with capture_logs() as logs:
        during, after = asyncio.run(scenario())
    assert (during, after) == (True, False)
    assert [line["event"] for line in logs] == ["worker.loop_lag_high", "worker.loop_lag_ok"]
    assert logs[0]["lag_ms"] >= 200


def test_each_worker_exports_its_loop_lag_and_load_as_metrics(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A running worker's loop lag, jobs in flight and writes reach the Prometheus exporter."""
    from prometheus_client import generate_latest

    from tokenrelay.consumer.exporter import metrics_registry

    handle = relay.submit("hi", model=llm.script([" a", " b"], stall_after=1))
    workers.start("--name", "gauged", env={"TOKENRELAY_HEARTBEAT_INTERVAL": "1"})
    wait_for_tokens(handle, 1)
    deadline = time.monotonic() + 30
    while not redis_client.exists("tokenrelay:worker:gauged"):
        assert time.monotonic() < deadline, "the worker wrote no stats"
        time.sleep(0.05)
    text = generate_latest(metrics_registry(redis_client)).decode()
    assert 'tokenrelay_worker_jobs_in_flight{worker="gauged"} 1.0' in text
    assert 'tokenrelay_worker_taking_jobs{worker="gauged"} 1.0' in text
    [lag_line] = [
        x for x in text.splitlines() if x.startswith("tokenrelay_worker_loop_lag_seconds{")
    ]
    assert 0 <= float(lag_line.split()[-1]) < 1
    assert 'tokenrelay_worker_token_entries_total{worker="gauged"} 1.0' in text


def test_one_token_per_entry_when_configured_for_version_1_readers(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """TOKENRELAY_TOKENS_PER_ENTRY=1: a fast burst still arrives whole, one token an entry."""
    handle = relay.submit("fast", model=llm.script([f" b{i}" for i in range(500)]))
    workers.run_burst(env={"TOKENRELAY_TOKENS_PER_ENTRY": "1"})
    entries = [r.entry for r in handle.records(timeout=10)]
    tokens = [e for e in entries if isinstance(e, TokenEntry)]
    assert [t.n for t in tokens] == [None] * 500
    assert "".join(t.text for t in tokens) == "".join(f" b{i}" for i in range(500))
